"""Qwen2-VL (``Qwen2VLForConditionalGeneration``) for ``trust_remote_code`` loading under transformers 4.40,
written for hallupatch from the architecture as transformers 4.51.3 implements it (the last release whose
in-memory parameter names are the hub files' names), and checked against that release's outputs on tiny
checkpoints (tests/test_dropin_qwen2_vl.py).

Parts, as there:

* the vision tower: a Conv3d patch embedding over a 2-frame temporal patch, 2-D rotary position embedding on
  the patch grid, attention that is block-diagonal over the images of a call (``cu_seqlens``), and a merger that
  turns each 2x2 window of patches into one token of the language model's width;
* the Qwen2 decoder with M-RoPE: three position axes (time, height, width) whose rotary frequencies are split by
  ``rope_scaling.mrope_section``; text tokens advance all three together; the offset between a sequence's
  positions and its length (``rope_deltas``) is computed at the prefill and reused at every decoding step.

Every token id comes from ``config.json``. A ``"hallupatch"`` block in ``config.json`` (written by
``python -m hallupatch.modeling install``) is handed to ``hallupatch.apply`` once the model is built.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, ModelOutput

from .configuration_qwen2_vl import Qwen2VLConfig, check_rope_scaling


def apply_hallupatch_block(model: nn.Module) -> None:
    """Apply the ``hallupatch`` block of ``model.config`` (if any) through ``hallupatch.apply``."""
    block = getattr(model.config, "hallupatch", None)
    if not block:
        return
    try:
        from hallupatch.modeling import apply_config_block
    except ImportError as error:
        raise ImportError(
            "config.json has a 'hallupatch' block but the hallupatch package is not importable; "
            "install it (pip install hallupatch) or remove the block from config.json"
        ) from error
    apply_config_block(model, block)


@dataclass
class Qwen2VLCausalLMOutputWithPast(ModelOutput):
    loss: Optional[torch.FloatTensor] = None
    logits: torch.FloatTensor = None
    past_key_values: Optional[Any] = None
    hidden_states: Optional[Tuple[torch.FloatTensor, ...]] = None
    attentions: Optional[Tuple[torch.FloatTensor, ...]] = None
    rope_deltas: Optional[torch.LongTensor] = None


# ---------------------------------------------------------------------------------------------
# Rotary embeddings
# ---------------------------------------------------------------------------------------------
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rotate_vision(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """2-D rotary embedding of the vision tower, computed in float32 and cast back."""
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    q_out = q.float() * cos + rotate_half(q.float()) * sin
    k_out = k.float() * cos + rotate_half(k.float()) * sin
    return q_out.to(q.dtype), k_out.to(k.dtype)


def rotate_multimodal(q, k, cos, sin, mrope_section: List[int]):
    """M-RoPE: channel chunk ``i`` of ``mrope_section * 2`` takes its angle from position axis ``i % 3``."""
    sections = list(mrope_section) * 2
    cos = torch.cat([chunk[i % 3] for i, chunk in enumerate(cos.split(sections, dim=-1))], dim=-1).unsqueeze(1)
    sin = torch.cat([chunk[i % 3] for i, chunk in enumerate(sin.split(sections, dim=-1))], dim=-1).unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class VisionRotaryEmbedding(nn.Module):
    def __init__(self, dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, length: int) -> torch.Tensor:
        positions = torch.arange(length, device=self.inv_freq.device, dtype=self.inv_freq.dtype)
        return torch.outer(positions, self.inv_freq)


class MultimodalRotaryEmbedding(nn.Module):
    """The language model's rotary angles for 3-axis position ids ``(3, batch, length)``."""

    def __init__(self, config: Qwen2VLConfig):
        super().__init__()
        dim = config.hidden_size // config.num_attention_heads
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        inv_freq = self.inv_freq[None, None, :, None].float().expand(3, position_ids.shape[1], -1, 1)
        positions = position_ids[:, :, None, :].float()
        device_type = x.device.type if x.device.type != "mps" else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            freqs = (inv_freq.float() @ positions.float()).transpose(2, 3)
            angles = torch.cat((freqs, freqs), dim=-1)
            cos, sin = angles.cos(), angles.sin()
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


# ---------------------------------------------------------------------------------------------
# Vision tower
# ---------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, temporal_patch_size: int, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.in_channels = in_channels
        self.embed_dim = embed_dim
        kernel = [temporal_patch_size, patch_size, patch_size]
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.view(-1, self.in_channels, self.temporal_patch_size, self.patch_size, self.patch_size)
        return self.proj(pixels.to(dtype=self.proj.weight.dtype)).view(-1, self.embed_dim)


class PatchMerger(nn.Module):
    """Each 2x2 window of patches (consecutive rows, as the processor orders them) -> one language token."""

    def __init__(self, dim: int, context_dim: int, spatial_merge_size: int = 2, norm: Optional[nn.Module] = None):
        super().__init__()
        self.hidden_size = context_dim * spatial_merge_size ** 2
        self.ln_q = norm if norm is not None else nn.LayerNorm(context_dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.hidden_size, self.hidden_size), nn.GELU(),
                                 nn.Linear(self.hidden_size, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.hidden_size))


class VisionMlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, hidden_act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = ACT2FN[hidden_act]
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionAttention(nn.Module):
    """Attention over the concatenated patches of all images, each image (or window) attending only to itself."""

    def __init__(self, dim: int, num_heads: int, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_implementation = attn_implementation
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                position_embeddings: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        length = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = rotate_vision(q, k, *position_embeddings)
        same_block = torch.zeros([1, length, length], device=q.device, dtype=torch.bool)
        for i in range(1, len(cu_seqlens)):
            same_block[..., cu_seqlens[i - 1]:cu_seqlens[i], cu_seqlens[i - 1]:cu_seqlens[i]] = True
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        if self.attn_implementation == "sdpa":
            out = F.scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), same_block,
                                                 dropout_p=0.0).squeeze(0)
        else:
            mask = torch.zeros([1, length, length], device=q.device, dtype=q.dtype)
            mask.masked_fill_(~same_block, torch.finfo(q.dtype).min)
            weights = torch.matmul(q, k.transpose(1, 2)) / math.sqrt(self.head_dim) + mask
            weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
            out = torch.matmul(weights, v)
        return self.proj(out.transpose(0, 1).reshape(length, -1))


class Qwen2VLVisionBlock(nn.Module):
    def __init__(self, config, attn_implementation: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.attn = VisionAttention(config.embed_dim, config.num_heads, attn_implementation)
        self.mlp = VisionMlp(config.embed_dim, int(config.embed_dim * config.mlp_ratio), config.hidden_act)

    def forward(self, hidden_states, cu_seqlens, position_embeddings):
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states), cu_seqlens, position_embeddings)
        return hidden_states + self.mlp(self.norm2(hidden_states))


def grid_rotary_angles(rotary: VisionRotaryEmbedding, grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """Per patch, the rotary angles of its (row, column) in the image grid, patches in 2x2-window order."""
    positions = []
    for t, h, w in grid_thw.tolist():
        rows = torch.arange(h).unsqueeze(1).expand(-1, w)
        cols = torch.arange(w).unsqueeze(0).expand(h, -1)
        window_order = [grid.reshape(h // merge, merge, w // merge, merge).permute(0, 2, 1, 3).flatten()
                        for grid in (rows, cols)]
        positions.append(torch.stack(window_order, dim=-1).repeat(t, 1))
    positions = torch.cat(positions, dim=0)
    table = rotary(int(grid_thw[:, 1:].max()))
    return table[positions].flatten(1)


def image_boundaries(grid_thw: torch.Tensor) -> torch.Tensor:
    """``cu_seqlens``: the cumulative patch counts of every frame of every image, starting at 0."""
    lengths = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return F.pad(lengths.cumsum(dim=0, dtype=torch.int32), (1, 0), value=0)


class Qwen2VisionTransformer(nn.Module):
    def __init__(self, config, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        self.spatial_merge_size = config.spatial_merge_size
        self.patch_embed = PatchEmbed(config.patch_size, config.temporal_patch_size, config.in_channels,
                                      config.embed_dim)
        self.rotary_pos_emb = VisionRotaryEmbedding(config.embed_dim // config.num_heads // 2)
        self.blocks = nn.ModuleList([Qwen2VLVisionBlock(config, attn_implementation) for _ in range(config.depth)])
        self.merger = PatchMerger(config.hidden_size, config.embed_dim, config.spatial_merge_size)

    def get_dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Flattened patches of all images ``(patches, C*T*P*P)`` -> their tokens ``(patches / 4, hidden)``."""
        hidden_states = self.patch_embed(pixel_values)
        angles = grid_rotary_angles(self.rotary_pos_emb, grid_thw, self.spatial_merge_size)
        angles = torch.cat((angles, angles), dim=-1)
        position_embeddings = (angles.cos(), angles.sin())
        cu_seqlens = image_boundaries(grid_thw)
        for block in self.blocks:
            hidden_states = block(hidden_states, cu_seqlens, position_embeddings)
        return self.merger(hidden_states)


# ---------------------------------------------------------------------------------------------
# Language model (Qwen2 decoder with M-RoPE)
# ---------------------------------------------------------------------------------------------
class Qwen2RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(dtype)


class Qwen2MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def repeat_kv(states: torch.Tensor, times: int) -> torch.Tensor:
    if times == 1:
        return states
    batch, heads, length, dim = states.shape
    return states[:, :, None].expand(batch, heads, times, length, dim).reshape(batch, heads * times, length, dim)


class Qwen2VLAttention(nn.Module):
    def __init__(self, config: Qwen2VLConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.attention_dropout = config.attention_dropout
        self.mrope_section = config.rope_scaling["mrope_section"]
        self.attn_implementation = config._attn_implementation
        self.q_proj = nn.Linear(self.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(self.hidden_size, self.num_key_value_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(self.hidden_size, self.num_key_value_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, self.hidden_size, bias=False)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                output_attentions=False, use_cache=False, cache_position=None, position_embeddings=None,
                edit_scores=None):
        """``edit_scores`` (not in transformers; hallupatch's PAI site): a function applied to the pre-softmax
        scores ``(batch, heads, queries, keys)`` after the mask; it selects the eager formula."""
        batch, length, _ = hidden_states.size()
        shape = (batch, length, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = rotate_multimodal(query, key, cos, sin, self.mrope_section)
        if past_key_value is not None:
            key, value = past_key_value.update(key, value, self.layer_idx,
                                               {"sin": sin, "cos": cos, "cache_position": cache_position})
        key = repeat_kv(key, self.num_key_value_groups)
        value = repeat_kv(value, self.num_key_value_groups)
        mask = attention_mask[:, :, :, :key.shape[-2]] if attention_mask is not None else None
        weights = None
        if self.attn_implementation == "sdpa" and not output_attentions and edit_scores is None:
            if query.device.type == "cuda" and mask is not None:
                query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                                 dropout_p=self.attention_dropout if self.training else 0.0,
                                                 is_causal=mask is None and length > 1)
        else:
            weights = torch.matmul(query, key.transpose(2, 3)) / math.sqrt(self.head_dim)
            if mask is not None:
                weights = weights + mask
            elif length > 1:   # SDPA's causal flag stood for this mask (causal_mask_4d gave none)
                future = torch.ones(length, key.shape[-2], dtype=torch.bool, device=weights.device)
                future = future.triu(key.shape[-2] - length + 1)
                weights = weights.masked_fill(future, torch.finfo(weights.dtype).min)
            if query.dtype == torch.float16:   # as transformers: keep -inf from turning a row into NaN
                weights = torch.where(torch.isinf(weights), torch.zeros_like(weights), weights)
            if edit_scores is not None:
                weights = edit_scores(weights)
            weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
            weights = F.dropout(weights, p=self.attention_dropout, training=self.training)
            out = torch.matmul(weights, value)
        out = self.o_proj(out.transpose(1, 2).reshape(batch, length, self.hidden_size))
        return out, (weights if output_attentions else None), past_key_value


class Qwen2VLDecoderLayer(nn.Module):
    def __init__(self, config: Qwen2VLConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = Qwen2VLAttention(config, layer_idx)
        self.mlp = Qwen2MLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                output_attentions=False, use_cache=False, cache_position=None, position_embeddings=None, **kwargs):
        residual = hidden_states
        hidden_states, weights, present = self.self_attn(
            self.input_layernorm(hidden_states), attention_mask=attention_mask, position_ids=position_ids,
            past_key_value=past_key_value, output_attentions=output_attentions, use_cache=use_cache,
            cache_position=cache_position, position_embeddings=position_embeddings)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = residual + self.mlp(self.post_attention_layernorm(hidden_states))
        outputs = (hidden_states,)
        if output_attentions:
            outputs += (weights,)
        if use_cache:
            outputs += (present,)
        return outputs


class Qwen2VLPreTrainedModel(PreTrainedModel):
    config_class = Qwen2VLConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Qwen2VLDecoderLayer", "Qwen2VLVisionBlock", "Qwen2_5_VLVisionBlock"]
    _skip_keys_device_placement = "past_key_values"
    _supports_sdpa = True
    _supports_cache_class = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv3d)):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()


def causal_mask_4d(attention_mask: Optional[torch.Tensor], inputs_embeds: torch.Tensor, cache_position: torch.Tensor,
                   past_length: int, sliding_window: Optional[int], attn_implementation: str,
                   output_attentions: bool) -> Optional[torch.Tensor]:
    """The additive ``(batch, 1, q, k)`` mask: causal, padding, and keys ``sliding_window`` or more positions
    back masked with the dtype's minimum; ``None`` where SDPA's own causal flag gives the same (no padding,
    and the pass is the whole sequence or one new token), exactly when transformers 4.51 drops it."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask
    batch, length = inputs_embeds.shape[:2]
    total = past_length + length
    if attn_implementation == "sdpa" and not output_attentions and (sliding_window is None or total < sliding_window):
        all_real = attention_mask is None or bool(torch.all(attention_mask == 1))
        if all_real and (length == 1 or total == length):
            return None
    dtype, device = inputs_embeds.dtype, inputs_embeds.device
    minimum = torch.finfo(dtype).min
    target = attention_mask.shape[-1] if attention_mask is not None else total + 1
    keys = torch.arange(target, device=device)
    hidden = keys > cache_position.reshape(-1, 1)
    if sliding_window is not None:
        hidden |= keys <= cache_position.reshape(-1, 1) - sliding_window
    mask = torch.full((length, target), minimum, dtype=dtype, device=device) * hidden
    mask = mask[None, None].expand(batch, 1, -1, -1).clone()
    if attention_mask is not None:
        padding = (mask + attention_mask[:, None, None, :].to(mask.device)) == 0
        mask = mask.masked_fill(padding, minimum)
        if attn_implementation == "sdpa" and device.type in ("cuda", "xpu") and not output_attentions:
            # rows with no key to attend (padding queries) attend to all keys, as transformers does on GPUs
            mask = mask.mul(~torch.all(mask == minimum, dim=-1, keepdim=True))
    return mask


class Qwen2VLModel(Qwen2VLPreTrainedModel):
    """The decoder stack: embeddings, layers, final norm (``hidden_states[-1]`` is normed, as in transformers)."""

    def __init__(self, config: Qwen2VLConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([Qwen2VLDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MultimodalRotaryEmbedding(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, cache_position=None):
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        use_cache = config.use_cache if use_cache is None else use_cache
        return_dict = config.use_return_dict if return_dict is None else return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if isinstance(past_key_values, (tuple, list)):
            past_key_values = DynamicCache.from_legacy_cache(past_key_values)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        if cache_position is None:
            cache_position = torch.arange(past_length, past_length + inputs_embeds.shape[1], device=inputs_embeds.device)
        if position_ids is None:
            position_ids = cache_position.view(1, 1, -1).expand(3, inputs_embeds.shape[0], -1)
        elif position_ids.dim() == 2:
            position_ids = position_ids[None, ...].expand(3, position_ids.shape[0], -1)
        mask = causal_mask_4d(attention_mask, inputs_embeds, cache_position, past_length, config.sliding_window,
                              config._attn_implementation, bool(output_attentions))
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        all_hidden = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden += (hidden_states,)
            outputs = layer(hidden_states, attention_mask=mask, position_ids=position_ids,
                            past_key_value=past_key_values, output_attentions=output_attentions, use_cache=use_cache,
                            cache_position=cache_position, position_embeddings=position_embeddings)
            hidden_states = outputs[0]
            if output_attentions:
                all_attentions += (outputs[1],)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden += (hidden_states,)
        cache = past_key_values if use_cache else None
        if not return_dict:
            return tuple(v for v in (hidden_states, cache, all_hidden, all_attentions) if v is not None)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=cache,
                                       hidden_states=all_hidden, attentions=all_attentions)


def cached_length(past_key_values: Any) -> int:
    if past_key_values is None:
        return 0
    if isinstance(past_key_values, Cache):
        return past_key_values.get_seq_length()
    return past_key_values[0][0].shape[-2] if len(past_key_values) else 0


class Qwen2VLForConditionalGeneration(Qwen2VLPreTrainedModel):
    _tied_weights_keys = ["lm_head.weight"]
    vision_tower_class = Qwen2VisionTransformer

    def __init__(self, config: Qwen2VLConfig):
        super().__init__(config)
        check_rope_scaling(config.rope_scaling, config.hidden_size // config.num_attention_heads)
        self.visual = self.vision_tower_class(config.vision_config, config._attn_implementation)
        self.model = Qwen2VLModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # the prefill's position offsets (transformers keeps them here); each cache also carries its own, so
        # a second forward with its own cache (a contrastive branch) does not disturb the main one
        self.rope_deltas = None
        self.post_init()
        apply_hallupatch_block(self)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_decoder(self):
        return self.model

    # -- M-RoPE positions --------------------------------------------------------------------------
    def vision_time_positions(self, t: int, tokens_per_frame: int, seconds_per_grid: Optional[float]) -> torch.Tensor:
        """The time-axis position of each visual token of one image or video (Qwen2-VL: the frame index)."""
        return torch.arange(t).view(-1, 1).expand(-1, tokens_per_frame).flatten()

    def get_rope_index(self, input_ids: torch.LongTensor, image_grid_thw: Optional[torch.LongTensor] = None,
                       video_grid_thw: Optional[torch.LongTensor] = None,
                       attention_mask: Optional[torch.Tensor] = None,
                       second_per_grid_ts: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """3-axis position ids ``(3, batch, length)`` and per-row deltas ``(batch, 1)`` (last position + 1 minus
        the padded length). Text advances all axes by one; an image's tokens take (time, row, column) offsets
        from where the text before it stopped; the text after it starts one past the image's largest position.
        Padding positions get 1 on every axis."""
        merge = self.config.vision_config.spatial_merge_size
        image_token, video_token = self.config.image_token_id, self.config.video_token_id
        start_token = self.config.vision_start_token_id
        if image_grid_thw is None and video_grid_thw is None:
            if attention_mask is not None:
                position_ids = attention_mask.long().cumsum(-1) - 1
                position_ids.masked_fill_(attention_mask == 0, 1)
                position_ids = position_ids.unsqueeze(0).expand(3, -1, -1).to(attention_mask.device)
                largest = position_ids.max(0, keepdim=False)[0].max(-1, keepdim=True)[0]
                return position_ids, largest + 1 - attention_mask.shape[-1]
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).view(1, 1, -1)
            position_ids = position_ids.expand(3, input_ids.shape[0], -1)
            return position_ids, torch.zeros([input_ids.shape[0], 1], device=input_ids.device, dtype=input_ids.dtype)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(input_ids.device)
        position_ids = torch.ones(3, *input_ids.shape, dtype=input_ids.dtype, device=input_ids.device)
        deltas = []
        image_index = video_index = 0
        for row, row_ids in enumerate(input_ids):
            real = row_ids[attention_mask[row] == 1]
            starts = torch.argwhere(real == start_token).squeeze(1)
            after_start = real[starts + 1]
            remaining_images = int((after_start == image_token).sum())
            remaining_videos = int((after_start == video_token).sum())
            tokens = real.tolist()
            pieces: List[torch.Tensor] = []
            cursor = 0
            for _ in range(remaining_images + remaining_videos):
                next_image = tokens.index(image_token, cursor) if image_token in tokens and remaining_images > 0 \
                    else len(tokens) + 1
                next_video = tokens.index(video_token, cursor) if video_token in tokens and remaining_videos > 0 \
                    else len(tokens) + 1
                if next_image < next_video:
                    t, h, w = image_grid_thw[image_index].tolist()
                    seconds = None
                    image_index += 1
                    remaining_images -= 1
                    end = next_image
                else:
                    t, h, w = video_grid_thw[video_index].tolist()
                    seconds = (second_per_grid_ts[video_index] if second_per_grid_ts is not None else 1.0)
                    video_index += 1
                    remaining_videos -= 1
                    end = next_video
                grid_h, grid_w = h // merge, w // merge
                text_length = end - cursor
                offset = pieces[-1].max() + 1 if pieces else 0
                pieces.append(torch.arange(text_length).view(1, -1).expand(3, -1) + offset)
                time = self.vision_time_positions(t, grid_h * grid_w, seconds)
                rows = torch.arange(grid_h).view(1, -1, 1).expand(t, -1, grid_w).flatten()
                cols = torch.arange(grid_w).view(1, 1, -1).expand(t, grid_h, -1).flatten()
                pieces.append(torch.stack([time, rows, cols]) + text_length + offset)
                cursor = end + t * grid_h * grid_w
            if cursor < len(tokens):
                offset = pieces[-1].max() + 1 if pieces else 0
                pieces.append(torch.arange(len(tokens) - cursor).view(1, -1).expand(3, -1) + offset)
            positions = torch.cat(pieces, dim=1).reshape(3, -1)
            position_ids[..., row, attention_mask[row] == 1] = positions.to(position_ids.device)
            deltas.append(positions.max() + 1 - len(row_ids))
        return position_ids, torch.tensor(deltas, device=input_ids.device).unsqueeze(1)

    # -- forward -----------------------------------------------------------------------------------
    def embed_visual(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, pixels: torch.Tensor,
                     grid_thw: torch.Tensor, token_id: int, what: str) -> torch.Tensor:
        """Put the vision tower's tokens for ``pixels`` at the positions of ``token_id`` in ``inputs_embeds``."""
        if grid_thw is None:
            raise ValueError(f"{what} pixel values need their grid_thw (the processor returns both)")
        features = self.visual(pixels.type(self.visual.get_dtype()), grid_thw=grid_thw)
        slots = input_ids == token_id
        if int(slots.sum()) != features.shape[0]:
            raise ValueError(f"{what} features and {what} tokens do not match: tokens: {int(slots.sum())}, "
                             f"features {features.shape[0]}; build the prompt with the processor, which expands each "
                             f"{what} placeholder to its token count")
        slots = slots.unsqueeze(-1).expand_as(inputs_embeds).to(inputs_embeds.device)
        return inputs_embeds.masked_scatter(slots, features.to(inputs_embeds.device, inputs_embeds.dtype))

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, pixel_values=None, pixel_values_videos=None, image_grid_thw=None,
                video_grid_thw=None, rope_deltas=None, cache_position=None, second_per_grid_ts=None):
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (self.config.output_hidden_states if output_hidden_states is None
                                else output_hidden_states)
        return_dict = self.config.use_return_dict if return_dict is None else return_dict
        if isinstance(past_key_values, (tuple, list)):
            past_key_values = DynamicCache.from_legacy_cache(past_key_values)
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
            if pixel_values is not None:
                inputs_embeds = self.embed_visual(input_ids, inputs_embeds, pixel_values, image_grid_thw,
                                                  self.config.image_token_id, "image")
            if pixel_values_videos is not None:
                inputs_embeds = self.embed_visual(input_ids, inputs_embeds, pixel_values_videos, video_grid_thw,
                                                  self.config.video_token_id, "video")
        if attention_mask is not None:
            attention_mask = attention_mask.to(inputs_embeds.device)
        if position_ids is None and (attention_mask is None or attention_mask.dim() == 2):
            past_length = cached_length(past_key_values)
            stored = getattr(past_key_values, "rope_deltas", None) if past_length else None
            if stored is None and past_length:
                stored = self.rope_deltas
            if (cache_position is not None and cache_position[0] == 0) or stored is None or past_length == 0:
                if input_ids is None and (image_grid_thw is not None or video_grid_thw is not None):
                    raise ValueError("the prefill needs input_ids to place the M-RoPE positions of the images "
                                     "(or pass position_ids of shape (3, batch, length))")
                ids = input_ids if input_ids is not None else torch.zeros(inputs_embeds.shape[:2], dtype=torch.long,
                                                                          device=inputs_embeds.device)
                position_ids, deltas = self.get_rope_index(ids, image_grid_thw, video_grid_thw, attention_mask,
                                                           second_per_grid_ts=second_per_grid_ts)
                self.rope_deltas = deltas
                if past_key_values is not None:
                    past_key_values.rope_deltas = deltas
            else:
                batch, length, _ = inputs_embeds.shape
                position_ids = torch.arange(length, device=inputs_embeds.device).view(1, -1).expand(batch, -1)
                if cache_position is not None:
                    delta = (cache_position[0] + stored).to(inputs_embeds.device)
                    position_ids = position_ids.add(delta.repeat_interleave(batch // delta.shape[0], dim=0))
                position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
            past_key_values.rope_deltas = self.rope_deltas
        outputs = self.model(input_ids=None, position_ids=position_ids, attention_mask=attention_mask,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                             output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                             return_dict=True, cache_position=cache_position)
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            shifted = logits.float()[..., :-1, :].contiguous().view(-1, self.config.vocab_size)
            loss = F.cross_entropy(shifted, labels[..., 1:].contiguous().view(-1).to(shifted.device))
        if not return_dict:
            output = (logits,) + tuple(v for v in (outputs.past_key_values, outputs.hidden_states, outputs.attentions)
                                       if v is not None)
            return (loss,) + output if loss is not None else output
        return Qwen2VLCausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                             hidden_states=outputs.hidden_states, attentions=outputs.attentions,
                                             rope_deltas=self.rope_deltas)

    # -- generation (transformers 4.40's GenerationMixin) --------------------------------------------
    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, inputs_embeds=None,
                                      cache_position=None, use_cache=True, pixel_values=None,
                                      pixel_values_videos=None, image_grid_thw=None, video_grid_thw=None,
                                      second_per_grid_ts=None, **kwargs):
        past_length = cached_length(past_key_values)
        if past_length:
            input_ids = input_ids[:, past_length:]
        if cache_position is None or cache_position.shape[0] != input_ids.shape[1]:
            cache_position = torch.arange(past_length, past_length + input_ids.shape[1], device=input_ids.device)
        if inputs_embeds is not None and past_length == 0:
            model_inputs: Dict[str, Any] = {"inputs_embeds": inputs_embeds, "input_ids": None}
        else:
            model_inputs = {"input_ids": input_ids.contiguous()}
        prefill = int(cache_position[0]) == 0
        model_inputs.update({
            "past_key_values": past_key_values, "attention_mask": attention_mask, "use_cache": use_cache,
            "cache_position": cache_position, "position_ids": None,
            "pixel_values": pixel_values if prefill else None,
            "pixel_values_videos": pixel_values_videos if prefill else None,
            "image_grid_thw": image_grid_thw, "video_grid_thw": video_grid_thw,
            "second_per_grid_ts": second_per_grid_ts,
        })
        return model_inputs

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False,
                                      input_ids: Optional[torch.LongTensor] = None, **model_kwargs):
        """Repeat each sample ``expand_size`` times (beams, num_return_sequences); the visual inputs have no
        batch dimension (patches of all images in a row), so they are repeated per sample."""
        if expand_size == 1:
            return input_ids, model_kwargs
        if input_ids is not None and input_ids.numel():
            start = self.config.vision_start_token_id
            follows_start = torch.roll(input_ids == start, shifts=1, dims=1)
            for pixels_key, grid_key, token in (("pixel_values", "image_grid_thw", self.config.image_token_id),
                                                ("pixel_values_videos", "video_grid_thw", self.config.video_token_id)):
                grid = model_kwargs.get(grid_key)
                if grid is None:
                    continue
                per_sample = torch.sum(follows_start & (input_ids == token), dim=1).tolist()
                grids = torch.split(grid, per_sample)
                if model_kwargs.get(pixels_key) is not None:
                    patches = [int(torch.prod(g, dim=1).sum()) for g in grids]
                    model_kwargs[pixels_key] = torch.cat(
                        [p.repeat(expand_size, 1) for p in torch.split(model_kwargs[pixels_key], patches)])
                model_kwargs[grid_key] = torch.cat([g.repeat(expand_size, 1) for g in grids])
                if grid_key == "video_grid_thw" and model_kwargs.get("second_per_grid_ts") is not None:
                    seconds = list(model_kwargs["second_per_grid_ts"])
                    bounds = [sum(per_sample[:i]) for i in range(len(per_sample) + 1)]
                    model_kwargs["second_per_grid_ts"] = [s for i in range(len(per_sample)) for _ in range(expand_size)
                                                          for s in seconds[bounds[i]:bounds[i + 1]]]
            input_ids = input_ids.repeat_interleave(expand_size, dim=0)
        visual = {"pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"}
        for key, value in model_kwargs.items():
            if key != "cache_position" and key not in visual and isinstance(value, torch.Tensor):
                model_kwargs[key] = value.repeat_interleave(expand_size, dim=0)
        return input_ids, model_kwargs
