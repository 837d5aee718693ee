"""Tiny, deterministic, random-weight LLaVA models and processors, built without any download.

They power the embedded defaults (``python -m hallupatch``, ``python -m hallupatch.eval mme``), the tests
and the CPU-sized benchmarks. The tokenizer is word level (built with ``tokenizers``) and the image
processor a small ``CLIPImageProcessor``, so a ``LlavaProcessor`` saves and reloads like a real one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
WORDS = (
    "a an the is are was there this that it in on of and or to with what which how many color picture image "
    "photo shown here yes no not man woman person people dog cat car bus train bird horse sheep cow boat "
    "table chair bed tv phone cup bottle pizza cake red green blue yellow black white one two three four "
    "five left right top bottom answer question using single word phrase please describe detail chat between "
    "curious human artificial intelligence assistant gives helpful detailed polite answers human's questions "
    "user does do can you see object objects scene count position square circle stripe background foreground "
    "shape large small big tiny any some more than less"
).split()
PUNCTUATION = list(".,?!:;'\"()[]-")
LM_HEAD_GAIN = 3.0  # peakier next-token distributions than unit-variance logits


def tiny_tokenizer():
    """A word-level ``LlamaTokenizerFast`` (whitespace and punctuation split, unknown words -> ``<unk>``)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import LlamaTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + sorted(set(WORDS)) + PUNCTUATION)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer = LlamaTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        add_bos_token=True,
        add_eos_token=False,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def tiny_llava(
    seed: int = 0,
    num_layers: int = 4,
    hidden_size: int = 64,
    image_size: int = 56,
    dtype: torch.dtype = torch.float32,
):
    """A random-weight ``LlavaForConditionalGeneration`` and its ``LlavaProcessor``; same seed, same model.

    The config sets ``pad_token_id`` (as llava-hf checkpoints do) so left-padded batches decode right.
    """
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = tiny_tokenizer()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    vision_config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=14,
        projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = "eager"
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlavaForConditionalGeneration(config)
        _spread_weights(model)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.to(dtype).eval(), processor


def _spread_weights(model: torch.nn.Module) -> None:
    """Random init with a wider spread than transformers' (std 0.02), so a tiny model's early-exit
    distributions differ across layers and tokens instead of all being nearly uniform."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                gain = LM_HEAD_GAIN if name.endswith("lm_head.weight") else 1.0
                param.normal_(0.0, gain / param.shape[-1] ** 0.5)


def build_tiny_llava_checkpoint(path: Union[str, Path], seed: int = 0, **kwargs) -> Path:
    """Save a :func:`tiny_llava` model and processor to ``path`` (loadable with ``from_pretrained``)."""
    path = Path(path)
    model, processor = tiny_llava(seed=seed, **kwargs)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path


def tiny_image(seed: int, size: int = 56):
    """A deterministic RGB ``PIL.Image`` of random coloured blocks."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (3, 4, 4), generator=generator, dtype=torch.uint8)
    pixels = blocks.repeat_interleave(size // 4, 1).repeat_interleave(size // 4, 2)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy(), mode="RGB")
