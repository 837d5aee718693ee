"""Helpers for the trust_remote_code tests: tiny Qwen-VL-Chat / GLM-4V checkpoints and padded batches.

The checkpoints are built by ``tiny_remote`` (tests/) (our drop-in modeling file next to stand-ins of the
sibling files with the upstream interface) and always loaded through ``from_pretrained(trust_remote_code=True)``.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from transformers import AutoModelForCausalLM

import tiny_remote

QWEN_HIDDEN = 32
NUM_LAYERS = 4
# greedy decoding that never stops early, so outputs have a known length
GREEDY = dict(do_sample=False, eos_token_id=-1)   # -1 never occurs: no early stop, known lengths


def load(path: Path, **kwargs):
    """``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``, freshly imported, eval mode."""
    tiny_remote.forget_remote_modules()
    loaded = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, **kwargs)
    if isinstance(loaded, tuple):   # output_loading_info=True
        return loaded[0].eval(), loaded[1]
    return loaded.eval()


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` for token lists of different lengths."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def qwen_rows(tmp_path: Path, texts: Sequence[str], images: Sequence[Optional[int]]) -> List[List[int]]:
    """Token ids of ``<img>path</img>text`` prompts (``images[i]``: image seed, or None for text only)."""
    tokenizer = tiny_remote.ByteTokenizer()
    rows = []
    for text, seed in zip(texts, images):
        prefix = ""
        if seed is not None:
            path = tiny_remote.write_tiny_image(tmp_path / f"image_{seed}.png", seed=seed)
            prefix = f"<img>{path}</img>"
        rows.append(tokenizer.encode(prefix + text))
    return rows


def glm_position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding (as GLM-4's tokenizer pads them): 0 on pads, then 0, 1, ..."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def glm_inputs(texts: Sequence[Sequence[int]], image_seed: int = 0):
    """A left-padded GLM-4V batch, one image per row: ``dict(input_ids, attention_mask, position_ids, images)``."""
    rows = [tiny_remote.glm_prompt(t) for t in texts]
    ids, mask = left_pad(rows, tiny_remote.GLM_PAD)
    images = torch.stack([tiny_remote.glm_image_batch(1, seed=image_seed + i)[0] for i in range(len(rows))])
    return dict(input_ids=ids, attention_mask=mask, position_ids=glm_position_ids(mask), images=images)
