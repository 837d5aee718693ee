"""Qwen2-VL and Qwen2.5-VL family: ``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration``
(hallupatch's drop-in files under transformers 4.40, or transformers' own classes up to 4.51, which keep the
same module layout: ``visual``, ``model.layers``, ``model.norm``, ``lm_head``). The decoder is Qwen2's (llama's
layer structure), so the family is told apart by its vision tower's merger.

Visual tokens = the vision tower's output: one flat ``(tokens, hidden)`` tensor for all images of a call
(each image contributes ``t*h*w/4`` rows, in ``image_grid_thw`` order), merged into the rows' ``<|image_pad|>``
positions in reading order. Each row is assigned as many of those tokens as it has image-pad tokens, in order,
which splits the tensor per sample exactly as ``image_grid_thw`` does per image.
"""
from hallupatch.spec import FamilySpec, register_family


def image_pad_token_id(model) -> int:
    """``<|image_pad|>``, repeated once per visual token (read from the model's config)."""
    return model.config.image_token_id


def vision_wrapper_token_ids(model) -> tuple:
    """``<|vision_start|>`` and ``<|vision_end|>``, around each image's pads (read from the model's config)."""
    return (model.config.vision_start_token_id, model.config.vision_end_token_id)


def tokens_as_images(output):
    """The flat ``(tokens, hidden)`` output as ``(tokens, 1, hidden)``: each visual token is one unit matched to
    one image-pad token, so rows take their tokens by their image-pad counts."""
    return output.unsqueeze(1)


QWEN2_VL = register_family(
    FamilySpec(
        name="qwen2_vl",
        architectures=("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"),
        pass_start_paths=("model",),
        layers_paths=("model.layers",),
        final_norm_paths=("model.norm",),
        lm_head_paths=("lm_head",),
        visual_paths=("visual",),
        model_signature=("visual.merger", "visual.patch_embed"),
        layer_signature=("self_attn.q_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
                         "post_attention_layernorm"),
        layer_ffn="mlp",
        layer_ffn_in="mlp.up_proj.weight",      # as for llama: the decoder layer is the same
        layer_ffn_out="mlp.down_proj.weight",
        adapter_activation="identity",          # no published MemVR code for Qwen2-VL: llama's choice
        image_token_id=image_pad_token_id,
        image_wrapper_token_ids=vision_wrapper_token_ids,
        visual_output=tokens_as_images,
    )
)
