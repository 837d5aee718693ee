"""Where a sample's visual tokens sit in the sequence the decoder sees (PAI's amplified columns, OPERA's
``key_position``), from its ``input_ids`` and its number of visual tokens, for the two layouts of the supported
families:

- the placeholders are already expanded, one per visual token (Qwen2-VL's ``<|image_pad|>``, Idefics2's
  ``<image>``): the decoder's sequence is ``input_ids`` itself and the visual tokens are where the placeholders
  are, one run per image (several runs when a prompt has several images);
- one placeholder per image that the model expands when it merges the image (LLaVA's ``<image>``): the
  visual tokens are one run starting at the placeholder, and the sequence grows by ``n_visual - 1``.

A sample with several images of the second layout is refused: its ids do not say how many tokens each image
has.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class ImagePositions(NamedTuple):
    positions: torch.Tensor   # long, the visual tokens' positions in the decoder's sequence, ascending
    merged_length: int        # the length of that sequence


def image_positions(ids: torch.Tensor, token: int, n_visual: int, method: str) -> ImagePositions:
    """The visual tokens' positions in the decoder's sequence of one sample (``ids``: its 1-D token ids,
    padding included: positions count from the row's first column), for ``method``'s error message."""
    placeholders = (ids == token).nonzero().flatten()
    merged_length = ids.shape[0] + n_visual - len(placeholders)
    if len(placeholders) == n_visual:
        return ImagePositions(placeholders, merged_length)
    if len(placeholders) == 1:
        return ImagePositions(placeholders[0] + torch.arange(n_visual, device=ids.device), merged_length)
    raise ValueError(
        f"method {method!r} needs to know where the image tokens are, and this sample has {len(placeholders)} "
        f"image placeholders (id {token}) for {n_visual} visual tokens: with one placeholder per image that the "
        "model expands, exactly one image per sample is supported (as published); give each sample one image"
    )


def runs(positions: torch.Tensor) -> int:
    """How many contiguous runs ``positions`` (ascending) form (0 for none)."""
    if positions.numel() == 0:
        return 0
    return 1 + int((positions[1:] != positions[:-1] + 1).sum())
