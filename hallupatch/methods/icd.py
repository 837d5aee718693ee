"""ICD, instruction contrastive decoding (p1k0pan/ICD, ``icd_utils/icd_sample_llava.py``; DESIGN §4e).

The second branch sees the same conversation (same user turn, same image) with the system prompt
replaced by a disturbing instruction; the combination is VCD's (raw logits, ``(1 + alpha) z - alpha z'``,
cutoff on the main branch), before every processor and warper. The branch's ids come with the call,
``generate(input_ids_cd=...)``, as in the published scripts; :func:`icd_prompt` builds its text.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional, Tuple, Union

import torch

from hallupatch.engine import Patch
from hallupatch.methods import Method, MethodConfig, register_method
from hallupatch.methods.two_branch import (
    BranchPrompt, GenerateCall, TwoBranch, check_alpha, check_beta, check_family, contrast_raw, pad_token_id,
)

INSTRUCTIONS_PATH = Path(__file__).resolve().parent.parent / "data" / "icd_instructions.txt"
#: the five disturbing instructions of ICD's LLaVA POPE script, in its order; the default is the first
ICD_INSTRUCTIONS: Tuple[str, ...] = tuple(
    line.strip() for line in INSTRUCTIONS_PATH.read_text(encoding="utf-8").splitlines() if line.strip()
)
#: LLaVA's system prompts (conversation templates ``llava_v1`` and ``vicuna_v1``), recognised by :func:`icd_prompt`
LLAVA_SYSTEM_PROMPTS: Tuple[str, ...] = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
)
#: Qwen2-VL's and Qwen2.5-VL's chat template's default system turn
QWEN2_VL_SYSTEM_PROMPT = "You are a helpful assistant."
#: the system prompts :func:`icd_prompt` finds without ``system=``, tried in this order
KNOWN_SYSTEM_PROMPTS: Tuple[str, ...] = LLAVA_SYSTEM_PROMPTS + (QWEN2_VL_SYSTEM_PROMPT,)


def icd_prompt(prompt: str, instruction: Union[int, str] = 0, system: Optional[str] = None) -> str:
    """ICD's second-branch prompt: ``prompt`` with its system prompt replaced by a disturbing instruction.

    Args:
        prompt: the rendered main prompt (e.g. LLaVA's ``"<system> USER: <image>\\n<question> ASSISTANT:"``).
        instruction: an index into :data:`ICD_INSTRUCTIONS` (default 0, the first published text) or the text.
        system: the system prompt to replace; ``None`` finds one of :data:`KNOWN_SYSTEM_PROMPTS` (LLaVA's,
            Qwen2-VL's default).

    The published script renders the same conversation with the ``llava_custom`` template, whose system
    text is the instruction: only the system prompt changes.
    """
    if isinstance(instruction, int) and not isinstance(instruction, bool):
        if not 0 <= instruction < len(ICD_INSTRUCTIONS):
            raise ValueError(f"instruction index must be in [0, {len(ICD_INSTRUCTIONS) - 1}]; got {instruction}")
        text = ICD_INSTRUCTIONS[instruction]
    elif isinstance(instruction, str) and instruction.strip():
        text = instruction
    else:
        raise ValueError(f"instruction must be an index into ICD_INSTRUCTIONS or a non-empty string; got {instruction!r}")
    candidates = [system] if system is not None else list(KNOWN_SYSTEM_PROMPTS)
    found = next((s for s in candidates if s and s in prompt), None)
    if found is None:
        raise ValueError(
            "icd_prompt found no system prompt to replace in the prompt; pass system='<the system text>' "
            f"(recognised without it: LLaVA's llava_v1 / vicuna_v1 system prompts, Qwen2-VL's default). Prompt: {prompt[:80]!r}"
        )
    return prompt.replace(found, text, 1)


#: the families this method takes (family name -> the classes it is tested on)
FAMILIES = {
    "llama": "LLaVA in both forms and llama-family text models",
    "qwen2_vl": "Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration",
}


@dataclass
class ICDConfig(MethodConfig):
    """ICD's knobs (the published argument names).

    Args:
        alpha: contrast strength (``cd_alpha``; the eval scripts' 1; the sampler's own fallback is 0.5).
        beta: plausibility cutoff ``log(beta) + max z`` on the main branch's raw logits (``cd_beta``; 0 = no mask).
        instruction: the disturbing instruction used where hallupatch builds the branch's prompt itself (the
            eval harness; :func:`branch_call_inputs`): an index into :data:`ICD_INSTRUCTIONS` or the text.
            ``generate(input_ids_cd=...)`` given by the caller is used as it is.
    """

    method_name: ClassVar[str] = "icd"
    alpha: float = 1.0
    beta: float = 0.1
    instruction: Union[int, str] = 0

    def validate(self) -> None:
        self.alpha = check_alpha(self.alpha)
        self.beta = check_beta(self.beta)
        icd_prompt(LLAVA_SYSTEM_PROMPTS[0], self.instruction)   # a ValueError naming the valid range

    def check_value(self, knob: str, value) -> None:
        (check_alpha if knob == "alpha" else check_beta)(value, "cd_" + knob)

    def validate_for(self, parts) -> None:
        check_family(parts, "icd", FAMILIES, "its second branch has not been ported to this family's inputs")


class InstructionContrast(TwoBranch):
    call_inputs = ("input_ids_cd", "attention_mask_cd", "cd_alpha", "cd_beta")

    def start(self, call: GenerateCall) -> None:
        ids = call.extras.get("input_ids_cd")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != call.input_ids.shape[0]:
            raise ValueError(
                "method 'icd' needs generate(input_ids_cd=...): the disturbed prompt's ids, one row per sample "
                f"({call.input_ids.shape[0]}); build its text with hallupatch.icd_prompt(prompt)"
            )
        mask = call.extras.get("attention_mask_cd")
        if mask is not None and tuple(mask.shape) != tuple(ids.shape):
            raise ValueError(f"attention_mask_cd must have input_ids_cd's shape {tuple(ids.shape)}; got {tuple(mask.shape)}")

    def branch_prompt(self, call: GenerateCall) -> BranchPrompt:
        ids = call.extras["input_ids_cd"].to(call.input_ids.device)
        mask = call.extras.get("attention_mask_cd")
        if mask is None:
            pad = pad_token_id(self.patch.model)
            mask = (ids != pad).long() if pad is not None else torch.ones_like(ids)
        return BranchPrompt(ids, mask, call.image)

    def combine(self, main, branch, step):
        return contrast_raw(main, branch, self.knob("alpha", "cd_alpha"), self.knob("beta", "cd_beta"))

    def prompt_inputs(self, prompts, encode) -> dict:
        """``generate()``'s ``input_ids_cd`` (and ``attention_mask_cd``) for rendered ``prompts``, tokenized by
        ``encode`` (the caller's tokenizer call, left-padded: a mapping with ``input_ids``, ``attention_mask``)."""
        encoded = encode([icd_prompt(p, self.config.instruction) for p in prompts])
        out = {"input_ids_cd": encoded["input_ids"]}
        if encoded.get("attention_mask") is not None:
            out["attention_mask_cd"] = encoded["attention_mask"]
        return out


def install(patch: Patch, config: ICDConfig) -> InstructionContrast:
    return InstructionContrast(patch, config)


register_method(Method(name="icd", config_cls=ICDConfig, install=install, combinable=False))
