"""Tiny Qwen2-VL / Qwen2.5-VL checkpoints in the Hugging Face hub's layout, built deterministically.

The folder looks like ``Qwen/Qwen2-VL-*-Instruct`` (or ``Qwen2.5-VL``) on the hub: sharded safetensors with
``model.safetensors.index.json``, the flat ``config.json`` the hub ships (``"type": "mrope"``, ``in_chans``,
token ids at the top level), ``generation_config.json``, a byte-level BPE ``tokenizer.json`` with Qwen2's
pre-tokenizer and the special tokens in their real order (at the end of a small vocabulary instead of at
151643), ``tokenizer_config.json``, ``chat_template.json`` and ``preprocessor_config.json``.

Only torch and the standard library are used (the file is also run, unchanged, in the separate venv that
records transformers 4.51.3's outputs: tests/published/record_qwen2_vl.py), and every weight comes from a
seeded ``torch.Generator``, so the same folder is produced under any transformers version.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, List, Tuple

import torch

FAMILIES = ("qwen2_vl", "qwen2_5_vl")

# Qwen2's special tokens in the order of the real tokenizer (ids 151643...); Qwen2.5-VL's tokenizer adds
# the tool-call and fill-in-the-middle tokens after <|video_pad|>.
QWEN2_VL_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]
QWEN2_5_VL_EXTRA_SPECIALS = [
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]
# the special tokens that are not "special" in the hub's added_tokens (they are ordinary text there)
NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
               "<|repo_name|>", "<|file_sep|>"}

QWEN2_PRETOKENIZER_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# merges of the tiny byte-level BPE (in the ByteLevel alphabet: "Ġ" is a space)
MERGES = [
    ("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("o", "n"), ("r", "e"), ("Ġ", "i"),
    ("Ġ", "s"), ("a", "t"), ("e", "r"), ("i", "s"), ("Ġi", "s"), ("e", "s"), ("o", "r"), ("Ġ", "w"),
    ("a", "n"), ("e", "n"), ("Ġ", "c"), ("Ġ", "o"), ("a", "g"), ("ag", "e"), ("Ġ", "D"), ("Ġ", "W"),
    ("i", "m"), ("im", "age"), ("Ġ", "y"), ("s", "y"), ("Ġ", "p"), ("Ġ", "h"),
]

CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TEXT_LAYERS = 4
HIDDEN = 64
INTERMEDIATE = 128
HEADS = 4
KV_HEADS = 2
MROPE_SECTION = [2, 3, 3]          # sums to head_dim / 2 = 8
VISION_EMBED = 32
VISION_HEADS = 2
PATCH = 14
TEMPORAL_PATCH = 2
MERGE = 2
# tiny pixel budget: 4 to 16 visual tokens per image (the hub's defaults are 3136 and 12845056)
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 16


def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's byte-to-character table, which byte-level BPE vocabularies are written in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def specials(family: str) -> List[str]:
    return QWEN2_VL_SPECIALS + (QWEN2_5_VL_EXTRA_SPECIALS if family == "qwen2_5_vl" else [])


def base_vocab() -> Dict[str, int]:
    vocab = {char: index for index, char in enumerate(sorted(bytes_to_unicode().values(), key=lambda c: ord(c)))}
    for left, right in MERGES:
        vocab[left + right] = len(vocab)
    return vocab


def token_ids(family: str) -> Dict[str, int]:
    """Every special token's id in the tiny vocabulary (they follow the base vocabulary, in the real order)."""
    start = len(base_vocab())
    return {token: start + offset for offset, token in enumerate(specials(family))}


def vocab_size(family: str) -> int:
    """The embedding rows: larger than the tokenizer, as on the hub (152064 rows for 151665 tokens)."""
    return len(base_vocab()) + len(specials(family)) + 10


def tokenizer_json(family: str) -> dict:
    ids = token_ids(family)
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": ids[token], "content": token, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": token not in NOT_SPECIAL}
            for token in specials(family)
        ],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_PRETOKENIZER_REGEX}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            ],
        },
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "", "end_of_word_suffix": "",
            "fuse_unk": False, "byte_fallback": False, "vocab": base_vocab(),
            "merges": [f"{left} {right}" for left, right in MERGES],
        },
    }


def tokenizer_config(family: str) -> dict:
    ids = token_ids(family)
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(ids[token]): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                              "single_word": False, "special": token not in NOT_SPECIAL}
            for token in specials(family)
        },
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                                      "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
                                      "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                                      "<|video_pad|>"],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def hub_config(family: str, tied: bool, num_layers: int = TEXT_LAYERS) -> dict:
    ids = token_ids(family)
    config = {
        "architectures": ["Qwen2VLForConditionalGeneration" if family == "qwen2_vl" else "Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": 32768,
        "max_window_layers": num_layers,
        "model_type": family,
        "num_attention_heads": HEADS,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "rope_scaling": {"type": "mrope", "mrope_section": list(MROPE_SECTION)},
        "vocab_size": vocab_size(family),
    }
    if family == "qwen2_vl":
        config["vision_config"] = {
            "depth": 2, "embed_dim": VISION_EMBED, "mlp_ratio": 2, "num_heads": VISION_HEADS, "in_chans": 3,
            "hidden_size": HIDDEN, "patch_size": PATCH, "spatial_merge_size": MERGE, "spatial_patch_size": PATCH,
            "temporal_patch_size": TEMPORAL_PATCH,
        }
    else:
        config["vision_config"] = {
            "depth": 4, "hidden_act": "silu", "hidden_size": VISION_EMBED, "intermediate_size": 48,
            "num_heads": VISION_HEADS, "in_chans": 3, "out_hidden_size": HIDDEN, "patch_size": PATCH,
            "spatial_merge_size": MERGE, "spatial_patch_size": PATCH, "window_size": 56,
            "fullatt_block_indexes": [1, 3], "tokens_per_second": 2, "temporal_patch_size": TEMPORAL_PATCH,
        }
    return config


def weight_shapes(family: str, tied: bool, num_layers: int = TEXT_LAYERS) -> Dict[str, Tuple[int, ...]]:
    """Every tensor of the hub checkpoint, by name (transformers <= 4.51's in-memory layout)."""
    config = hub_config(family, tied, num_layers)
    vision = config["vision_config"]
    embed = vision["embed_dim"] if family == "qwen2_vl" else vision["hidden_size"]
    shapes: Dict[str, Tuple[int, ...]] = {"visual.patch_embed.proj.weight": (embed, 3, TEMPORAL_PATCH, PATCH, PATCH)}
    for i in range(vision["depth"]):
        p = f"visual.blocks.{i}."
        if family == "qwen2_vl":
            hidden = embed * vision["mlp_ratio"]
            shapes.update({p + "norm1.weight": (embed,), p + "norm1.bias": (embed,), p + "norm2.weight": (embed,),
                           p + "norm2.bias": (embed,), p + "mlp.fc1.weight": (hidden, embed), p + "mlp.fc1.bias": (hidden,),
                           p + "mlp.fc2.weight": (embed, hidden), p + "mlp.fc2.bias": (embed,)})
        else:
            hidden = vision["intermediate_size"]
            shapes.update({p + "norm1.weight": (embed,), p + "norm2.weight": (embed,),
                           p + "mlp.gate_proj.weight": (hidden, embed), p + "mlp.gate_proj.bias": (hidden,),
                           p + "mlp.up_proj.weight": (hidden, embed), p + "mlp.up_proj.bias": (hidden,),
                           p + "mlp.down_proj.weight": (embed, hidden), p + "mlp.down_proj.bias": (embed,)})
        shapes.update({p + "attn.qkv.weight": (3 * embed, embed), p + "attn.qkv.bias": (3 * embed,),
                       p + "attn.proj.weight": (embed, embed), p + "attn.proj.bias": (embed,)})
    merged = embed * MERGE * MERGE
    shapes["visual.merger.ln_q.weight"] = (embed,)
    if family == "qwen2_vl":
        shapes["visual.merger.ln_q.bias"] = (embed,)
    shapes.update({"visual.merger.mlp.0.weight": (merged, merged), "visual.merger.mlp.0.bias": (merged,),
                   "visual.merger.mlp.2.weight": (HIDDEN, merged), "visual.merger.mlp.2.bias": (HIDDEN,)})
    vocab = config["vocab_size"]
    head_dim = HIDDEN // HEADS
    shapes["model.embed_tokens.weight"] = (vocab, HIDDEN)
    for i in range(num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (HEADS * head_dim, HIDDEN), p + "self_attn.q_proj.bias": (HEADS * head_dim,),
            p + "self_attn.k_proj.weight": (KV_HEADS * head_dim, HIDDEN), p + "self_attn.k_proj.bias": (KV_HEADS * head_dim,),
            p + "self_attn.v_proj.weight": (KV_HEADS * head_dim, HIDDEN), p + "self_attn.v_proj.bias": (KV_HEADS * head_dim,),
            p + "self_attn.o_proj.weight": (HIDDEN, HEADS * head_dim),
            p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN), p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
            p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
        })
    shapes["model.norm.weight"] = (HIDDEN,)
    if not tied:
        shapes["lm_head.weight"] = (vocab, HIDDEN)
    return shapes


def weights(family: str, tied: bool, seed: int = 0, num_layers: int = TEXT_LAYERS) -> Dict[str, torch.Tensor]:
    """Seeded random weights: norms around 1, biases and matrices with enough spread for clear greedy choices."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in weight_shapes(family, tied, num_layers).items():
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        if "norm" in name or "ln_q" in name:
            tensors[name] = 1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise
        elif name.endswith("bias"):
            tensors[name] = 0.05 * noise
        elif "embed_tokens" in name or name == "lm_head.weight":
            tensors[name] = 0.5 * noise
        else:
            fan_in = 1
            for size in shape[1:]:
                fan_in *= size
            tensors[name] = noise / fan_in ** 0.5
    return tensors


def weights_digest(tensors: Dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names and bytes, in name order (what a recording was made on)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().numpy().tobytes())
    return digest.hexdigest()


def write_shards(folder: Path, tensors: Dict[str, torch.Tensor], shards: int = 2) -> None:
    from safetensors.torch import save_file

    names = list(tensors)
    per_shard = -(-len(names) // shards)
    weight_map = {}
    for index in range(shards):
        part = names[index * per_shard:(index + 1) * per_shard]
        filename = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        save_file({name: tensors[name].contiguous() for name in part}, str(folder / filename), metadata={"format": "pt"})
        weight_map.update({name: filename for name in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build_checkpoint(folder, family: str = "qwen2_vl", tied: bool = False, seed: int = 0,
                     num_layers: int = TEXT_LAYERS) -> Path:
    """Write a tiny hub-layout checkpoint of ``family`` (``"qwen2_vl"`` or ``"qwen2_5_vl"``) into ``folder``."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}; got {family!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids = token_ids(family)
    write_json(folder / "config.json", hub_config(family, tied, num_layers))
    write_json(folder / "generation_config.json", {
        "bos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "transformers_version": "4.41.2",
    })
    write_shards(folder, weights(family, tied, seed, num_layers))
    write_json(folder / "tokenizer.json", tokenizer_json(family))
    write_json(folder / "tokenizer_config.json", tokenizer_config(family))
    write_json(folder / "vocab.json", base_vocab())
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES), encoding="utf-8")
    write_json(folder / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    write_json(folder / "preprocessor_config.json", {
        "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS, "patch_size": PATCH, "temporal_patch_size": TEMPORAL_PATCH,
        "merge_size": MERGE, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor" if family == "qwen2_vl"
        else "Qwen2_5_VLProcessor",
    })
    return folder


def test_image(width: int, height: int, seed: int):
    """A deterministic RGB PIL image: smooth colour gradients plus seeded noise."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 1, height)[:, None]
    xs = torch.linspace(0, 1, width)[None, :]
    channels = [xs * 200 + ys * 40, ys * 220, (xs + ys) * 100]
    base = torch.stack([c.expand(height, width) for c in channels], dim=-1)
    noise = torch.randint(0, 40, (height, width, 3), generator=generator).float()
    array = (base + noise).clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(array)


# The recorded cases (tests/published/record_qwen2_vl.py runs them under transformers 4.51.3; the tests replay
# them on the drop-in). Each case: rows of chat content (an image is (width, height, seed)), the processor's
# from_pretrained keyword arguments, and the greedy steps to generate.
CASES = {
    "small_image": {"rows": [[(30, 40, 1), "Describe this image."]]},               # below min_pixels: upscaled
    "large_image": {"rows": [[(200, 150, 2), "What is in the picture?"]]},          # above max_pixels: downscaled
    "two_images": {"rows": [[(56, 84, 3), (100, 70, 4), "Which is brighter?"]]},
    "padded_batch": {"rows": [[(84, 56, 5), "Is there a cat in the image?"], ["Say hi."]], "beams": 2},   # left padding
    "text_only": {"rows": [["Write a poem about the sea."]]},
    "video": {"rows": [[("video", 4, 84, 56, 7), "What happens in the video?"]]},   # 4 frames: 2 temporal patches
    "pixel_limits": {"rows": [[(120, 90, 6), "Describe it."]],
                     "processor_kwargs": {"min_pixels": 28 * 28 * 6, "max_pixels": 28 * 28 * 6}},
}
NEW_TOKENS = 6
RECORDED_POSITIONS = 8   # prefill logits are recorded at each row's last 8 positions


def is_video(item) -> bool:
    return isinstance(item, tuple) and item[0] == "video"


def case_messages(row) -> list:
    """One chat (a user turn) from a case row, in the processor's message format."""
    def entry(item):
        if is_video(item):
            return {"type": "video"}
        return {"type": "image"} if isinstance(item, tuple) else {"type": "text", "text": item}
    return [{"role": "user", "content": [entry(item) for item in row]}]


def case_images(row) -> list:
    return [test_image(*item) for item in row if isinstance(item, tuple) and not is_video(item)]


def case_videos(row) -> list:
    """Each video of the row as a list of PIL frames."""
    return [[test_image(width, height, seed + frame) for frame in range(frames)]
            for _, frames, width, height, seed in (item for item in row if is_video(item))]
