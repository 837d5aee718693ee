"""Qwen2-VL and Qwen2.5-VL configurations for ``trust_remote_code`` loading under transformers 4.40, written
for hallupatch (the architectures arrived in transformers 4.45 and 4.49).

They read the flat ``config.json`` the hub ships (token ids at the top level, ``vision_config`` with ``in_chans``,
``rope_scaling`` ``{"type": "mrope", "mrope_section": [...]}``) and the form newer transformers re-save
(``"type": "default"`` plus ``"rope_type"``). Only the default (unscaled) rotary frequencies are implemented, as
in the released checkpoints; another ``rope_type`` is refused with a clear error.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from transformers import PretrainedConfig

ROPE_TYPES = ("mrope", "default")


def check_rope_scaling(rope_scaling: Optional[Dict[str, Any]], head_dim: int) -> None:
    """Refuse a ``rope_scaling`` block that the drop-in model cannot honour."""
    if rope_scaling is None:
        raise ValueError('config.json needs "rope_scaling": {"type": "mrope", "mrope_section": [t, h, w]} for Qwen2-VL')
    kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_scaling type {kind!r} is not supported by hallupatch's Qwen2-VL drop-in; "
                         f"use one of {ROPE_TYPES} (the released checkpoints say 'mrope')")
    section = rope_scaling.get("mrope_section")
    if not isinstance(section, (list, tuple)) or len(section) != 3 or sum(section) * 2 != head_dim:
        raise ValueError(f"rope_scaling.mrope_section must be three integers summing to head_dim / 2 = {head_dim // 2}; "
                         f"got {section!r}")


class Qwen2VLVisionConfig(PretrainedConfig):
    model_type = "qwen2_vl"

    def __init__(self, depth=32, embed_dim=1280, hidden_size=3584, hidden_act="quick_gelu", mlp_ratio=4,
                 num_heads=16, in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, **kwargs):
        super().__init__(**kwargs)
        self.depth = depth
        self.embed_dim = embed_dim
        self.hidden_size = hidden_size          # the merger's output width (the language model's hidden size)
        self.hidden_act = hidden_act
        self.mlp_ratio = mlp_ratio
        self.num_heads = num_heads
        self.in_channels = in_channels          # the hub's files also say in_chans (kept as an extra attribute)
        self.patch_size = patch_size
        self.spatial_merge_size = spatial_merge_size
        self.temporal_patch_size = temporal_patch_size


class Qwen2VLConfig(PretrainedConfig):
    model_type = "qwen2_vl"
    vision_config_class = Qwen2VLVisionConfig
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                 num_attention_heads=64, num_key_value_heads=8, hidden_act="silu", max_position_embeddings=32768,
                 initializer_range=0.02, rms_norm_eps=1e-05, use_cache=True, tie_word_embeddings=False,
                 rope_theta=1000000.0, use_sliding_window=False, sliding_window=4096, max_window_layers=80,
                 attention_dropout=0.0, vision_config=None, rope_scaling=None, **kwargs):
        if isinstance(vision_config, PretrainedConfig):
            vision_config = vision_config.to_dict()
        self.vision_config = self.vision_config_class(**(vision_config or {}))
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.use_sliding_window = use_sliding_window
        # as in transformers 4.45-4.51, sliding_window is kept (and masks keys further back than it) even when
        # use_sliding_window is false; the hub's 32768 only matters beyond 32768 positions
        self.sliding_window = sliding_window
        self.max_window_layers = max_window_layers
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.attention_dropout = attention_dropout
        self.rope_scaling = rope_scaling
        if rope_scaling is not None or kwargs.get("architectures"):
            check_rope_scaling(rope_scaling, hidden_size // num_attention_heads)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def to_dict(self) -> Dict[str, Any]:
        output = super().to_dict()
        if isinstance(output.get("vision_config"), PretrainedConfig):
            output["vision_config"] = output["vision_config"].to_dict()
        if isinstance(output.get("vision_config"), dict):
            output["vision_config"].pop("transformers_version", None)
        return output


class Qwen2_5_VLVisionConfig(PretrainedConfig):
    model_type = "qwen2_5_vl"

    def __init__(self, depth=32, hidden_size=3584, hidden_act="silu", intermediate_size=3420, num_heads=16,
                 in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=4,
                 window_size=112, out_hidden_size=3584, fullatt_block_indexes=(7, 15, 23, 31), **kwargs):
        super().__init__(**kwargs)
        self.depth = depth
        self.hidden_size = hidden_size
        self.hidden_act = hidden_act
        self.intermediate_size = intermediate_size
        self.num_heads = num_heads
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.spatial_merge_size = spatial_merge_size
        self.temporal_patch_size = temporal_patch_size
        self.tokens_per_second = tokens_per_second
        self.window_size = window_size
        self.fullatt_block_indexes = list(fullatt_block_indexes)
        self.out_hidden_size = out_hidden_size


class Qwen2_5_VLConfig(Qwen2VLConfig):
    model_type = "qwen2_5_vl"
    vision_config_class = Qwen2_5_VLVisionConfig
