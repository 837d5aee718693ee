"""The tiny LLaVA the published samplers were recorded on (``tests/published/record_baselines.py``), loaded in
transformers 4.40 as llava-hf's ``LlavaForConditionalGeneration``, and the recordings themselves.

The weights are stored in the original LLaVA repository's form (``LlavaLlamaForCausalLM``: ``model.*`` llama,
``model.mm_projector.{0,2}``, a separate CLIP folder), which is what the published code loads. Converting them
is a renaming: ``model.mm_projector.0/2`` -> ``multi_modal_projector.linear_1/2``, the llama under
``language_model.``, CLIP's ``vision_model`` under ``vision_tower.``. Both forms take CLIP's second-to-last
hidden state without its CLS row and a 2-layer GELU projector, so they compute the same logits.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

DATA = Path(__file__).resolve().parent / "data" / "published_baselines"
ORIGINAL_IMAGE_TOKEN = -200      # the original LLaVA repository's IMAGE_TOKEN_INDEX
LLAMA_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "bos_token_id", "eos_token_id",
              "pad_token_id", "tie_word_embeddings", "hidden_act")


def llava_hf_state_dict() -> dict:
    """The recorded weights under llava-hf's key names (the LM's stored rotary ``inv_freq`` buffers dropped)."""
    converted = {}
    for key, value in load_file(DATA / "llava" / "model.safetensors").items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if key.startswith("model.mm_projector."):
            index, rest = key[len("model.mm_projector."):].split(".", 1)
            converted[f"multi_modal_projector.linear_{1 if index == '0' else 2}.{rest}"] = value
        else:
            converted["language_model." + key] = value
    for key, value in load_file(DATA / "clip" / "model.safetensors").items():
        converted["vision_tower." + key] = value
    return converted


def llava_hf_config() -> LlavaConfig:
    original = json.loads((DATA / "llava" / "config.json").read_text())
    assert original["mm_projector_type"] == "mlp2x_gelu" and original["mm_vision_select_feature"] == "patch"
    text = LlamaConfig(**{k: original[k] for k in LLAMA_KEYS})
    vision = CLIPVisionConfig.from_pretrained(DATA / "clip")
    return LlavaConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=image_token_id(),
        projector_hidden_act="gelu", vision_feature_select_strategy="default",
        vision_feature_layer=original["mm_vision_select_layer"], pad_token_id=original["pad_token_id"],
    )


def image_token_id() -> int:
    vocab = json.loads((DATA / "llava" / "tokenizer.json").read_text())["model"]["vocab"]
    return vocab["<image>"]


def load_llava_hf(folder: Path, attn_implementation: str = "eager") -> LlavaForConditionalGeneration:
    """Build the llava-hf model from the recorded weights, save it to ``folder`` and load it back."""
    model = LlavaForConditionalGeneration(llava_hf_config())
    missing, unexpected = model.load_state_dict(llava_hf_state_dict(), strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)
    return LlavaForConditionalGeneration.from_pretrained(folder, attn_implementation=attn_implementation).eval()


def recording(method: str) -> dict:
    return torch.load(DATA / f"{method}.pt")


def images() -> dict:
    return torch.load(DATA / "images.pt")


def hf_ids(ids: torch.Tensor) -> torch.Tensor:
    """Original-form ids (image at -200) as llava-hf ids (the image token)."""
    return torch.where(ids == ORIGINAL_IMAGE_TOKEN, torch.full_like(ids, image_token_id()), ids)
