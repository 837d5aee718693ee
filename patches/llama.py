"""LLaMA family: ``LlamaForCausalLM`` and the decoders with the same layer structure (Mistral, Qwen2,
Gemma), transformers' ``LlavaForConditionalGeneration`` (llava-hf checkpoints) and
``VipLlavaForConditionalGeneration`` (their ``multi_modal_projector`` output is merged as is), and the
original LLaVA repository's ``LlavaLlamaForCausalLM`` (``model.mm_projector``)."""
from hallupatch.spec import FamilySpec, register_family

# The original LLaVA repository marks an image in input_ids with this id.
ORIGINAL_LLAVA_IMAGE_TOKEN = -200


def _image_token_id(model):
    token = getattr(model.config, "image_token_index", None)
    if token is not None:
        return token
    if getattr(getattr(model, "model", None), "mm_projector", None) is not None:
        return ORIGINAL_LLAVA_IMAGE_TOKEN
    return None


LLAMA = register_family(
    FamilySpec(
        name="llama",
        architectures=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GemmaForCausalLM",
                       "LlavaForConditionalGeneration", "VipLlavaForConditionalGeneration", "LlavaLlamaForCausalLM"),
        pass_start_paths=("model", "language_model.model"),
        layers_paths=("model.layers", "language_model.model.layers"),
        final_norm_paths=("model.norm", "language_model.model.norm"),
        lm_head_paths=("lm_head", "language_model.lm_head"),
        visual_paths=("multi_modal_projector", "model.mm_projector"),
        layer_signature=("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj", "post_attention_layernorm"),
        layer_ffn="mlp",
        layer_ffn_in="mlp.up_proj.weight",
        layer_ffn_out="mlp.down_proj.weight",
        adapter_activation="identity",
        layer_attention="self_attn",
        image_token_id=_image_token_id,
    )
)
