"""VCD, visual contrastive decoding (DAMO-NLP-SG/VCD, ``vcd_utils/``; DESIGN §4e).

The second branch sees the same prompt with the image distorted by the diffusion forward process; the
scores are ``(1 + alpha) z - alpha z'`` on raw logits, ``-inf`` where the main logit is below
``log beta + max z``, before every transformers processor and warper (so greedy decoding contrasts too,
which the published sampler-only code does not).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional

import torch

from hallupatch.engine import Patch
from hallupatch.methods import Method, MethodConfig, register_method
from hallupatch.methods.two_branch import (
    BranchPrompt, GenerateCall, TwoBranch, check_alpha, check_beta, check_family, contrast_raw,
)

DIFFUSION_STEPS = 1000
SEED_LIMIT = 2 ** 64


def diffusion_noise_scales(noise_step: int):
    """``(sqrt(abar[t]), sqrt(1 - abar[t]))`` of VCD's schedule, in float32 as published:
    ``betas = sigmoid(linspace(-6, 6, 1000)) * (5e-3 - 1e-5) + 1e-5``, ``abar = cumprod(1 - betas)``."""
    betas = torch.sigmoid(torch.linspace(-6, 6, DIFFUSION_STEPS)) * (0.5e-2 - 1e-5) + 1e-5
    abar = torch.cumprod(1 - betas, dim=0)
    return torch.sqrt(abar)[noise_step], torch.sqrt(1 - abar)[noise_step]


def add_diffusion_noise(pixels: torch.Tensor, noise_step: int, generator: Optional[torch.Generator] = None
                        ) -> torch.Tensor:
    """VCD's distorted image: ``sqrt(abar[t]) x + sqrt(1 - abar[t]) eps`` on the normalised pixel tensor.

    ``eps`` is drawn on the CPU in float32 for the whole tensor at once (``torch.randn_like`` of the
    published script's float32 CPU image tensor), from ``generator`` or torch's global generator; the
    result has ``pixels``' dtype and device.
    """
    keep, noise = diffusion_noise_scales(noise_step)
    eps = torch.randn(pixels.shape, dtype=torch.float32, generator=generator)
    return (keep * pixels.detach().float().cpu() + noise * eps).to(pixels.device, pixels.dtype)


#: the families this method takes (family name -> the classes it is tested on)
FAMILIES = {
    "llama": "llava-hf LlavaForConditionalGeneration and the original LLaVA class",
    "qwen2_vl": "Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration",
}


@dataclass
class VCDConfig(MethodConfig):
    """VCD's knobs (the published argument names).

    Args:
        alpha: contrast strength (``cd_alpha``; the papers' and eval scripts' 1; the sampler's own fallback is 0.5).
        beta: plausibility cutoff ``log(beta) + max z`` on the main branch's raw logits (``cd_beta``; 0 = no mask).
        noise_step: the diffusion step, a 0-based index into the 1000-step schedule (500: ``0.86302 x + 0.50517 eps``).
        noise_seed: ``None`` draws the noise from torch's global generator at the start of each ``generate()``
            (so ``transformers.set_seed(s)`` reproduces the published run); an int draws each sample's noise
            from its own generator seeded with it: the same noise every call, whatever the batch, independent
            of the sampling stream.
    """

    method_name: ClassVar[str] = "vcd"
    alpha: float = 1.0
    beta: float = 0.1
    noise_step: int = 500
    noise_seed: Optional[int] = None

    @classmethod
    def draws_random_numbers(cls, knobs: Mapping[str, Any]) -> bool:
        """Without ``noise_seed`` the distorted image is drawn from the global generator at each call."""
        return knobs.get("noise_seed") is None

    def validate(self) -> None:
        self.alpha = check_alpha(self.alpha)
        self.beta = check_beta(self.beta)
        if isinstance(self.noise_step, bool) or not isinstance(self.noise_step, int) or not 0 <= self.noise_step < DIFFUSION_STEPS:
            raise ValueError(f"noise_step must be an int in [0, {DIFFUSION_STEPS - 1}] (a 0-based diffusion step); got {self.noise_step!r}")
        if self.noise_seed is not None and (
            isinstance(self.noise_seed, bool) or not isinstance(self.noise_seed, int) or not 0 <= self.noise_seed < SEED_LIMIT
        ):
            raise ValueError(f"noise_seed must be None or an int with 0 <= noise_seed < 2**64; got {self.noise_seed!r}")

    def check_value(self, knob: str, value) -> None:
        (check_alpha if knob == "alpha" else check_beta)(value, "cd_" + knob)

    def validate_for(self, parts) -> None:
        check_family(parts, "vcd", FAMILIES, "its second branch has not been ported to this family's inputs")


class VisualContrast(TwoBranch):
    call_inputs = ("images_cd", "cd_alpha", "cd_beta")

    def start(self, call: GenerateCall) -> None:
        given = call.extras.get("images_cd")
        if call.image is None:
            raise ValueError(
                "method 'vcd' needs an image: pass generate(pixel_values=...) (llava-hf) or generate(images=...) "
                "(original LLaVA)"
            )
        if given is not None:
            if tuple(given.shape) != tuple(call.image.shape):
                raise ValueError(
                    f"images_cd must have the image's shape {tuple(call.image.shape)}; got {tuple(given.shape)}"
                )
            self.images_cd = given.to(call.image.device, call.image.dtype)
        elif self.config.noise_seed is not None and call.companions:
            raise ValueError(
                f"noise_seed draws each sample's noise from its own generator, but this model's image inputs have no "
                f"batch dimension (they come with {sorted(call.companions)}): use noise_seed=None (seed the call with "
                "transformers.set_seed) or pass generate(images_cd=...)"
            )
        elif self.config.noise_seed is None:   # the published draw: the whole tensor, global generator
            self.images_cd = add_diffusion_noise(call.image, self.config.noise_step)
        else:   # one generator per sample, so a sample's noise does not depend on its batch companions
            self.images_cd = torch.cat([
                add_diffusion_noise(row[None], self.config.noise_step, torch.Generator().manual_seed(self.config.noise_seed))
                for row in call.image
            ])
        self.trace.images_cd = self.images_cd

    def branch_prompt(self, call: GenerateCall) -> BranchPrompt:
        return BranchPrompt(call.input_ids, call.attention_mask, self.images_cd)

    def combine(self, main, branch, step):
        return contrast_raw(main, branch, self.knob("alpha", "cd_alpha"), self.knob("beta", "cd_beta"))


def install(patch: Patch, config: VCDConfig) -> VisualContrast:
    return VisualContrast(patch, config)


register_method(Method(name="vcd", config_cls=VCDConfig, install=install, combinable=False))
