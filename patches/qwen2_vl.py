"""Qwen2-VL and Qwen2.5-VL family: ``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration``
(hallupatch's drop-in files under transformers 4.40, or transformers' own classes up to 4.51, which keep the
same module layout: ``visual``, ``model.layers``, ``model.norm``, ``lm_head``). The decoder is Qwen2's (llama's
layer structure), so the family is told apart by its vision tower's merger.

Visual tokens = the vision tower's output: one flat ``(tokens, hidden)`` tensor for all images of a call
(each image contributes ``t*h*w/4`` rows, in ``image_grid_thw`` order), merged into the rows' ``<|image_pad|>``
positions in reading order. Each row is assigned as many of those tokens as it has image-pad tokens, in order,
which splits the tensor per sample exactly as ``image_grid_thw`` does per image.

The decoder's attention (``self_attn``, M-RoPE, grouped keys and values) returns its weights with
``output_attentions=True`` and takes an ``edit_scores`` function for its pre-softmax scores: the drop-in file
is the one place of its eager formula.
"""
import inspect

import torch

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


def eager_attention(attention, original, hidden_states, call, edit_scores):
    """The drop-in attention's own eager formula with ``edit_scores`` on its pre-softmax scores after the mask."""
    if "edit_scores" not in inspect.signature(original).parameters:
        raise TypeError(
            f"{type(attention).__name__} takes no edit_scores: this checkpoint has older drop-in files; run "
            "`python -m hallupatch.modeling install CHECKPOINT_DIR` again to update them"
        )
    return original(hidden_states, **call, edit_scores=edit_scores)


def image_inputs_of_rows(model, input_ids, inputs, rows: slice) -> dict:
    """``pixel_values`` and ``image_grid_thw`` of the rows ``rows`` of ``input_ids``: they hold every row's
    images in row order without a batch dimension (a row has one grid per ``<|vision_start|><|image_pad|>``
    and ``t*h*w`` patches per grid), as the processor and ``_expand_inputs_for_generation`` lay them out."""
    if inputs.get("pixel_values_videos") is not None:
        raise ValueError("videos cannot be split by rows here; run one sample per generate() call")
    grid = inputs.get("image_grid_thw")
    if grid is None:
        return {}
    config = model.config
    follows_start = torch.roll(input_ids == config.vision_start_token_id, shifts=1, dims=1)
    per_row = (follows_start & (input_ids == config.image_token_id)).sum(dim=1).tolist()
    grids = list(torch.split(grid, per_row))[rows]
    taken = {"image_grid_thw": torch.cat(grids) if grids else grid[:0]}
    pixels = inputs.get("pixel_values")
    if pixels is not None:
        per_row_patches = [int(g.prod(dim=1).sum()) for g in torch.split(grid, per_row)]
        chunks = list(torch.split(pixels, per_row_patches))[rows]
        taken["pixel_values"] = torch.cat(chunks) if chunks else pixels[:0]
    if not int(taken["image_grid_thw"].shape[0]):
        taken = {name: None for name in taken}
    return taken


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
        layer_attention="self_attn",
        eager_attention=eager_attention,
        flat_inputs_of_rows=image_inputs_of_rows,
        image_token_id=image_pad_token_id,
        image_wrapper_token_ids=vision_wrapper_token_ids,
        visual_output=tokens_as_images,
    )
)
