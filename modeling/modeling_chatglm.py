"""GLM-4V-9b (``ChatGLMForConditionalGeneration``) for ``trust_remote_code`` checkpoints, written for hallupatch.

A drop-in replacement for the checkpoint's own ``modeling_chatglm.py``: the same module names,
state-dict keys and shapes, config fields and sibling imports (``configuration_chatglm``, ``visual``),
the same arithmetic (batch-first layout, multi-query attention through ``scaled_dot_product_attention``,
GLM's interleaved rotary embedding on half of each head, RMSNorm, SwiGLU) and the same generation
interface: ``model.generate(**tokenizer.apply_chat_template(..., return_dict=True))`` with ``images``,
``position_ids`` and ``attention_mask``, the image's 1600 patch positions sharing one position id.

Left out on purpose: flash-attention and the explicit-softmax attention class (attention is always
``scaled_dot_product_attention``, upstream's default under transformers 4.40 and torch 2), quantisation,
prefix tuning (``pre_seq_len``), gradient checkpointing, sequence classification. Two fixes of crashes: the attention mask is widened for the image patches only
when the batch has images (upstream also widened it for text-only prompts, which fails on padded batches),
and a direct ``model(input_ids, images=..., attention_mask=...)`` call with a token-level mask gets it
widened too (upstream needed the widened mask that ``generate`` builds).

MemVR (or another hallupatch method) is switched on by a ``"hallupatch"`` block in ``config.json``,
for example ``{"hallupatch": {"method": "memvr", "retracing_ratio": 0.28}}``; the block is handed to
``hallupatch.apply`` once the model is built, so the algorithm itself lives only in hallupatch.
"""
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_chatglm import ChatGLMConfig
from .visual import EVA2CLIPModel


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


def is_empty(images: Any) -> bool:
    """No images: ``None``, empty, or only ``None`` entries."""
    return images is None or len(images) == 0 or all(image is None for image in images)


def num_image_patches(config) -> int:
    """Patch tokens per image after the vision tower's 2x2 downsampling (1600 for GLM-4V-9b)."""
    return (config.vision_config["image_size"] // config.vision_config["patch_size"] // 2) ** 2


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, normalized_shape, eps=1e-5, device=None, dtype=None, **kwargs):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(normalized_shape, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return (self.weight * (hidden_states * torch.rsqrt(variance + self.eps))).to(input_dtype)


class RotaryEmbedding(nn.Module):
    """GLM's rotary table: ``(seq_len, dim/2, 2)`` of (cos, sin), base ``10000 * rope_ratio``."""

    def __init__(self, dim, rope_ratio=1, original_impl=True, device=None, dtype=None):
        super().__init__()
        if not original_impl:
            raise ValueError("only GLM's original rotary implementation (config.original_rope=True) is supported")
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=device).to(dtype=dtype) / dim))
        self.register_buffer("inv_freq", inv_freq)   # persistent: it is in the released checkpoints
        self.dim = dim
        self.rope_ratio = rope_ratio

    def forward(self, max_seq_len: int) -> torch.Tensor:
        base = 10000 * self.rope_ratio
        device = self.inv_freq.device
        theta = 1.0 / (base ** (torch.arange(0, self.dim, 2, dtype=torch.float, device=device) / self.dim))
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float, device=device), theta).float()
        cache = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
        if self.inv_freq.dtype in (torch.float16, torch.bfloat16, torch.int8):  # mimic complex32 rounding
            cache = cache.bfloat16() if self.inv_freq.dtype == torch.bfloat16 else cache.half()
        return cache


def apply_rotary_pos_emb(x: torch.Tensor, rope_cache: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of the first ``2 * rope_cache.shape[-2]`` channels.

    ``x``: (batch, heads, seq, head_dim); ``rope_cache``: (batch, >=seq, rot_dim/2, 2).
    """
    batch, heads, seq, _ = x.shape
    rot_dim = rope_cache.shape[-2] * 2
    x, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    pairs = x.reshape(batch, heads, seq, rot_dim // 2, 2)
    cache = rope_cache[:, :seq].view(-1, 1, seq, pairs.size(3), 2)
    rotated = torch.stack(
        [
            pairs[..., 0] * cache[..., 0] - pairs[..., 1] * cache[..., 1],
            pairs[..., 1] * cache[..., 0] + pairs[..., 0] * cache[..., 1],
        ],
        -1,
    ).flatten(3)
    return torch.cat((rotated, x_pass), dim=-1)


def _dtype(config) -> Dict[str, Any]:
    return {"dtype": config.torch_dtype}


class SelfAttention(nn.Module):
    """Multi-query self-attention; the KV cache holds the un-expanded key/value groups."""

    def __init__(self, config: ChatGLMConfig, layer_number: int, device=None):
        super().__init__()
        self.layer_number = max(1, layer_number)
        self.num_heads = config.num_attention_heads
        self.head_dim = config.kv_channels
        self.projection_size = config.kv_channels * config.num_attention_heads
        self.multi_query_attention = config.multi_query_attention
        self.num_groups = config.multi_query_group_num if self.multi_query_attention else self.num_heads
        qkv_size = self.projection_size + 2 * self.head_dim * self.num_groups
        self.query_key_value = nn.Linear(config.hidden_size, qkv_size,
                                         bias=config.add_bias_linear or config.add_qkv_bias,
                                         device=device, **_dtype(config))
        self.attention_dropout = config.attention_dropout
        self.dense = nn.Linear(self.projection_size, config.hidden_size, bias=config.add_bias_linear,
                               device=device, **_dtype(config))

    def forward(self, hidden_states, attention_mask, rotary_pos_emb, kv_cache=None, use_cache=True):
        batch, seq = hidden_states.shape[:2]
        mixed = self.query_key_value(hidden_states)
        if self.multi_query_attention:
            group_size = self.num_groups * self.head_dim
            query, key, value = mixed.split([self.projection_size, group_size, group_size], dim=-1)
            query = query.view(batch, seq, self.num_heads, self.head_dim)
            key = key.view(batch, seq, self.num_groups, self.head_dim)
            value = value.view(batch, seq, self.num_groups, self.head_dim)
        else:
            query, key, value = mixed.view(batch, seq, self.num_heads, 3 * self.head_dim).split(self.head_dim, -1)
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))   # (batch, heads, seq, dim)

        if rotary_pos_emb is not None:
            query = apply_rotary_pos_emb(query, rotary_pos_emb)
            key = apply_rotary_pos_emb(key, rotary_pos_emb)
        if kv_cache is not None:
            key = torch.cat((kv_cache[0], key), dim=2)
            value = torch.cat((kv_cache[1], value), dim=2)
        kv_cache = (key, value) if use_cache else None
        if self.multi_query_attention:   # each key/value group serves num_heads / num_groups query heads
            repeat = self.num_heads // self.num_groups
            key, value = (
                t.unsqueeze(2).expand(-1, -1, repeat, -1, -1).contiguous().view(batch, self.num_heads, -1, self.head_dim)
                for t in (key, value)
            )

        dropout = self.attention_dropout if self.training else 0.0
        if attention_mask is None and query.shape[2] == key.shape[2]:
            context = F.scaled_dot_product_attention(query, key, value, is_causal=True, dropout_p=dropout)
        else:
            mask = None if attention_mask is None else ~attention_mask   # ours: True = masked
            context = F.scaled_dot_product_attention(query, key, value, mask, dropout_p=dropout)
        context = context.transpose(1, 2).contiguous().reshape(batch, seq, self.projection_size)
        return self.dense(context), kv_cache


class MLP(nn.Module):
    """SwiGLU feed-forward: ``dense_4h_to_h(silu(a) * b)`` with ``[a, b] = dense_h_to_4h(x)``."""

    def __init__(self, config: ChatGLMConfig, device=None):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.ffn_hidden_size * 2, bias=config.add_bias_linear,
                                       device=device, **_dtype(config))
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear,
                                       device=device, **_dtype(config))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, up = torch.chunk(self.dense_h_to_4h(hidden_states), 2, dim=-1)
        return self.dense_4h_to_h(F.silu(gate) * up)


class GLMBlock(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_number: int, device=None):
        super().__init__()
        self.layer_number = layer_number
        self.apply_residual_connection_post_layernorm = config.apply_residual_connection_post_layernorm
        norm = RMSNorm if config.rmsnorm else nn.LayerNorm
        self.input_layernorm = norm(config.hidden_size, eps=config.layernorm_epsilon, device=device,
                                    dtype=config.torch_dtype)
        self.self_attention = SelfAttention(config, layer_number, device=device)
        self.hidden_dropout = config.hidden_dropout
        self.post_attention_layernorm = norm(config.hidden_size, eps=config.layernorm_epsilon, device=device,
                                             dtype=config.torch_dtype)
        self.mlp = MLP(config, device=device)

    def forward(self, hidden_states, attention_mask, rotary_pos_emb, kv_cache=None, use_cache=True):
        normed = self.input_layernorm(hidden_states)
        attention_output, kv_cache = self.self_attention(normed, attention_mask, rotary_pos_emb,
                                                         kv_cache=kv_cache, use_cache=use_cache)
        residual = normed if self.apply_residual_connection_post_layernorm else hidden_states
        hidden_states = residual + F.dropout(attention_output, p=self.hidden_dropout, training=self.training)
        normed = self.post_attention_layernorm(hidden_states)
        residual = normed if self.apply_residual_connection_post_layernorm else hidden_states
        output = residual + F.dropout(self.mlp(normed), p=self.hidden_dropout, training=self.training)
        return output, kv_cache


class GLMTransformer(nn.Module):
    """The decoder stack. As upstream, the last ``hidden_states`` entry is taken *before* the final norm."""

    def __init__(self, config: ChatGLMConfig, device=None):
        super().__init__()
        self.num_layers = config.num_layers
        self.post_layer_norm = config.post_layer_norm
        self.layers = nn.ModuleList([GLMBlock(config, i + 1, device=device) for i in range(self.num_layers)])
        if self.post_layer_norm:
            norm = RMSNorm if config.rmsnorm else nn.LayerNorm
            self.final_layernorm = norm(config.hidden_size, eps=config.layernorm_epsilon, device=device,
                                        dtype=config.torch_dtype)
        self.gradient_checkpointing = False

    def forward(self, hidden_states, attention_mask, rotary_pos_emb, kv_caches=None, use_cache: bool = True,
                output_hidden_states: bool = False):
        kv_caches = kv_caches or [None] * self.num_layers
        presents = () if use_cache else None
        all_hidden_states = () if output_hidden_states else None
        for layer, kv_cache in zip(self.layers, kv_caches):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states, kv_cache = layer(hidden_states, attention_mask, rotary_pos_emb, kv_cache=kv_cache,
                                            use_cache=use_cache)
            if use_cache:
                presents += (kv_cache,)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        if self.post_layer_norm:
            hidden_states = self.final_layernorm(hidden_states)
        return hidden_states, presents, all_hidden_states, None


class ChatGLMPreTrainedModel(PreTrainedModel):
    is_parallelizable = False
    supports_gradient_checkpointing = False
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["GLMBlock"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module):
        """As upstream: no initialisation (the weights come from the checkpoint)."""
        return

    def get_masks(self, input_embeds, past_key_values, padding_mask=None):
        """Boolean (batch, 1, q, past + q) mask, True = masked: causal, padded keys masked, and (in a
        prefill) padded query rows left fully open so that no softmax row is empty."""
        batch, seq = input_embeds.shape[:2]
        mask = torch.ones(batch, seq, seq, device=input_embeds.device).tril_()
        past_length = past_key_values[0][0].shape[2] if past_key_values else 0
        if past_length:
            mask = torch.cat((torch.ones(batch, seq, past_length, device=input_embeds.device), mask), dim=-1)
        if padding_mask is not None:
            mask = mask * padding_mask.unsqueeze(1)
            if not past_length:
                mask -= padding_mask.unsqueeze(-1) - 1
        return (mask < 0.5).bool().unsqueeze(1)

    def widen_for_images(self, input_ids: torch.Tensor, values: torch.Tensor, fill: int) -> torch.Tensor:
        """A per-token tensor (attention mask, labels) widened to the merged sequence: ``fill`` at the
        image's patch rows, the ``<boi>``/``<eoi>`` entries kept for the vision tower's boi/eoi rows."""
        num_patches = num_image_patches(self.config)
        rows = []
        for i, row in enumerate(input_ids.tolist()):
            boi, eoi = row.index(self.config.boi_token_id), row.index(self.config.eoi_token_id)
            rows.append(torch.cat((values[i, :boi + 1], values.new_full((num_patches,), fill), values[i, eoi:])))
        return torch.stack(rows)

    def get_position_ids(self, input_ids, device):
        batch, seq = input_ids.shape
        return torch.arange(seq, dtype=torch.long, device=device).unsqueeze(0).repeat(batch, 1)


class Embedding(nn.Module):
    def __init__(self, config: ChatGLMConfig, device=None):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size,
                                            dtype=config.torch_dtype, device=device)
        self.fp32_residual_connection = config.fp32_residual_connection

    def forward(self, input_ids):
        embeddings = self.word_embeddings(input_ids)
        return embeddings.float() if self.fp32_residual_connection else embeddings


def _build(empty_init: bool):
    return skip_init if empty_init else (lambda cls, *args, **kwargs: cls(*args, **kwargs))


# ---------------------------------------------------------------------------------------------
# Decoder stack with the vision tower
# ---------------------------------------------------------------------------------------------
class ChatGLMModel(ChatGLMPreTrainedModel):
    def __init__(self, config: ChatGLMConfig, device=None, empty_init=True):
        super().__init__(config)
        if config.pre_seq_len is not None:
            raise NotImplementedError("prefix tuning (pre_seq_len) is not supported by this modeling file")
        build = _build(empty_init)
        device_kwargs = {"device": device} if device is not None else {}
        self.embedding = build(Embedding, config, **device_kwargs)
        self.num_layers = config.num_layers
        self.multi_query_group_num = config.multi_query_group_num
        self.kv_channels = config.kv_channels
        self.seq_length = config.seq_length
        rotary_dim = config.hidden_size // config.num_attention_heads if config.kv_channels is None else config.kv_channels
        self.rotary_pos_emb = RotaryEmbedding(rotary_dim // 2, rope_ratio=config.rope_ratio,
                                              original_impl=config.original_rope, device=device,
                                              dtype=config.torch_dtype)
        self.encoder = build(GLMTransformer, config, **device_kwargs)
        self.output_layer = build(nn.Linear, config.hidden_size, config.padded_vocab_size, bias=False,
                                  dtype=config.torch_dtype, **device_kwargs)
        self.pre_seq_len = None
        self.vision = EVA2CLIPModel(config)

    def get_input_embeddings(self):
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.embedding.word_embeddings = value

    def merge_images(self, input_ids, images, position_ids):
        """Replace each row's ``<boi> x <eoi>`` by the vision tower's rows (its own boi, patches, eoi);
        the patches share the position id after ``<boi>``, ``<eoi>`` keeps its own."""
        num_patches = num_image_patches(self.config)
        if len(input_ids) != len(images):
            raise ValueError(f"one image per row is needed: {len(input_ids)} rows, {len(images)} images")
        inputs_embeds = self.embedding(input_ids)
        features = self.vision(images.to(dtype=inputs_embeds.dtype))
        if position_ids is None:
            position_ids = self.get_position_ids(input_ids, device=inputs_embeds.device)
        new_embeds, new_positions = [], []
        for i, row in enumerate(input_ids.tolist()):
            boi, eoi = row.index(self.config.boi_token_id), row.index(self.config.eoi_token_id)
            if eoi - boi != 2:
                raise ValueError("an image must be written as <boi> one placeholder token <eoi>")
            new_embeds.append(torch.cat((inputs_embeds[i, :boi], features[i].to(inputs_embeds.device),
                                         inputs_embeds[i, eoi + 1:])))
            new_positions.append(torch.cat((position_ids[i, :boi + 1],
                                            position_ids[i, boi + 1].repeat(num_patches),
                                            position_ids[i, eoi:])))
        return torch.stack(new_embeds), torch.stack(new_positions)

    def forward(
        self,
        input_ids: torch.LongTensor = None,
        images: torch.Tensor = None,
        position_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.BoolTensor] = None,
        full_attention_mask: Optional[torch.BoolTensor] = None,
        past_key_values: Optional[Tuple[Tuple[torch.Tensor, torch.Tensor], ...]] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ):
        if past_key_values is None and not is_empty(images):
            if input_ids is None or inputs_embeds is not None:
                raise ValueError("with images, pass input_ids (not inputs_embeds)")
            if attention_mask is not None and attention_mask.shape[1] == input_ids.shape[1]:
                attention_mask = self.widen_for_images(input_ids, attention_mask, 1)   # a direct call
            inputs_embeds, position_ids = self.merge_images(input_ids, images, position_ids)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        seq_length = input_ids.shape[1]
        if inputs_embeds is None:
            inputs_embeds = self.embedding(input_ids)
        if full_attention_mask is None:
            if (attention_mask is not None and not attention_mask.all()) or (past_key_values and seq_length != 1):
                full_attention_mask = self.get_masks(inputs_embeds, past_key_values, padding_mask=attention_mask)
        rotary_pos_emb = self.rotary_pos_emb(self.seq_length)
        rotary_pos_emb = rotary_pos_emb[position_ids] if position_ids is not None else rotary_pos_emb[None, :seq_length]
        hidden_states, presents, all_hidden_states, all_attentions = self.encoder(
            inputs_embeds, full_attention_mask, rotary_pos_emb=rotary_pos_emb, kv_caches=past_key_values,
            use_cache=use_cache, output_hidden_states=output_hidden_states,
        )
        if not return_dict:
            return tuple(v for v in [hidden_states, presents, all_hidden_states, all_attentions] if v is not None)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=presents,
                                       hidden_states=all_hidden_states, attentions=all_attentions)


# ---------------------------------------------------------------------------------------------
# The conditional-generation model
# ---------------------------------------------------------------------------------------------
class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel):
    def __init__(self, config: ChatGLMConfig, empty_init=True, device=None):
        super().__init__(config)
        self.max_sequence_length = config.max_length
        self.transformer = ChatGLMModel(config, empty_init=empty_init, device=device)
        self.config = config
        apply_hallupatch_block(self)

    def _update_model_kwargs_for_generation(self, outputs: ModelOutput, model_kwargs: Dict[str, Any],
                                            is_encoder_decoder: bool = False,
                                            standardize_cache_format: bool = False) -> Dict[str, Any]:
        model_kwargs["past_key_values"] = self._extract_past_from_model_output(
            outputs, standardize_cache_format=standardize_cache_format)
        if "attention_mask" in model_kwargs:
            mask = model_kwargs["attention_mask"]
            model_kwargs["attention_mask"] = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        if "position_ids" in model_kwargs:
            positions = model_kwargs["position_ids"]
            model_kwargs["position_ids"] = torch.cat([positions, positions[..., -1:] + 1], dim=-1)
        model_kwargs["is_first_forward"] = False
        return model_kwargs

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, images: Optional[torch.Tensor] = None,
                                      past_key_values: Optional[torch.Tensor] = None,
                                      attention_mask: Optional[torch.Tensor] = None,
                                      position_ids: Optional[torch.Tensor] = None, use_cache: Optional[bool] = None,
                                      is_first_forward: bool = True, **kwargs) -> dict:
        if position_ids is None:
            position_ids = self.get_position_ids(input_ids, device=input_ids.device)
        if attention_mask is not None and not is_empty(images):
            attention_mask = self.widen_for_images(input_ids, attention_mask, 1)
        if not is_first_forward and past_key_values is not None:
            position_ids = position_ids[..., -1:]
            input_ids = input_ids[:, -1:]
        return {
            "input_ids": input_ids,
            "images": images,
            "past_key_values": past_key_values,
            "position_ids": position_ids,
            "attention_mask": attention_mask,
            "return_last_logit": True,
            "use_cache": use_cache,
        }

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        images: List[List[torch.Tensor]] = None,
        position_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[Tuple[torch.FloatTensor]] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        return_last_logit: Optional[bool] = False,
    ):
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        transformer_outputs = self.transformer(
            input_ids=input_ids, images=images, position_ids=position_ids, attention_mask=attention_mask,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_hidden_states=output_hidden_states, return_dict=return_dict,
        )
        hidden_states = transformer_outputs[0]
        if return_last_logit:
            hidden_states = hidden_states[:, -1:]
        lm_logits = self.transformer.output_layer(hidden_states)

        loss = None
        if labels is not None:
            if not is_empty(images):   # the image rows are never predicted
                labels = self.widen_for_images(input_ids, labels, -100)
            lm_logits = lm_logits.to(torch.float32)
            loss = F.cross_entropy(lm_logits[..., :-1, :].reshape(-1, lm_logits.size(-1)),
                                   labels[..., 1:].reshape(-1), ignore_index=-100)
            lm_logits = lm_logits.to(hidden_states.dtype)
            loss = loss.to(hidden_states.dtype)
        if not return_dict:
            output = (lm_logits,) + tuple(transformer_outputs[1:])
            return ((loss,) + output) if loss is not None else output
        return CausalLMOutputWithPast(
            loss=loss, logits=lm_logits, past_key_values=transformer_outputs.past_key_values,
            hidden_states=transformer_outputs.hidden_states, attentions=transformer_outputs.attentions,
        )

    @staticmethod
    def _reorder_cache(past, beam_idx):
        return tuple(
            (layer[0].index_select(0, beam_idx.to(layer[0].device)),
             layer[1].index_select(0, beam_idx.to(layer[1].device)))
            for layer in past
        )
