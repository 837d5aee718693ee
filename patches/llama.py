"""LLaMA family: ``LlamaForCausalLM`` and the decoders with the same layer structure (Mistral, Qwen2,
Gemma), transformers' ``LlavaForConditionalGeneration`` (llava-hf checkpoints) and
``VipLlavaForConditionalGeneration`` (their ``multi_modal_projector`` output is merged as is), and the
original LLaVA repository's ``LlavaLlamaForCausalLM`` (``model.mm_projector``)."""
import math

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

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


def eager_attention(attention, original, hidden_states, call, edit_scores):
    """Llama's eager attention (transformers 4.40's formula, whatever ``attn_implementation`` the model has)
    with ``edit_scores`` applied to the pre-softmax scores after the mask and the clamp at the dtype's
    minimum (the published PAI patch of ``LlamaAttention.forward``). ``original`` is not called."""
    attention_mask, position_ids = call.get("attention_mask"), call.get("position_ids")
    past_key_value, cache_position = call.get("past_key_value"), call.get("cache_position")
    batch, q_len, _ = hidden_states.shape
    head_dim = attention.head_dim
    query = attention.q_proj(hidden_states).view(batch, q_len, attention.num_heads, head_dim).transpose(1, 2)
    key = attention.k_proj(hidden_states).view(batch, q_len, attention.num_key_value_heads, head_dim).transpose(1, 2)
    value = attention.v_proj(hidden_states).view(batch, q_len, attention.num_key_value_heads, head_dim).transpose(1, 2)
    past_key_value = getattr(attention, "past_key_value", past_key_value)
    cos, sin = attention.rotary_emb(value, position_ids)
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    if past_key_value is not None:
        key, value = past_key_value.update(key, value, attention.layer_idx,
                                           {"sin": sin, "cos": cos, "cache_position": cache_position})
    key = repeat_kv(key, attention.num_key_value_groups)
    value = repeat_kv(value, attention.num_key_value_groups)
    keys = key.shape[-2]
    scores = torch.matmul(query, key.transpose(2, 3)) / math.sqrt(head_dim)
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, :keys]
    elif q_len > 1:   # sdpa models get no mask when none is needed; the eager formula needs the causal one
        rows = torch.arange(keys - q_len, keys, device=scores.device)[:, None]
        future = torch.arange(keys, device=scores.device)[None, :] > rows
        scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
    scores = torch.max(scores, torch.tensor(torch.finfo(scores.dtype).min, device=scores.device))   # as published
    scores = edit_scores(scores)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(weights, value).transpose(1, 2).reshape(batch, q_len, -1)
    output = attention.o_proj(output)
    return output, (weights if call.get("output_attentions") else None), past_key_value


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
        eager_attention=eager_attention,
        image_token_id=_image_token_id,
    )
)
