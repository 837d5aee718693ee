"""Tiny random-weight models of every supported transformers architecture beyond llava-hf, built without
any download: the text decoders (Llama, Llama-3's 128k vocabulary, Mistral, Qwen2, Gemma) and the VLMs
(LLaVA-NeXT with a Vicuna-style Llama or a Mistral decoder, VipLLaVA, Idefics2) with their processors.

Same seed, same weights. The VLMs reuse :func:`hallupatch.testing.tiny.tiny_tokenizer` (word level, left
padding) and set ``pad_token_id`` so left-padded batches decode right in transformers 4.40.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Tuple, Union

import torch

from hallupatch.testing.tiny import _spread_weights, tiny_tokenizer

TEXT_ARCHITECTURES = ("llama", "llama3", "mistral", "qwen2", "gemma")
VLM_ARCHITECTURES = ("llava_next", "llava_next_mistral", "vipllava", "idefics2")
LLAMA3_VOCAB = 128256
VISION_IMAGE_SIZE = 28   # 2 x 2 patches of 14 pixels per tile
GRID_PINPOINTS = [[28, 56], [56, 28], [56, 56]]   # LLaVA-NeXT anyres tiles: up to 2 x 2 of 28 pixels
IDEFICS2_LATENTS = 4


def text_config(architecture: str, vocab_size: int = 97, num_layers: int = 4, hidden_size: int = 32, **extra: Any):
    """The config of one tiny text decoder (``architecture`` in :data:`TEXT_ARCHITECTURES`)."""
    from transformers import GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=num_layers, num_attention_heads=4, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    common.update(extra)
    if architecture == "llama":
        return LlamaConfig(num_key_value_heads=4, tie_word_embeddings=False, **common)
    if architecture == "llama3":   # Llama-3's shape: 128k vocabulary, grouped-query attention, rope theta 5e5
        common["vocab_size"] = LLAMA3_VOCAB
        return LlamaConfig(num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=False, **common)
    if architecture == "mistral":
        return MistralConfig(num_key_value_heads=2, sliding_window=4096, tie_word_embeddings=False, **common)
    if architecture == "qwen2":
        return Qwen2Config(num_key_value_heads=2, tie_word_embeddings=False, **common)
    if architecture == "gemma":   # embeddings scaled by sqrt(hidden) and tied to the LM head, as released
        return GemmaConfig(num_key_value_heads=1, head_dim=hidden_size // 4, tie_word_embeddings=True,
                           hidden_activation="gelu_pytorch_tanh", **common)
    raise ValueError(f"unknown text architecture {architecture!r}; use one of {TEXT_ARCHITECTURES}")


def _seeded(build, seed: int):
    """Build and spread-initialise a model under ``seed`` without touching the global generator."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = build()
        _spread_weights(model)
        if getattr(model, "image_newline", None) is not None:   # LLaVA-NeXT leaves it uninitialised
            with torch.no_grad():
                model.image_newline.normal_(0.0, 1.0)
        model.tie_weights()
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


def tiny_text_decoder(architecture: str, seed: int = 0, **config_kwargs: Any):
    """A random-weight ``*ForCausalLM`` of ``architecture`` (eager attention)."""
    from transformers import AutoModelForCausalLM

    config = text_config(architecture, **config_kwargs)
    config._attn_implementation = "eager"
    return _seeded(lambda: AutoModelForCausalLM.from_config(config, attn_implementation="eager"), seed)


def _vision_config(**extra: Any) -> dict:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=VISION_IMAGE_SIZE, patch_size=14, projection_dim=32, **extra).to_dict()


def tiny_vlm(architecture: str, seed: int = 0, num_layers: int = 4, hidden_size: int = 64):
    """A random-weight VLM of ``architecture`` (:data:`VLM_ARCHITECTURES`) and its processor."""
    builders = {"llava_next": _llava_next, "llava_next_mistral": _llava_next, "vipllava": _vipllava,
                "idefics2": _idefics2}
    if architecture not in builders:
        raise ValueError(f"unknown VLM architecture {architecture!r}; use one of {VLM_ARCHITECTURES}")
    model, processor = builders[architecture](architecture, seed, num_layers, hidden_size)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    return model, processor


def _vlm_text_config(kind: str, tokenizer, num_layers: int, hidden_size: int) -> dict:
    return text_config(kind, vocab_size=len(tokenizer), num_layers=num_layers, hidden_size=hidden_size,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, max_position_embeddings=1024).to_dict()


def _llava_next(architecture: str, seed: int, num_layers: int, hidden_size: int):
    from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor,
                              LlavaNextProcessor)

    tokenizer = tiny_tokenizer()
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": VISION_IMAGE_SIZE}, crop_size={"height": VISION_IMAGE_SIZE, "width": VISION_IMAGE_SIZE},
        image_grid_pinpoints=GRID_PINPOINTS,
    )
    kind = "mistral" if architecture.endswith("mistral") else "llama"
    config = LlavaNextConfig(
        vision_config=_vision_config(), text_config=_vlm_text_config(kind, tokenizer, num_layers, hidden_size),
        image_grid_pinpoints=GRID_PINPOINTS, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = "eager"
    model = _seeded(lambda: LlavaNextForConditionalGeneration(config), seed)
    return model, LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _vipllava(architecture: str, seed: int, num_layers: int, hidden_size: int):
    from transformers import CLIPImageProcessor, LlavaProcessor, VipLlavaConfig, VipLlavaForConditionalGeneration

    tokenizer = tiny_tokenizer()
    image_processor = CLIPImageProcessor(size={"shortest_edge": VISION_IMAGE_SIZE},
                                         crop_size={"height": VISION_IMAGE_SIZE, "width": VISION_IMAGE_SIZE})
    config = VipLlavaConfig(
        vision_config=_vision_config(), text_config=_vlm_text_config("llama", tokenizer, num_layers, hidden_size),
        vision_feature_layers=[-2, -1], image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = "eager"
    model = _seeded(lambda: VipLlavaForConditionalGeneration(config), seed)
    return model, LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _idefics2(architecture: str, seed: int, num_layers: int, hidden_size: int):
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2ImageProcessor, Idefics2Processor

    tokenizer = tiny_tokenizer()
    image_processor = Idefics2ImageProcessor(size={"shortest_edge": VISION_IMAGE_SIZE, "longest_edge": VISION_IMAGE_SIZE},
                                             do_image_splitting=False)
    processor = Idefics2Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=IDEFICS2_LATENTS)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=VISION_IMAGE_SIZE, patch_size=14)
    perceiver = dict(resampler_n_latents=IDEFICS2_LATENTS, resampler_depth=1, resampler_n_heads=2,
                     resampler_head_dim=16, num_key_value_heads=1)
    config = Idefics2Config(
        vision_config=vision, perceiver_config=perceiver,
        text_config=_vlm_text_config("mistral", processor.tokenizer, num_layers, hidden_size),
        image_token_id=processor.tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=processor.tokenizer.pad_token_id,
    )
    config._attn_implementation = "eager"
    model = _seeded(lambda: Idefics2ForConditionalGeneration(config), seed)
    return model, processor


def build_checkpoint(path: Union[str, Path], architecture: str, seed: int = 0, **kwargs: Any) -> Path:
    """Save a tiny model of ``architecture`` (text or VLM) and, for a VLM, its processor to ``path``."""
    path = Path(path)
    if architecture in TEXT_ARCHITECTURES:
        model, processor = tiny_text_decoder(architecture, seed=seed, **kwargs), None
    else:
        model, processor = tiny_vlm(architecture, seed=seed, **kwargs)
    model.save_pretrained(path, safe_serialization=True)
    if processor is not None:
        processor.save_pretrained(path)
    return path


def load_checkpoint(path: Union[str, Path]) -> Tuple[torch.nn.Module, Optional[Any]]:
    """Reload a :func:`build_checkpoint` folder: the model (eager attention, eval mode) and its processor or ``None``."""
    import json

    import transformers

    path = Path(path)
    architecture = json.loads((path / "config.json").read_text())["architectures"][0]
    model = getattr(transformers, architecture).from_pretrained(path, attn_implementation="eager").eval()
    processor = transformers.AutoProcessor.from_pretrained(path) if (path / "preprocessor_config.json").exists() else None
    return model, processor
