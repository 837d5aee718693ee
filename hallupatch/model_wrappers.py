"""Models inside other libraries' wrappers: PEFT's ``PeftModel`` and ``torch.compile``.

PEFT: hallupatch patches the transformers model inside the wrapper (``PeftModel.get_base_model()``) and
also watches the wrapper's own calls (its ``forward`` reaches the base model through ``.forward``, not
through a module call). Adapters that change weights (LoRA, merged or not) need nothing more; prompt
learning (prefix / prompt tuning) prepends virtual tokens or cache entries to every pass and is refused.

``torch.compile``: ``torch.compile(model)`` is an ``OptimizedModule`` around ``model._orig_mod``, which
is what hallupatch patches. TorchDynamo's compiled code does not check the hooks of the modules it
traced (``torch._dynamo.config.skip_nnmodule_hook_guards``), and it is shared by every instance of a
class: code compiled before a patch keeps running without it, and code compiled with a patch keeps it
after ``remove``. So ``apply`` and ``remove`` discard the process's compiled code
(:func:`forget_compiled_code`); every compiled model compiles again at its next call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

from torch import nn



@dataclass
class Unwrapped:
    """``base``: the model hallupatch patches; ``wrappers``: the modules around it whose calls are calls of
    the model (outermost first), e.g. ``[PeftModel, LoraModel]``."""

    base: nn.Module
    wrappers: List[nn.Module]


def is_peft_model(model: nn.Module) -> bool:
    """A PEFT wrapper (``PeftModel`` and its task subclasses), recognised by its interface."""
    return callable(getattr(type(model), "get_base_model", None)) and hasattr(model, "peft_config")


def unwrap(model: nn.Module) -> Unwrapped:
    """The transformers model inside ``torch.compile``'s and PEFT's wrappers (the model itself otherwise)."""
    original = getattr(model, "_orig_mod", None)
    if isinstance(original, nn.Module):
        return unwrap(original)
    if not is_peft_model(model):
        return Unwrapped(model, [])
    tuner = model.base_model
    base = getattr(tuner, "model", None)
    if not isinstance(base, nn.Module) or base is model:
        return Unwrapped(model, [])
    return Unwrapped(base, [model, tuner])


def refuse_unsupported_wrapper(model: nn.Module) -> None:
    """``TypeError`` for PEFT prompt learning, saying what works instead."""
    model = getattr(model, "_orig_mod", model)
    if is_peft_model(model):
        config = getattr(model, "active_peft_config", None)
        if getattr(config, "is_prompt_learning", False):
            raise TypeError(
                f"hallupatch does not support PEFT prompt learning ({type(config).__name__}): its virtual tokens "
                "are added to every forward pass. Adapters that change weights (LoRA, merged or not) are "
                "supported; for prompt learning, remove the adapter or use the base model"
            )


def forget_compiled_code() -> None:
    """Discard the code TorchDynamo compiled in this process, if any, so that compiled models see the
    hooks as they are now (a no-op when nothing was compiled)."""
    import sys

    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None and dynamo.utils.counters["frames"]["total"] > 0:
        dynamo.reset()
