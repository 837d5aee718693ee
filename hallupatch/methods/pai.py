"""PAI, paying more attention to the image (LALBJ/PAI ``attention.py`` and ``CFG.py``; DESIGN §4e).

Two parts, each switchable as published:

- ``use_attn``: in decoder layers ``range(start_layer, end_layer)``, all heads, the last query row's
  pre-softmax scores over the image positions (after the mask) become ``w + alpha |w|``. The image positions
  are where the sample's visual tokens sit in the decoder's sequence (``image_positions``): LLaVA's expanded
  ``<image>`` (one run, as published); on Qwen2-VL every ``<|image_pad|>`` of the prompt, which with several
  images means all of them (the published code knows one run per prompt; its wrapper tokens
  ``<|vision_start|>`` / ``<|vision_end|>`` are not image positions). The scores are computed by the family's
  eager attention (``FamilySpec.eager_attention``) in those layers, whatever ``attn_implementation`` the model
  uses (the published patch runs the eager formula even on an sdpa model, where transformers passes no
  causal mask at prefill; here the causal mask is always applied, so results are the published eager ones).
- ``use_cfg``: a logits processor after transformers' own processors (before the warpers):
  ``gamma (lp - lpu) + lpu`` on log-softmax, ``-inf`` where ``lp < log 0.1 + max lp``, with ``lpu`` from the
  prompt without its image (own cache, never amplified).

Published behaviour kept: with both parts on, the first generated token is not amplified (the layers start
in the branch state and only the processor's first call leaves it); ``gamma == 1`` returns
``log_softmax(scores)`` and amplifies nothing. The amplification acts inside ``generate()`` only.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from hallupatch.engine import Patch
from hallupatch.methods import Method, MethodConfig, register_method
from hallupatch.methods.two_branch import (
    BranchPrompt, GenerateCall, TwoBranch, check_alpha, check_family, image_free_prompt,
)
from hallupatch.methods.image_positions import image_positions
from hallupatch.spec import PassInfo, get_path

CFG_CUTOFF = 0.1   # hard-coded in the published CFG processor


#: the families this method takes (family name -> the classes it is tested on)
FAMILIES = {
    "llama": "llava-hf LlavaForConditionalGeneration and the original LLaVA class",
    "qwen2_vl": "Qwen2VLForConditionalGeneration and Qwen2_5_VLForConditionalGeneration (hallupatch's drop-in files)",
}


@dataclass
class PAIConfig(MethodConfig):
    """PAI's knobs (the published argument names).

    Args:
        alpha: attention amplification ``w + alpha |w|`` on the image columns (0.2).
        gamma: CFG strength ``gamma (lp - lpu) + lpu`` (1.1, the README's value; the eval scripts' command-line
            default is 2). ``gamma == 1`` turns PAI off entirely, as published.
        start_layer, end_layer: amplified decoder layers ``range(start_layer, end_layer)`` (0-based, end
            excluded; 2 and 32 as for LLaVA-1.5-7B; ``end_layer`` must not exceed the model's layer count).
        use_attn: amplify the attention. use_cfg: contrast with the image-free prompt.
    """

    method_name: ClassVar[str] = "pai"
    alpha: float = 0.2
    gamma: float = 1.1
    start_layer: int = 2
    end_layer: int = 32
    use_attn: bool = True
    use_cfg: bool = True

    def validate(self) -> None:
        self.alpha = check_alpha(self.alpha)
        self.gamma = check_alpha(self.gamma, "gamma")
        for name in ("start_layer", "end_layer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0 (a 0-based decoder layer); got {value!r}")
        if self.start_layer >= self.end_layer:
            raise ValueError(f"start_layer must be < end_layer (layers range(start_layer, end_layer)); got {self.start_layer}, {self.end_layer}")
        for name in ("use_attn", "use_cfg"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False; got {getattr(self, name)!r}")
        if not (self.use_attn or self.use_cfg):
            raise ValueError("use_attn and use_cfg are both False: PAI would do nothing; turn one on (or remove the method)")

    def check_value(self, knob: str, value) -> None:
        raise ValueError(f"method 'pai' takes no per-call {knob}")

    def validate_for(self, parts) -> None:
        check_family(parts, "pai", FAMILIES, "PAI rescales the image tokens' attention inside the eager attention "
                     "formula (FamilySpec.eager_attention), which is written and tested per family")
        if self.end_layer > parts.num_layers:
            raise ValueError(
                f"end_layer={self.end_layer} exceeds the model's {parts.num_layers} decoder layers; "
                f"set end_layer <= {parts.num_layers} (PAI amplifies layers range(start_layer, end_layer))"
            )


class PayAttention(TwoBranch):
    placement = "after_processors"

    def __init__(self, patch: Patch, config: PAIConfig):
        super().__init__(patch, config)
        self.amplify = False
        self.image_columns: Optional[torch.Tensor] = None   # (rows, length) bool: each main row's image columns
        patch.on_pass_start(self._start_pass)
        if config.use_attn:
            for index in range(config.start_layer, config.end_layer):
                attention = get_path(self.parts.layers[index], self.parts.spec.layer_attention)
                patch.wrap_method(attention, "forward", functools.partial(self._attention, attention))

    def start(self, call: GenerateCall) -> None:
        self.amplify = self.config.use_attn and not self.config.use_cfg
        self.image_columns = None

    def adds_processor(self) -> bool:
        return self.config.use_cfg

    def uses_branch(self) -> bool:
        return self.config.gamma != 1

    def branch_prompt(self, call: GenerateCall) -> BranchPrompt:
        return image_free_prompt(self, call)

    def combine(self, main: torch.Tensor, branch: Optional[torch.Tensor], step: int) -> torch.Tensor:
        scores = torch.log_softmax(main, dim=-1)
        if branch is None:   # gamma == 1: the published processor returns here, the layers stay unamplified
            return scores
        self.amplify = self.config.use_attn
        unconditioned = torch.log_softmax(branch, dim=-1)
        cutoff = torch.log(torch.tensor(CFG_CUTOFF)).to(scores.device) + scores.max(dim=-1, keepdim=True).values
        out = self.config.gamma * (scores - unconditioned) + unconditioned
        return out.masked_fill(scores < cutoff, -float("inf"))

    # -- the amplified attention --------------------------------------------------------------------
    def _start_pass(self, info: PassInfo) -> None:
        if self.call is None or self.in_branch or not info.is_prefill:
            return
        token = self.parts.spec.image_token_id(self.patch.model)
        ids = self.call.input_ids.repeat_interleave(self.patch.call.row_repeat, dim=0)
        memory = self.patch.generation.visual_memory or [None] * ids.shape[0]
        columns = torch.zeros(ids.shape, dtype=torch.bool)
        for row, (row_ids, tokens) in enumerate(zip(ids, memory)):
            if token is None or tokens is None or not bool((row_ids == token).any()):
                continue
            found = image_positions(row_ids.cpu(), token, tokens.shape[0], "pai")
            if found.merged_length > columns.shape[1]:
                columns = nn.functional.pad(columns, (0, found.merged_length - columns.shape[1]))
            columns[row, found.positions] = True
        self.image_columns = columns

    def _attention(self, attention, original, hidden_states, **call):
        if not (self.amplify and self.call is not None and not self.in_branch and self.image_columns is not None):
            return original(hidden_states, **call)
        return self.parts.spec.eager_attention(attention, original, hidden_states, call, self._amplify)

    def _amplify(self, scores: torch.Tensor) -> torch.Tensor:
        """The last query row's scores over each row's image columns become ``w + alpha |w|``."""
        keys = scores.shape[-1]
        columns = self.image_columns[:, :keys]
        on_image = nn.functional.pad(columns, (0, keys - columns.shape[1])).to(scores.device)   # (batch, keys)
        last = scores[:, :, -1, :]
        scores[:, :, -1, :] = torch.where(on_image[:, None, :], last + self.config.alpha * last.abs(), last)
        return scores


def install(patch: Patch, config: PAIConfig) -> PayAttention:
    return PayAttention(patch, config)


register_method(Method(name="pai", config_cls=PAIConfig, install=install, combinable=False))
