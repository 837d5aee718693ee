"""LLaVA-NeXT family: transformers' ``LlavaNextForConditionalGeneration`` (llava-v1.6 Vicuna / Mistral
checkpoints). Its projector runs per tile of the anyres grid; the model then lays the tiles out, removes
the padding and appends one ``image_newline`` row per grid row, and merges that into the sequence. The
visual memory is exactly that merged block, one per image, taken from the merge method's argument."""
from hallupatch.spec import FamilySpec, register_family


def image_token_index(model) -> int:
    return model.config.image_token_index


LLAVA_NEXT = register_family(
    FamilySpec(
        name="llava_next",
        architectures=("LlavaNextForConditionalGeneration",),
        pass_start_paths=("language_model.model",),
        layers_paths=("language_model.model.layers",),
        final_norm_paths=("language_model.model.norm",),
        lm_head_paths=("language_model.lm_head",),
        visual_paths=(),
        model_signature=("image_newline", "multi_modal_projector"),
        visual_merge_method="_merge_input_ids_with_image_features",
        layer_signature=("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj", "post_attention_layernorm"),
        layer_ffn="mlp",
        layer_ffn_in="mlp.up_proj.weight",
        layer_ffn_out="mlp.down_proj.weight",
        adapter_activation="identity",
        layer_attention="self_attn",
        image_token_id=image_token_index,
    )
)
