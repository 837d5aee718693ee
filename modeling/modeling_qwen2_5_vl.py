"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``) for ``trust_remote_code`` loading under transformers
4.40, written for hallupatch from transformers 4.51.3's architecture and checked against its outputs.

What differs from Qwen2-VL (``modeling_qwen2_vl.py``, which this file builds on): the vision blocks use RMSNorm
and a SwiGLU MLP with biases; all blocks except ``fullatt_block_indexes`` attend within windows of
``window_size`` pixels (the patches are regrouped window by window before the blocks and put back in order
after the merger); the merger's norm is an RMSNorm; a video's time positions advance by
``second_per_grid_t * tokens_per_second`` per temporal patch (images: 0).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_qwen2_vl import Qwen2_5_VLConfig
from .modeling_qwen2_vl import (PatchEmbed, PatchMerger, Qwen2MLP, Qwen2RMSNorm, Qwen2VLForConditionalGeneration,
                                VisionAttention, VisionRotaryEmbedding, grid_rotary_angles, image_boundaries)


class Qwen2_5_VLVisionBlock(nn.Module):
    def __init__(self, config, attn_implementation: str) -> None:
        super().__init__()
        self.norm1 = Qwen2RMSNorm(config.hidden_size, eps=1e-6)
        self.norm2 = Qwen2RMSNorm(config.hidden_size, eps=1e-6)
        self.attn = VisionAttention(config.hidden_size, config.num_heads, attn_implementation)
        self.mlp = Qwen2MLP(config.hidden_size, config.intermediate_size, config.hidden_act, bias=True)

    def forward(self, hidden_states, cu_seqlens, position_embeddings):
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states), cu_seqlens, position_embeddings)
        return hidden_states + self.mlp(self.norm2(hidden_states))


class Qwen2_5_VisionTransformer(nn.Module):
    def __init__(self, config, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        self.spatial_merge_size = config.spatial_merge_size
        self.spatial_merge_unit = config.spatial_merge_size ** 2
        self.patch_size = config.patch_size
        self.window_size = config.window_size
        self.fullatt_block_indexes = list(config.fullatt_block_indexes)
        self.patch_embed = PatchEmbed(config.patch_size, config.temporal_patch_size, config.in_channels,
                                      config.hidden_size)
        self.rotary_pos_emb = VisionRotaryEmbedding(config.hidden_size // config.num_heads // 2)
        self.blocks = nn.ModuleList([Qwen2_5_VLVisionBlock(config, attn_implementation) for _ in range(config.depth)])
        self.merger = PatchMerger(config.out_hidden_size, config.hidden_size, config.spatial_merge_size,
                                  norm=Qwen2RMSNorm(config.hidden_size, eps=1e-6))

    def get_dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    def window_order(self, grid_thw: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
        """The merge units (2x2 patch groups) regrouped window by window, and the windows' cumulative patch
        counts. A window is ``window_size`` pixels square; the grid is padded to whole windows, padding dropped."""
        order: List[torch.Tensor] = []
        boundaries = [0]
        offset = 0
        units_per_window = self.window_size // self.spatial_merge_size // self.patch_size
        for t, h, w in grid_thw.tolist():
            grid_h, grid_w = h // self.spatial_merge_size, w // self.spatial_merge_size
            index = torch.arange(t * grid_h * grid_w).reshape(t, grid_h, grid_w)
            pad_h = units_per_window - grid_h % units_per_window
            pad_w = units_per_window - grid_w % units_per_window
            windows_h, windows_w = (grid_h + pad_h) // units_per_window, (grid_w + pad_w) // units_per_window
            padded = F.pad(index, (0, pad_w, 0, pad_h), "constant", -100)
            padded = padded.reshape(t, windows_h, units_per_window, windows_w, units_per_window)
            padded = padded.permute(0, 1, 3, 2, 4).reshape(t, windows_h * windows_w, units_per_window, units_per_window)
            sizes = (padded != -100).sum([2, 3]).reshape(-1)
            padded = padded.reshape(-1)
            order.append(padded[padded != -100] + offset)
            boundaries.extend((sizes.cumsum(0) * self.spatial_merge_unit + boundaries[-1]).tolist())
            offset += t * grid_h * grid_w
        return torch.cat(order, dim=0), boundaries

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        hidden_states = self.patch_embed(pixel_values)
        angles = grid_rotary_angles(self.rotary_pos_emb, grid_thw, self.spatial_merge_size)
        order, window_bounds = self.window_order(grid_thw)
        window_bounds = torch.unique_consecutive(torch.tensor(window_bounds, device=hidden_states.device,
                                                              dtype=torch.int32))
        length = hidden_states.shape[0]
        unit = self.spatial_merge_unit
        hidden_states = hidden_states.reshape(length // unit, unit, -1)[order].reshape(length, -1)
        angles = angles.reshape(length // unit, unit, -1)[order].reshape(length, -1)
        angles = torch.cat((angles, angles), dim=-1)
        position_embeddings = (angles.cos(), angles.sin())
        image_bounds = image_boundaries(grid_thw)
        for index, block in enumerate(self.blocks):
            bounds = image_bounds if index in self.fullatt_block_indexes else window_bounds
            hidden_states = block(hidden_states, bounds, position_embeddings)
        return self.merger(hidden_states)[torch.argsort(order)]


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    config_class = Qwen2_5_VLConfig
    vision_tower_class = Qwen2_5_VisionTransformer

    def vision_time_positions(self, t: int, tokens_per_frame: int, seconds_per_grid: Optional[float]) -> torch.Tensor:
        """Images: 0; videos: temporal patch ``i`` at ``int(i * second_per_grid_t * tokens_per_second)``."""
        seconds = 0 if seconds_per_grid is None else seconds_per_grid
        steps = torch.arange(t).view(-1, 1).expand(-1, tokens_per_frame)
        return (steps * seconds * self.config.vision_config.tokens_per_second).long().flatten()
