"""Idefics2 family: transformers' ``Idefics2ForConditionalGeneration`` (a Mistral decoder at
``model.text_model``). Visual tokens = the output of ``model.connector`` (modality projection + perceiver
resampler: ``resampler_n_latents`` tokens per image or sub-image), which is what ``inputs_merger`` writes
over the ``<image>`` placeholders, one placeholder per visual token."""
from hallupatch.spec import FamilySpec, register_family


def image_token_id(model) -> int:
    return model.config.image_token_id


def perceiver_latents(model) -> int:
    """The processor writes ``image_seq_len`` (= the resampler's latents) ``<image>`` tokens per image."""
    return model.config.perceiver_config.resampler_n_latents


IDEFICS2 = register_family(
    FamilySpec(
        name="idefics2",
        architectures=("Idefics2ForConditionalGeneration",),
        pass_start_paths=("model.text_model",),
        layers_paths=("model.text_model.layers",),
        final_norm_paths=("model.text_model.norm",),
        lm_head_paths=("lm_head",),
        visual_paths=("model.connector",),
        layer_signature=("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj", "post_attention_layernorm"),
        layer_ffn="mlp",
        layer_ffn_in="mlp.up_proj.weight",
        layer_ffn_out="mlp.down_proj.weight",
        adapter_activation="identity",
        image_token_id=image_token_id,
        tokens_per_image=perceiver_latents,
    )
)
