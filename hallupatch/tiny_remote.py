"""Random-weight Qwen-VL-Chat and GLM-4V checkpoints built from hallupatch's drop-in modeling files.

A ``trust_remote_code`` checkpoint needs its sibling files next to the modeling file. This module
writes small stand-ins with the upstream interface and key names (``configuration_qwen.py``,
``qwen_generation_utils.py`` and ``visual.py`` for Qwen; ``configuration_chatglm.py`` and ``visual.py``
for GLM-4V), our drop-in modeling file, and a ``config.json`` with ``auto_map``. The vision towers
are light stand-ins that produce the real output shapes (256 tokens per image for Qwen; boi + patches
+ eoi rows for GLM-4V); the language models are the real architectures at any size.

Shapes: ``"tiny"`` (tests: hidden 32, 4 layers), ``"cpu"`` (benchmarks on a CPU: 24 layers, hidden 256)
and ``"published"`` (Qwen-VL-Chat 7B / GLM-4V-9b language models; for a GPU).

    path = build_tiny_checkpoint(tmp_path / "qwen", "qwen")
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    model = build_remote_model("chatglm", shape="cpu")          # in memory, no weights on disk
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

from hallupatch.modeling import MODELING_FILES, dropin_source

FAMILIES = tuple(MODELING_FILES)

# ---------------------------------------------------------------------------------------------
# Stand-in sibling files (the upstream interface, written for tests and benchmarks)
# ---------------------------------------------------------------------------------------------
QWEN_CONFIGURATION = '''\
from transformers import PretrainedConfig


class QWenConfig(PretrainedConfig):
    """Stand-in with Qwen-VL-Chat's config fields."""

    model_type = "qwen"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=151936, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                 emb_dropout_prob=0.0, attn_dropout_prob=0.0, layer_norm_epsilon=1e-6, initializer_range=0.02,
                 max_position_embeddings=8192, scale_attn_weights=True, use_cache=True, bf16=False, fp16=False,
                 fp32=False, kv_channels=128, rotary_pct=1.0, rotary_emb_base=10000, use_dynamic_ntk=True,
                 use_logn_attn=True, use_flash_attn="auto", intermediate_size=22016, no_bias=True,
                 tie_word_embeddings=False, seq_length=2048, visual=None, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.emb_dropout_prob = emb_dropout_prob
        self.attn_dropout_prob = attn_dropout_prob
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        self.scale_attn_weights = scale_attn_weights
        self.use_cache = use_cache
        self.max_position_embeddings = max_position_embeddings
        self.bf16 = bf16
        self.fp16 = fp16
        self.fp32 = fp32
        self.kv_channels = kv_channels
        self.rotary_pct = rotary_pct
        self.rotary_emb_base = rotary_emb_base
        self.use_dynamic_ntk = use_dynamic_ntk
        self.use_logn_attn = use_logn_attn
        self.use_flash_attn = use_flash_attn
        self.no_bias = no_bias
        self.seq_length = seq_length
        self.visual = visual or {}
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
'''

QWEN_GENERATION_UTILS = '''\
from typing import List, Tuple

import torch
from transformers import LogitsProcessor

HistoryType = List[Tuple[str, str]]


def make_context(tokenizer, query, history=None, system="", max_window_size=6144, chat_format="chatml"):
    turns = [f"<|im_start|>system\\n{system}<|im_end|>"]
    for old_query, response in history or []:
        turns += [f"<|im_start|>user\\n{old_query}<|im_end|>", f"<|im_start|>assistant\\n{response}<|im_end|>"]
    turns += [f"<|im_start|>user\\n{query}<|im_end|>", "<|im_start|>assistant\\n"]
    raw_text = "\\n".join(turns)
    return raw_text, tokenizer.encode(raw_text)


def get_stop_words_ids(chat_format, tokenizer):
    return [[tokenizer.im_end_id], [tokenizer.im_start_id]]


def decode_tokens(tokens, tokenizer, raw_text_len, context_length, chat_format, verbose=False, errors="replace"):
    tokens = tokens.tolist() if torch.is_tensor(tokens) else list(tokens)
    new = tokens[context_length:]
    for stop in (tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id):
        if stop in new:
            new = new[:new.index(stop)]
    return tokenizer.decode(new, errors=errors).strip()


class StopWordsLogitsProcessor(LogitsProcessor):
    def __init__(self, stop_words_ids, eos_token_id):
        self.stop_words_ids = [list(ids) for ids in stop_words_ids if len(ids)]
        self.eos_token_id = eos_token_id

    def __call__(self, input_ids, scores):
        for row, ids in enumerate(input_ids.tolist()):
            if any(ids[-len(stop):] == stop for stop in self.stop_words_ids):
                scores[row, self.eos_token_id] = float(2 ** 15)
        return scores
'''

QWEN_VISUAL = '''\
"""Stand-in for Qwen-VL's visual.py: same constructor, key names and output shape (n, 256, output_dim)."""
from collections import OrderedDict

import torch
from torch import nn


class VisualAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x):
        n, s, w = x.shape
        q, k, v = (t.view(n, s, self.heads, -1).transpose(1, 2) for t in self.in_proj(x).chunk(3, dim=-1))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(n, s, w))


class VisualAttentionBlock(nn.Module):
    def __init__(self, width, heads, mlp_ratio):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=1e-6)
        self.ln_2 = nn.LayerNorm(width, eps=1e-6)
        self.attn = VisualAttention(width, heads)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict(
            [("c_fc", nn.Linear(width, hidden)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(hidden, width))]))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TransformerBlock(nn.Module):
    def __init__(self, width, layers, heads, mlp_ratio):
        super().__init__()
        self.resblocks = nn.ModuleList([VisualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers)])

    def forward(self, x):
        for block in self.resblocks:
            x = block(x)
        return x


class Resampler(nn.Module):
    def __init__(self, n_queries, embed_dim, kv_dim):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, embed_dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(n_queries, embed_dim) * 0.02, requires_grad=False)
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False)
        self.attn = nn.MultiheadAttention(embed_dim, max(1, embed_dim // 128), batch_first=True)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)

    def forward(self, x):
        kv = self.ln_kv(self.kv_proj(x))
        q = (self.ln_q(self.query) + self.pos_embed).unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.attn(q, kv, kv, need_weights=False)[0]


class VisionTransformer(nn.Module):
    def __init__(self, image_size, patch_size, width, layers, heads, mlp_ratio, n_queries=256, output_dim=512,
                 **kwargs):
        super().__init__()
        self.image_size = image_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.positional_embedding = nn.Parameter(torch.randn(256, width) * width ** -0.5)
        self.ln_pre = nn.LayerNorm(width, eps=1e-6)
        self.transformer = TransformerBlock(width, layers, heads, mlp_ratio)
        self.attn_pool = Resampler(n_queries, output_dim, width)
        self.ln_post = nn.LayerNorm(output_dim, eps=1e-6)
        self.proj = nn.Parameter(output_dim ** -0.5 * torch.randn(output_dim, output_dim))

    def forward(self, x):
        x = x.to(dtype=self.conv1.weight.dtype, device=self.conv1.weight.device)
        x = self.conv1(x).flatten(2).transpose(1, 2)
        x = self.ln_pre(x + self.positional_embedding[: x.shape[1]])
        x = self.attn_pool(self.transformer(x))
        return self.ln_post(x) @ self.proj

    def encode(self, image_paths):
        from PIL import Image

        images = []
        for path in image_paths:
            image = Image.open(path).convert("RGB").resize((self.image_size, self.image_size))
            pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).float() / 255.0
            images.append((pixels.view(self.image_size, self.image_size, 3).permute(2, 0, 1) - 0.5) / 0.25)
        return self(torch.stack(images))
'''

GLM_CONFIGURATION = '''\
from transformers import PretrainedConfig


class ChatGLMConfig(PretrainedConfig):
    """Stand-in with GLM-4V-9b's config fields."""

    model_type = "chatglm"

    def __init__(self, num_layers=28, padded_vocab_size=65024, hidden_size=4096, ffn_hidden_size=13696,
                 kv_channels=128, num_attention_heads=32, seq_length=2048, hidden_dropout=0.0,
                 classifier_dropout=None, attention_dropout=0.0, layernorm_epsilon=1e-5, rmsnorm=True,
                 apply_residual_connection_post_layernorm=False, post_layer_norm=True, add_bias_linear=False,
                 add_qkv_bias=False, bias_dropout_fusion=True, multi_query_attention=False, multi_query_group_num=1,
                 rope_ratio=1, apply_query_key_layer_scaling=True, attention_softmax_in_fp32=True,
                 fp32_residual_connection=False, pre_seq_len=None, prefix_projection=False, boi_token_id=None,
                 eoi_token_id=None, original_rope=True, vision_config=None, **kwargs):
        self.num_layers = num_layers
        self.vocab_size = padded_vocab_size
        self.padded_vocab_size = padded_vocab_size
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.kv_channels = kv_channels
        self.num_attention_heads = num_attention_heads
        self.seq_length = seq_length
        self.hidden_dropout = hidden_dropout
        self.classifier_dropout = classifier_dropout
        self.attention_dropout = attention_dropout
        self.layernorm_epsilon = layernorm_epsilon
        self.rmsnorm = rmsnorm
        self.apply_residual_connection_post_layernorm = apply_residual_connection_post_layernorm
        self.post_layer_norm = post_layer_norm
        self.add_bias_linear = add_bias_linear
        self.add_qkv_bias = add_qkv_bias
        self.bias_dropout_fusion = bias_dropout_fusion
        self.multi_query_attention = multi_query_attention
        self.multi_query_group_num = multi_query_group_num
        self.rope_ratio = rope_ratio
        self.apply_query_key_layer_scaling = apply_query_key_layer_scaling
        self.attention_softmax_in_fp32 = attention_softmax_in_fp32
        self.fp32_residual_connection = fp32_residual_connection
        self.pre_seq_len = pre_seq_len
        self.prefix_projection = prefix_projection
        self.boi_token_id = boi_token_id
        self.eoi_token_id = eoi_token_id
        self.original_rope = original_rope
        self.vision_config = vision_config or {}
        super().__init__(**kwargs)
'''

GLM_VISUAL = '''\
"""Stand-in for GLM-4V's visual.py: same constructor, key names and output (B, patches + 2, hidden)."""
from argparse import Namespace

import torch
from torch import nn


class PatchEmbedding(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.proj = nn.Conv2d(config.in_channels, config.hidden_size, kernel_size=config.patch_size,
                              stride=config.patch_size)
        self.cls_embedding = nn.Parameter(torch.zeros(1, config.hidden_size))
        self.position_embedding = nn.Embedding(config.num_positions, config.hidden_size)

    def forward(self, images):
        x = self.proj(images.to(self.proj.weight.device)).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_embedding.expand(x.shape[0], -1, -1), x), dim=1)
        return x + self.position_embedding.weight.unsqueeze(0)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_heads
        self.query_key_value = nn.Linear(config.hidden_size, config.hidden_size * 3)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.output_dropout = nn.Dropout(config.dropout_prob)

    def forward(self, x):
        b, s, h = x.shape
        q, k, v = (t.view(b, s, self.num_heads, -1).transpose(1, 2) for t in self.query_key_value(x).chunk(3, -1))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.output_dropout(self.dense(out.transpose(1, 2).reshape(b, s, h)))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class TransformerLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Attention(config)
        self.mlp = MLP(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x):
        x = x + self.input_layernorm(self.attention(x))
        return x + self.post_attention_layernorm(self.mlp(x))


class Transformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList([TransformerLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class GLU(nn.Module):
    def __init__(self, config, in_features):
        super().__init__()
        self.linear_proj = nn.Linear(in_features, config.hidden_size, bias=False)
        self.norm1 = nn.LayerNorm(config.hidden_size)
        self.act1 = nn.GELU()
        self.act2 = nn.functional.silu
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.ffn_hidden_size, bias=False)
        self.gate_proj = nn.Linear(config.hidden_size, config.ffn_hidden_size, bias=False)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=False)

    def forward(self, x):
        x = self.act1(self.norm1(self.linear_proj(x)))
        return self.dense_4h_to_h(self.act2(self.gate_proj(x)) * self.dense_h_to_4h(x))


class EVA2CLIPModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        vision_config = Namespace(**config.vision_config)
        self.patch_embedding = PatchEmbedding(vision_config)
        self.transformer = Transformer(vision_config)
        self.linear_proj = GLU(config, in_features=config.hidden_size)
        self.conv = nn.Conv2d(vision_config.hidden_size, config.hidden_size, kernel_size=2, stride=2)
        self.boi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.eoi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.scaling_factor = vision_config.scaling_factor

    def forward(self, images):
        x = self.transformer(self.patch_embedding(images))[:, 1:]
        b, s, h = x.shape
        grid = int(s ** 0.5)
        x = self.conv(x.view(b, grid, grid, h).permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)
        x = self.linear_proj(x)
        x = torch.cat((self.boi.expand(b, -1, -1), x, self.eoi.expand(b, -1, -1)), dim=1)
        return x / self.scaling_factor
'''

SIBLINGS = {
    "qwen": {
        "configuration_qwen.py": QWEN_CONFIGURATION,
        "qwen_generation_utils.py": QWEN_GENERATION_UTILS,
        "visual.py": QWEN_VISUAL,
    },
    "chatglm": {"configuration_chatglm.py": GLM_CONFIGURATION, "visual.py": GLM_VISUAL},
}

# ---------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------
# Byte-level stand-in tokenizer ids for Qwen (see ByteTokenizer): 0..255 are bytes, then the specials.
QWEN_EOD, QWEN_IM_START, QWEN_IM_END, QWEN_IMG_START = 256, 257, 258, 259
QWEN_VOCAB = 264
GLM_BOI, GLM_EOI, GLM_PAD = 60, 61, 0
GLM_VOCAB = 64


def _qwen_config(shape: str) -> Dict[str, Any]:
    sizes = {
        "tiny": dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, kv_channels=16,
                     intermediate_size=128, vocab_size=QWEN_VOCAB, seq_length=1024),
        "cpu": dict(hidden_size=256, num_hidden_layers=24, num_attention_heads=4, kv_channels=64,
                    intermediate_size=1024, vocab_size=QWEN_VOCAB, seq_length=2048),
        "published": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, kv_channels=128,
                          intermediate_size=22016, vocab_size=151936, seq_length=2048),
    }[shape]
    visual = dict(heads=2, image_size=28, image_start_id=QWEN_IMG_START, layers=1, mlp_ratio=2.0,
                  output_dim=sizes["hidden_size"], patch_size=14, width=32)
    return dict(
        architectures=["QWenLMHeadModel"], model_type="qwen",
        auto_map={"AutoConfig": "configuration_qwen.QWenConfig",
                  "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        attn_dropout_prob=0.0, emb_dropout_prob=0.0, bf16=False, fp16=False, fp32=True, initializer_range=0.02,
        layer_norm_epsilon=1e-6, max_position_embeddings=8192, no_bias=True, rotary_emb_base=10000,
        rotary_pct=1.0, scale_attn_weights=True, tie_word_embeddings=False, use_cache=True,
        use_dynamic_ntk=True, use_flash_attn=False, use_logn_attn=True, eos_token_id=QWEN_EOD,
        pad_token_id=QWEN_EOD, torch_dtype="float32", visual=visual, **sizes,
    )


def _glm_config(shape: str) -> Dict[str, Any]:
    sizes = {
        "tiny": dict(hidden_size=32, num_layers=4, num_attention_heads=4, kv_channels=8, ffn_hidden_size=64,
                     multi_query_group_num=2, padded_vocab_size=GLM_VOCAB, seq_length=256),
        "cpu": dict(hidden_size=256, num_layers=24, num_attention_heads=4, kv_channels=64, ffn_hidden_size=688,
                    multi_query_group_num=2, padded_vocab_size=GLM_VOCAB, seq_length=1024),
        "published": dict(hidden_size=4096, num_layers=40, num_attention_heads=32, kv_channels=128,
                          ffn_hidden_size=13696, multi_query_group_num=2, padded_vocab_size=151552,
                          seq_length=8192),
    }[shape]
    image_size, patch_size = {"tiny": (28, 7), "cpu": (112, 14), "published": (1120, 14)}[shape]
    vision = dict(dropout_prob=0.0, hidden_act="gelu", hidden_size=32, image_size=image_size, in_channels=3,
                  intermediate_size=64, layer_norm_eps=1e-6, num_heads=2, num_hidden_layers=1,
                  num_positions=(image_size // patch_size) ** 2 + 1, patch_size=patch_size, scaling_factor=8)
    return dict(
        architectures=["ChatGLMForConditionalGeneration"], model_type="chatglm",
        auto_map={"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                  "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                  "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
                  "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
        add_bias_linear=False, add_qkv_bias=True, apply_query_key_layer_scaling=True,
        apply_residual_connection_post_layernorm=False, attention_dropout=0.0, attention_softmax_in_fp32=True,
        bias_dropout_fusion=True, boi_token_id=GLM_BOI, eoi_token_id=GLM_EOI, eos_token_id=[1, 2],
        pad_token_id=GLM_PAD, fp32_residual_connection=False, hidden_dropout=0.0, layernorm_epsilon=1.5625e-07,
        multi_query_attention=True, original_rope=True, post_layer_norm=True, pre_seq_len=None,
        prefix_projection=False, rmsnorm=True, rope_ratio=1, torch_dtype="float32", use_cache=True,
        vision_config=vision, **sizes,
    )


def remote_config(family: str, shape: str = "tiny", **overrides: Any) -> Dict[str, Any]:
    """The ``config.json`` content of a random-weight checkpoint (``overrides`` replace top-level fields)."""
    _check_family(family)
    if shape not in ("tiny", "cpu", "published"):
        raise ValueError(f"shape must be 'tiny', 'cpu' or 'published'; got {shape!r}")
    config = _qwen_config(shape) if family == "qwen" else _glm_config(shape)
    config.update(overrides)
    return config


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}; got {family!r}")


def write_remote_code(path: Union[str, Path], family: str, shape: str = "tiny",
                      hallupatch: Optional[Dict[str, Any]] = None, modeling: bool = True,
                      **overrides: Any) -> Path:
    """Write the sibling stand-ins, our modeling file (unless ``modeling=False``) and ``config.json``."""
    _check_family(family)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name, source in SIBLINGS[family].items():
        (path / name).write_text(source, encoding="utf-8")
    if modeling:
        (path / MODELING_FILES[family]).write_text(dropin_source(family).read_text(encoding="utf-8"), encoding="utf-8")
    config = remote_config(family, shape, **overrides)
    if hallupatch is not None:
        config["hallupatch"] = hallupatch
    (path / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    if family == "qwen":
        generation = dict(chat_format="chatml", eos_token_id=QWEN_EOD, pad_token_id=QWEN_EOD,
                          max_window_size=6144, max_new_tokens=16, do_sample=False)
        (path / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
    return path


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Seeded random weights, drawn on the parameters' device: norms near 1, biases small, other tensors
    N(0, std) (larger than usual, so that tiny models have peaked next-token distributions)."""
    generators: Dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.device not in generators:
                generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
            values = torch.randn(param.shape, generator=generators[param.device], device=param.device)
            if name.endswith(("norm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight", "ln_q.weight",
                              "ln_kv.weight", "ln_pre.weight", "ln_post.weight", "norm1.weight")):
                values = 1.0 + 0.1 * values
            elif name.endswith("bias"):
                values = 0.02 * values
            else:
                values = std * values
            param.copy_(values.to(param.dtype))
    return model


def build_remote_model(family: str, shape: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32,
                       device: Union[str, torch.device, None] = None,
                       hallupatch: Optional[Dict[str, Any]] = None, **overrides: Any) -> torch.nn.Module:
    """A random-weight model (eval mode) of the given family and shape, loaded through our drop-in file.

    ``"published"`` is meant for a GPU: ``build_remote_model("chatglm", "published", dtype=torch.bfloat16,
    device="cuda")``. ``hallupatch`` writes that block into the config (the model then applies it).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    overrides.setdefault("torch_dtype", str(dtype).replace("torch.", ""))
    folder = Path(tempfile.mkdtemp(prefix=f"hallupatch_{family}_{shape}_"))
    write_remote_code(folder, family, shape, hallupatch=hallupatch, **overrides)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    device = torch.device(device or "cpu")
    # GLM builds its big layers with skip_init, which places them on its `device` argument (else the CPU)
    placement = {"device": device} if family == "chatglm" else {}
    with device:
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=True, torch_dtype=dtype, **placement)
    model = model.to(device)
    return randomize_(model, seed=seed).eval()


def build_tiny_checkpoint(path: Union[str, Path], family: str, seed: int = 0, shape: str = "tiny",
                          hallupatch: Optional[Dict[str, Any]] = None, **overrides: Any) -> Path:
    """A complete random-weight checkpoint folder (code, config, ``model.safetensors``) for ``from_pretrained``."""
    from safetensors.torch import save_file

    path = write_remote_code(path, family, shape, hallupatch=None, **overrides)
    model = build_remote_model(family, shape, seed=seed, **overrides)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(Path(path) / "model.safetensors"), metadata={"format": "pt"})
    if hallupatch is not None:
        set_config_block(path, hallupatch)
    forget_remote_modules()
    return Path(path)


def set_config_block(path: Union[str, Path], block: Optional[Dict[str, Any]]) -> None:
    """Write (or with ``None`` remove) the ``hallupatch`` block of a checkpoint's ``config.json``."""
    config_path = Path(path) / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if block is None:
        config.pop("hallupatch", None)
    else:
        config["hallupatch"] = block
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")


def forget_remote_modules() -> None:
    """Drop imported ``transformers_modules`` so a changed modeling file is imported afresh."""
    for name in [n for n in sys.modules if n == "transformers_modules" or n.startswith("transformers_modules.")]:
        del sys.modules[name]


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
class ByteTokenizer:
    """The Qwen stand-in tokenizer: UTF-8 bytes are ids 0..255 (as in Qwen's vocabulary, so an image path
    written between ``<img>`` and ``</img>`` is its bytes, padded to 256 ids), then the special tokens."""

    specials = {"<|endoftext|>": QWEN_EOD, "<|im_start|>": QWEN_IM_START, "<|im_end|>": QWEN_IM_END,
                "<img>": QWEN_IMG_START, "</img>": QWEN_IMG_START + 1}
    eod_id, im_start_id, im_end_id = QWEN_EOD, QWEN_IM_START, QWEN_IM_END
    img_pad_id = QWEN_IMG_START + 2
    eos_token_id = pad_token_id = QWEN_EOD

    def encode(self, text: str) -> List[int]:
        ids: List[int] = []
        while text:
            if text.startswith("<img>") and "</img>" in text:
                path, text = text[5:].split("</img>", 1)
                path_ids = list(path.encode("utf-8"))
                ids += [QWEN_IMG_START] + path_ids + [self.img_pad_id] * (256 - len(path_ids)) + [QWEN_IMG_START + 1]
                continue
            special = next((s for s in self.specials if text.startswith(s)), None)
            if special:
                ids.append(self.specials[special])
                text = text[len(special):]
            else:
                ids += list(text[0].encode("utf-8"))
                text = text[1:]
        return ids

    def decode(self, ids, skip_special_tokens: bool = False, errors: str = "replace", **kwargs) -> str:
        names = {v: k for k, v in self.specials.items()}
        out, pending = [], bytearray()
        for token in (ids.tolist() if torch.is_tensor(ids) else ids):
            if token < 256:
                pending.append(token)
                continue
            out.append(pending.decode("utf-8", errors=errors))
            pending = bytearray()
            if not skip_special_tokens:
                out.append(names.get(token, f"<|extra_{token}|>"))
        out.append(pending.decode("utf-8", errors=errors))
        return "".join(out)


def write_tiny_image(path: Union[str, Path], seed: int = 0, size: int = 28) -> Path:
    """A small random RGB PNG (for Qwen prompts ``<img>path</img>``)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(path)
    return Path(path)


def glm_image_batch(batch: int, seed: int = 0, shape: str = "tiny") -> torch.Tensor:
    """Random pixel tensors ``(batch, 3, image_size, image_size)`` for GLM-4V's ``images`` argument."""
    size = _glm_config(shape)["vision_config"]["image_size"]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def glm_prompt(text_ids: List[int], with_image: bool = True) -> List[int]:
    """GLM-4V token layout: ``[gMASK]-like prefix, <boi> placeholder <eoi>, text`` with tiny ids."""
    image = [GLM_BOI, 3, GLM_EOI] if with_image else []
    return [4, 5] + image + list(text_ids)


def benchmark_inputs(family: str, batch_size: int = 1, prompt_tokens: int = 32, shape: str = "tiny",
                     seed: int = 0, workdir: Union[str, Path, None] = None,
                     device: Union[str, torch.device] = "cpu") -> Dict[str, torch.Tensor]:
    """``generate`` keyword arguments for a batch of one-image prompts of ``prompt_tokens`` text tokens.

    Qwen: ``<img>path</img>`` + bytes (images written as PNGs under ``workdir``); GLM-4V: ``<boi> x <eoi>``
    + ids, with ``images`` and ``position_ids``. Both come with an all-ones ``attention_mask``.
    """
    _check_family(family)
    generator = torch.Generator().manual_seed(seed)
    if family == "qwen":
        workdir = Path(workdir or tempfile.mkdtemp(prefix="hallupatch_images_"))
        tokenizer = ByteTokenizer()
        rows = []
        for b in range(batch_size):
            image = write_tiny_image(workdir / f"bench_{seed}_{b}.png", seed=seed + b)
            text = torch.randint(ord("a"), ord("z") + 1, (prompt_tokens,), generator=generator).tolist()
            rows.append(tokenizer.encode(f"<img>{image}</img>") + text)
        ids = torch.tensor(rows)
        inputs = dict(input_ids=ids)
    else:
        text = torch.randint(7, GLM_BOI, (batch_size, prompt_tokens), generator=generator).tolist()
        ids = torch.tensor([glm_prompt(row) for row in text])
        inputs = dict(input_ids=ids, images=glm_image_batch(batch_size, seed=seed, shape=shape),
                      position_ids=torch.arange(ids.shape[1]).repeat(batch_size, 1))
    inputs["attention_mask"] = torch.ones_like(ids)
    return {k: v.to(device) for k, v in inputs.items()}


def build_benchmark_case(family: str, shape: str = "cpu", device: Union[str, torch.device] = "cpu",
                         dtype: torch.dtype = torch.float32, prompt_tokens: int = 40, seed: int = 0):
    """``(model, generate_kwargs)`` for ``eval/bench_memvr.py --family qwen|chatglm``: a random-weight model
    of ``shape`` ("tiny", "cpu" or "published") and one one-image prompt of ``prompt_tokens`` text tokens."""
    model = build_remote_model(family, shape, seed=seed, dtype=dtype, device=device)
    inputs = benchmark_inputs(family, batch_size=1, prompt_tokens=prompt_tokens, shape=shape, seed=seed,
                              device=device)
    if "images" in inputs:
        inputs["images"] = inputs["images"].to(dtype)
    return model, inputs
