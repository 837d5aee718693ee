"""Qwen-VL-Chat (``QWenLMHeadModel``) for ``trust_remote_code`` checkpoints, written for hallupatch.

A drop-in replacement for the checkpoint's own ``modeling_qwen.py``: the same module names, state-dict
keys and shapes, config fields and sibling imports (``configuration_qwen``, ``qwen_generation_utils``,
``visual``), the same arithmetic (rotary embedding on positions ``0..kv_len-1``, dynamic NTK, logn
attention scaling, additive causal + padding mask, attention softmax in the model's dtype) and the same
public methods (``chat``, ``chat_stream``, ``generate`` with ``stop_words_ids``).

Left out on purpose: flash-attention, fused kernels, KV-cache quantisation and gradient checkpointing.
``chat_stream`` streams with transformers' own streamer interface instead of ``transformers_stream_generator``.

MemVR (or another hallupatch method) is switched on by a ``"hallupatch"`` block in ``config.json``,
for example ``{"hallupatch": {"method": "memvr", "retracing_ratio": 0.28}}``; the block is handed to
``hallupatch.apply`` once the model is built, so the algorithm itself lives only in hallupatch.
"""
import math
import queue
import threading
from typing import Any, Generator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, PreTrainedTokenizer
from transformers.generation.logits_process import LogitsProcessorList
from transformers.generation.streamers import BaseStreamer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel

from .configuration_qwen import QWenConfig
from .qwen_generation_utils import (
    HistoryType,
    StopWordsLogitsProcessor,
    decode_tokens,
    get_stop_words_ids,
    make_context,
)
from .visual import VisionTransformer

_SENTINEL = object()
_BAD_CHAT_FORMAT = (
    "chat() needs a chat model: generation_config.chat_format must be 'chatml' (use Qwen/Qwen-VL-Chat, "
    "not the pretrained Qwen/Qwen-VL)."
)
_STREAM_IN_CHAT = "chat(..., stream=True) is not supported; use chat_stream(...) instead."


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


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions ``0..n-1``; recomputed when longer tables or a new NTK factor are needed.

    The frequencies are a plain attribute (not a buffer), as upstream: they stay on the CPU in float32.
    """

    def __init__(self, dim: int, base: float = 10000):
        super().__init__()
        self.dim = dim
        self.base = base
        self.inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        self._cos_sin: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self._seq_len_cached = 0
        self._ntk_alpha_cached = 1.0

    def forward(self, seq_len: int, ntk_alpha: float = 1.0) -> List[torch.Tensor]:
        if seq_len > self._seq_len_cached or ntk_alpha != self._ntk_alpha_cached:
            base = self.base * ntk_alpha ** (self.dim / (self.dim - 2))
            self.inv_freq = 1.0 / (base ** (torch.arange(0, self.dim, 2).float() / self.dim))
            self._seq_len_cached = max(2 * seq_len, 16)
            self._ntk_alpha_cached = ntk_alpha
            positions = torch.arange(self._seq_len_cached).type_as(self.inv_freq)
            freqs = torch.outer(positions, self.inv_freq)
            table = torch.cat((freqs, freqs), dim=-1)[None, :, None, :]   # (1, n, 1, dim)
            self._cos_sin = (table.cos(), table.sin())
        cos, sin = self._cos_sin
        return [cos[:, :seq_len], sin[:, :seq_len]]


def apply_rotary_pos_emb(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of ``t`` (batch, seq, heads, dim) in float32."""
    rot_dim = cos.shape[-1]
    rotated, passed = t[..., :rot_dim].float(), t[..., rot_dim:].float()
    first, second = rotated.chunk(2, dim=-1)
    rotated = rotated * cos + torch.cat((-second, first), dim=-1) * sin
    return torch.cat((rotated, passed), dim=-1).type_as(t)


_LOGN_TABLES = {}


def logn_table(seq_length: int) -> torch.Tensor:
    """``log_seq_length(i)`` for positions ``i = 1..32767`` beyond the training length, else 1 (float32)."""
    if seq_length not in _LOGN_TABLES:
        values = [math.log(i, seq_length) if i > seq_length else 1 for i in range(1, 32768)]
        _LOGN_TABLES[seq_length] = torch.tensor(values)[None, :, None, None]
    return _LOGN_TABLES[seq_length]


def attention_bias(
    attention_mask: Optional[torch.Tensor], batch: int, q_len: int, past_len: int, dtype, device
) -> Optional[torch.Tensor]:
    """Additive (batch, 1, q_len, past_len + q_len) mask: causal for multi-token passes, plus padding."""
    minimum = torch.finfo(dtype).min
    bias = None
    if q_len > 1:
        causal = torch.full((q_len, q_len), minimum, dtype=dtype, device=device)
        causal.masked_fill_(torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril(), 0)
        causal = torch.cat([torch.zeros(q_len, past_len, dtype=dtype, device=device), causal], dim=-1)
        bias = causal[None, None].expand(batch, 1, q_len, q_len + past_len)
    if attention_mask is not None:
        keep = attention_mask[:, None, None, :].expand(batch, 1, q_len, attention_mask.shape[-1]).to(dtype)
        padding = (1.0 - keep).masked_fill((1.0 - keep).bool(), minimum)
        bias = padding if bias is None else padding + bias
    return bias


class QWenAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.seq_length = config.seq_length
        self.split_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        projection_size = config.kv_channels * config.num_attention_heads
        self.c_attn = nn.Linear(config.hidden_size, 3 * projection_size)
        self.c_proj = nn.Linear(config.hidden_size, projection_size, bias=not config.no_bias)
        self.use_logn_attn = config.use_logn_attn
        self.attn_dropout = nn.Dropout(config.attn_dropout_prob)

    def forward(self, hidden_states, rotary_pos_emb=None, layer_past=None, attention_mask=None,
                use_cache=False, output_attentions=False):
        batch, q_len = hidden_states.shape[:2]
        shape = (batch, q_len, self.num_heads, self.head_dim)
        query, key, value = (t.view(shape) for t in self.c_attn(hidden_states).split(self.split_size, dim=2))
        if rotary_pos_emb is not None:
            cos, sin = (t[:, -q_len:] for t in rotary_pos_emb)
            query, key = apply_rotary_pos_emb(query, cos, sin), apply_rotary_pos_emb(key, cos, sin)
        if layer_past is not None:  # cache layout: (batch, seq, heads, head_dim)
            key = torch.cat((layer_past[0], key), dim=1)
            value = torch.cat((layer_past[1], value), dim=1)
        present = (key, value) if use_cache else None
        if self.use_logn_attn and not self.training:
            start, end = key.size(1) - q_len, key.size(1)
            query = query * logn_table(self.seq_length)[:, start:end].to(query.device).type_as(query)

        query, key, value = (t.permute(0, 2, 1, 3) for t in (query, key, value))
        weights = torch.matmul(query, key.transpose(-1, -2))
        weights = weights / torch.full([], value.size(-1) ** 0.5, dtype=weights.dtype, device=weights.device)
        if attention_mask is not None:
            weights = weights + attention_mask
        weights = self.attn_dropout(F.softmax(weights, dim=-1).type(value.dtype))
        context = torch.matmul(weights, value).transpose(1, 2).contiguous().view(batch, q_len, -1)
        outputs = (self.c_proj(context), present)
        return outputs + (weights,) if output_attentions else outputs


class QWenMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        inner = config.intermediate_size // 2
        self.w1 = nn.Linear(config.hidden_size, inner, bias=not config.no_bias)
        self.w2 = nn.Linear(config.hidden_size, inner, bias=not config.no_bias)
        self.c_proj = nn.Linear(inner, config.hidden_size, bias=not config.no_bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(hidden_states) * F.silu(self.w2(hidden_states)))


class QWenBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = QWenAttention(config)
        self.ln_2 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = QWenMLP(config)

    def forward(self, hidden_states, rotary_pos_emb=None, layer_past=None, attention_mask=None,
                use_cache=False, output_attentions=False):
        attn_outputs = self.attn(self.ln_1(hidden_states), rotary_pos_emb, layer_past=layer_past,
                                 attention_mask=attention_mask, use_cache=use_cache,
                                 output_attentions=output_attentions)
        hidden_states = hidden_states + attn_outputs[0]
        hidden_states = hidden_states + self.mlp(self.ln_2(hidden_states))
        rest = attn_outputs[1:] if use_cache else attn_outputs[2:]
        return (hidden_states,) + rest


class QWenPreTrainedModel(PreTrainedModel):
    config_class = QWenConfig
    base_model_prefix = "transformer"
    is_parallelizable = False
    supports_gradient_checkpointing = False
    _no_split_modules = ["QWenBlock"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, RMSNorm):
            module.weight.data.fill_(1.0)
        for name, p in module.named_parameters():
            if name == "c_proj.weight":
                p.data.normal_(mean=0.0, std=std / math.sqrt(2 * self.config.num_hidden_layers))


# ---------------------------------------------------------------------------------------------
# Decoder stack with the visual encoder
# ---------------------------------------------------------------------------------------------
class QWenModel(QWenPreTrainedModel):
    _keys_to_ignore_on_load_missing = ["attn.masked_bias"]

    def __init__(self, config):
        super().__init__(config)
        self.use_dynamic_ntk = config.use_dynamic_ntk
        self.seq_length = config.seq_length
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.emb_dropout_prob)
        rotary_dim = config.kv_channels if config.rotary_pct == 1.0 else int(config.kv_channels * config.rotary_pct)
        self.rotary_emb = RotaryEmbedding(rotary_dim, base=config.rotary_emb_base)
        self.h = nn.ModuleList([QWenBlock(config) for _ in range(config.num_hidden_layers)])
        self.ln_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.visual = VisionTransformer(**config.visual)
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, new_embeddings):
        self.wte = new_embeddings

    def find_images(self, input_ids: torch.Tensor) -> Tuple[List[Tuple[int, int, int]], List[str]]:
        """``(row, <img> position, </img> position)`` of every image and its path, in row-major order.

        The path is written as bytes between ``<img>`` and ``</img>``, padded with ``image_start_id + 2``.
        """
        start_id = self.config.visual["image_start_id"]
        starts, ends = torch.where(input_ids == start_id), torch.where(input_ids == start_id + 1)
        if not bool((starts[0] == ends[0]).all()):
            raise ValueError("every <img> token needs a matching </img> token in the same row")
        spans, paths = [], []
        for row, start, end in zip(starts[0].tolist(), starts[1].tolist(), ends[1].tolist()):
            path_ids = input_ids[row][start + 1:end - 1].tolist()
            paths.append(bytes(path_ids[:path_ids.index(start_id + 2)]).decode("utf-8"))
            spans.append((row, start, end))
        return spans, paths

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Tuple[Tuple[torch.Tensor]]] = None,
        attention_mask: Optional[torch.FloatTensor] = None,
        token_type_ids: Optional[torch.LongTensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        head_mask: Optional[torch.FloatTensor] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        encoder_attention_mask: Optional[torch.FloatTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ):
        """Like upstream; ``token_type_ids``/``position_ids`` are accepted and unused (rotary positions are
        ``0..kv_len-1``), ``head_mask`` and the encoder arguments are not supported."""
        if head_mask is not None:
            raise NotImplementedError("head_mask is not supported by this modeling file")
        spans, images = [], None
        if past_key_values is None and input_ids is not None:
            spans, paths = self.find_images(input_ids)
            if paths:
                images = self.visual.encode(paths)   # (num_images, 256, hidden)

        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        batch, q_len = inputs_embeds.shape[:2]

        past_len = 0 if past_key_values is None else past_key_values[0][0].size(1)
        if past_key_values is None:
            past_key_values = (None,) * len(self.h)
        if attention_mask is not None:
            attention_mask = attention_mask.view(batch, -1)
        bias = attention_bias(attention_mask, batch, q_len, past_len, inputs_embeds.dtype, inputs_embeds.device)

        kv_len = past_len + q_len
        if self.use_dynamic_ntk and past_len == 0 and not self.training:
            ntk_alpha = max(2 ** math.ceil(math.log(kv_len / self.seq_length, 2) + 1) - 1, 1)
        else:
            ntk_alpha = self.rotary_emb._ntk_alpha_cached
        rotary_pos_emb = [t.to(inputs_embeds.device) for t in self.rotary_emb(kv_len, ntk_alpha=ntk_alpha)]

        hidden_states = self.drop(inputs_embeds).clone()
        for index, (row, start, end) in enumerate(spans):
            hidden_states[row][start + 1:end] = images[index]

        presents = () if use_cache else None
        all_attentions = () if output_attentions else None
        all_hidden_states = () if output_hidden_states else None
        for block, layer_past in zip(self.h, past_key_values):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            outputs = block(hidden_states, layer_past=layer_past, rotary_pos_emb=rotary_pos_emb,
                            attention_mask=bias, use_cache=use_cache, output_attentions=output_attentions)
            hidden_states = outputs[0]
            if use_cache:
                presents += (outputs[1],)
            if output_attentions:
                all_attentions += (outputs[2 if use_cache else 1],)

        hidden_states = self.ln_f(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        if not return_dict:
            return tuple(v for v in [hidden_states, presents, all_hidden_states] if v is not None)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=presents,
                                       hidden_states=all_hidden_states, attentions=all_attentions)


def _choose_precision(config) -> None:
    """Upstream's precision flags: at most one of bf16/fp16/fp32; none set picks the fastest available."""
    if config.bf16 + config.fp16 + config.fp32 > 1:
        raise ValueError('Only one of "bf16", "fp16", "fp32" can be true')
    if config.bf16 + config.fp16 + config.fp32 == 0:
        cuda = torch.cuda.is_available()
        if cuda and torch.cuda.is_bf16_supported():
            config.bf16 = True
        elif cuda and torch.cuda.get_device_capability(0)[0] >= 7:
            config.fp16 = True
        else:
            config.fp32 = True


class _TokenQueue(BaseStreamer):
    """A streamer that hands each new token id to a consumer thread (the prompt is skipped)."""

    def __init__(self):
        self.tokens: "queue.Queue" = queue.Queue()
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.tokens.put(token)

    def end(self) -> None:
        self.tokens.put(_SENTINEL)


# ---------------------------------------------------------------------------------------------
# The causal LM with chat helpers
# ---------------------------------------------------------------------------------------------
class QWenLMHeadModel(QWenPreTrainedModel):
    _keys_to_ignore_on_load_missing = [r"h\.\d+\.attn\.rotary_emb\.inv_freq"]
    _keys_to_ignore_on_load_unexpected = [r"h\.\d+\.attn\.masked_bias"]

    def __init__(self, config):
        super().__init__(config)
        _choose_precision(config)
        self.transformer = QWenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.bf16:
            self.transformer.bfloat16()
            self.lm_head.bfloat16()
        if config.fp16:
            self.transformer.half()
            self.lm_head.half()
        self.post_init()
        apply_hallupatch_block(self)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, inputs_embeds=None, **kwargs):
        token_type_ids = kwargs.get("token_type_ids", None)
        if past_key_values:
            input_ids = input_ids[:, -1].unsqueeze(-1)
            if token_type_ids is not None:
                token_type_ids = token_type_ids[:, -1].unsqueeze(-1)
        attention_mask = kwargs.get("attention_mask", None)
        position_ids = kwargs.get("position_ids", None)
        if attention_mask is not None and position_ids is None:
            position_ids = attention_mask.long().cumsum(-1) - 1
            position_ids.masked_fill_(attention_mask == 0, 1)
            if past_key_values:
                position_ids = position_ids[:, -1].unsqueeze(-1)
        else:
            position_ids = None
        if inputs_embeds is not None and past_key_values is None:
            model_inputs = {"inputs_embeds": inputs_embeds}
        else:
            model_inputs = {"input_ids": input_ids}
        model_inputs.update({
            "past_key_values": past_key_values,
            "use_cache": kwargs.get("use_cache"),
            "position_ids": position_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
        })
        return model_inputs

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Tuple[Tuple[torch.Tensor]]] = None,
        attention_mask: Optional[torch.FloatTensor] = None,
        token_type_ids: Optional[torch.LongTensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        head_mask: Optional[torch.FloatTensor] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        encoder_attention_mask: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ):
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        transformer_outputs = self.transformer(
            input_ids, past_key_values=past_key_values, attention_mask=attention_mask,
            token_type_ids=token_type_ids, position_ids=position_ids, head_mask=head_mask,
            inputs_embeds=inputs_embeds, use_cache=use_cache, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, return_dict=return_dict,
        )
        lm_logits = self.lm_head(transformer_outputs[0])
        loss = None
        if labels is not None:
            labels = labels.to(lm_logits.device)
            shift_logits = lm_logits[..., :-1, :].contiguous()
            loss = F.cross_entropy(shift_logits.view(-1, shift_logits.size(-1)), labels[..., 1:].reshape(-1))
        if not return_dict:
            output = (lm_logits,) + tuple(transformer_outputs[1:])
            return ((loss,) + output) if loss is not None else output
        return CausalLMOutputWithPast(
            loss=loss, logits=lm_logits, past_key_values=transformer_outputs.past_key_values,
            hidden_states=transformer_outputs.hidden_states, attentions=transformer_outputs.attentions,
        )

    @staticmethod
    def _reorder_cache(past_key_values, beam_idx):
        return tuple(
            tuple(state.index_select(0, beam_idx.to(state.device)) for state in layer_past)
            for layer_past in past_key_values
        )

    def _chat_inputs(self, tokenizer, query, history, system, stop_words_ids, generation_config, kwargs):
        """The prompt (``make_context``, chatml) and the stop words shared by ``chat`` and ``chat_stream``."""
        if generation_config.chat_format != "chatml":
            raise ValueError(_BAD_CHAT_FORMAT)
        max_window_size = kwargs.get("max_window_size") or generation_config.max_window_size
        raw_text, context_tokens = make_context(
            tokenizer, query, history=history or [], system=system, max_window_size=max_window_size,
            chat_format=generation_config.chat_format,
        )
        stop_words_ids = list(stop_words_ids or []) + get_stop_words_ids(generation_config.chat_format, tokenizer)
        return raw_text, context_tokens, stop_words_ids

    def chat(
        self,
        tokenizer: PreTrainedTokenizer,
        query: str,
        history: Optional[HistoryType],
        system: str = "You are a helpful assistant.",
        append_history: bool = True,
        stream: Optional[bool] = _SENTINEL,
        stop_words_ids: Optional[List[List[int]]] = None,
        generation_config: Optional[GenerationConfig] = None,
        **kwargs,
    ) -> Tuple[str, HistoryType]:
        """One chat turn: returns ``(response, history)``; images go in the query as ``<img>path</img>``."""
        if stream is not _SENTINEL:
            raise ValueError(_STREAM_IN_CHAT)
        generation_config = generation_config if generation_config is not None else self.generation_config
        history = [] if history is None else history
        raw_text, context_tokens, stop_words_ids = self._chat_inputs(
            tokenizer, query, history, system, stop_words_ids, generation_config, kwargs)
        kwargs.pop("max_window_size", None)
        input_ids = torch.tensor([context_tokens], device=self.device)
        outputs = self.generate(input_ids, stop_words_ids=stop_words_ids, return_dict_in_generate=False,
                                generation_config=generation_config, **kwargs)
        response = decode_tokens(outputs[0], tokenizer, raw_text_len=len(raw_text),
                                 context_length=len(context_tokens), chat_format=generation_config.chat_format,
                                 verbose=False, errors="replace")
        if append_history:
            history.append((query, response))
        return response, history

    def chat_stream(
        self,
        tokenizer: PreTrainedTokenizer,
        query: str,
        history: Optional[HistoryType],
        system: str = "You are a helpful assistant.",
        stop_words_ids: Optional[List[List[int]]] = None,
        logits_processor: Optional[LogitsProcessorList] = None,
        generation_config: Optional[GenerationConfig] = None,
        **kwargs,
    ) -> Generator[str, Any, None]:
        """Like ``chat`` but yields the response decoded so far after every new token."""
        generation_config = generation_config if generation_config is not None else self.generation_config
        _, context_tokens, stop_words_ids = self._chat_inputs(
            tokenizer, query, history, system, stop_words_ids, generation_config, kwargs)
        kwargs.pop("max_window_size", None)
        input_ids = torch.tensor([context_tokens], device=self.device)
        streamer = _TokenQueue()
        failure: List[BaseException] = []

        def run() -> None:
            try:
                self.generate(input_ids, stop_words_ids=stop_words_ids, logits_processor=logits_processor,
                              generation_config=generation_config, streamer=streamer, **kwargs)
            except BaseException as error:  # re-raised in the consumer
                failure.append(error)
                streamer.end()

        def stream() -> Generator[str, Any, None]:
            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            tokens: List[int] = []
            while True:
                token = streamer.tokens.get()
                if token is _SENTINEL:
                    break
                tokens.append(token)
                yield tokenizer.decode(tokens, skip_special_tokens=True, errors="ignore", keep_image_special=True)
            worker.join()
            if failure:
                raise failure[0]

        return stream()

    def generate(self, inputs=None, generation_config=None, logits_processor=None, **kwargs):
        """transformers' ``generate`` plus ``stop_words_ids`` (argument or generation config)."""
        generation_config = generation_config if generation_config is not None else self.generation_config
        stop_words_ids = kwargs.pop("stop_words_ids", None)
        if stop_words_ids is None:
            stop_words_ids = getattr(generation_config, "stop_words_ids", None)
        if stop_words_ids is not None:
            processor = StopWordsLogitsProcessor(stop_words_ids=stop_words_ids,
                                                 eos_token_id=generation_config.eos_token_id)
            logits_processor = LogitsProcessorList([processor] if logits_processor is None
                                                   else list(logits_processor) + [processor])
        return super().generate(inputs, generation_config=generation_config, logits_processor=logits_processor,
                                **kwargs)
