"""Random-weight Qwen-VL-Chat and GLM-4V checkpoints built from hallupatch's drop-in modeling files.

A test helper (the bench scripts under ``eval/`` use it too). A ``trust_remote_code`` checkpoint needs
its sibling files next to the modeling file. This module copies the stand-ins in ``tests/remote_code/``,
written with the upstream interface and key names (``configuration_qwen.py``,
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

REMOTE_CODE = Path(__file__).resolve().parent / "remote_code"
# the stand-in sibling files of each family's checkpoint, as real files under tests/remote_code/<family>/
SIBLINGS = {family: sorted(p.name for p in (REMOTE_CODE / family).glob("*.py")) for family in ("qwen", "chatglm")}

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
    for name in SIBLINGS[family]:
        (path / name).write_text((REMOTE_CODE / family / name).read_text(encoding="utf-8"), encoding="utf-8")
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
