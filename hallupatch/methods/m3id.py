"""M3ID as sangminwoo/AvisC implements it (``avisc_utils/avisc_sample.py``; the paper has no official code;
DESIGN §4e).

The second branch is the same prompt with its image token removed (the text around it stays), with its
own cache. The scores are ``l_c + ((1 - g_t) / g_t) (l_c - l_u)`` on log-softmax, ``g_t = exp(-lambda t)``
with ``t = 1`` at the first generated token (the code's counter starts at 1), ``-inf`` where the main raw
logit is below ``log beta + max``; before every processor and warper.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from hallupatch.engine import Patch
from hallupatch.methods import Method, MethodConfig, register_method
from hallupatch.methods.two_branch import (
    BranchPrompt, GenerateCall, TwoBranch, check_beta, check_family, image_free_prompt, plausibility_cutoff,
)


#: the families this method takes (family name -> the classes it is tested on)
FAMILIES = {
    "llama": "llava-hf LlavaForConditionalGeneration and the original LLaVA class",
    "qwen2_vl": "Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration",
}


@dataclass
class M3IDConfig(MethodConfig):
    """M3ID's knobs.

    Args:
        beta: plausibility cutoff ``log(beta) + max`` on the main branch's raw logits (``cd_beta``; 0 = no mask).
        lambda_decay: ``lambda`` of ``g_t = exp(-lambda t)`` (hard-coded 0.02 in the published code).
    """

    method_name: ClassVar[str] = "m3id"
    beta: float = 0.1
    lambda_decay: float = 0.02

    def validate(self) -> None:
        self.beta = check_beta(self.beta)
        value = self.lambda_decay
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ValueError(f"lambda_decay must be a finite number > 0 (g_t = exp(-lambda_decay * t)); got {value!r}")
        self.lambda_decay = float(value)

    def check_value(self, knob: str, value) -> None:
        check_beta(value, "cd_" + knob)

    def validate_for(self, parts) -> None:
        check_family(parts, "m3id", FAMILIES, "its second branch has not been ported to this family's inputs")


class M3ID(TwoBranch):
    call_inputs = ("cd_beta",)

    def branch_prompt(self, call: GenerateCall) -> BranchPrompt:
        return image_free_prompt(self, call)

    def combine(self, main: torch.Tensor, branch: torch.Tensor, step: int) -> torch.Tensor:
        gamma = math.exp(-self.config.lambda_decay * (step + 1))   # t = 1 at the first generated token
        conditioned = torch.log_softmax(main, dim=-1)
        unconditioned = torch.log_softmax(branch, dim=-1)
        out = conditioned + ((1 - gamma) / gamma) * (conditioned - unconditioned)
        return out.masked_fill(main < plausibility_cutoff(main, self.knob("beta", "cd_beta")), -float("inf"))


def install(patch: Patch, config: M3IDConfig) -> M3ID:
    return M3ID(patch, config)


register_method(Method(name="m3id", config_cls=M3IDConfig, install=install, combinable=False))
