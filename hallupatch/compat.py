"""``generate()`` on models whose ``forward`` predates an input that transformers' generation now passes.

transformers 4.38+ ``prepare_inputs_for_generation`` returns ``cache_position``, and ``generate()`` calls
``model(**those_inputs)``. A top-level ``forward`` written earlier without ``**kwargs`` (the original
LLaVA repository's ``LlavaLlamaForCausalLM``, unedited) then raises ``forward() got an unexpected keyword
argument 'cache_position'``. The model computes the same positions from its cache when the input is left
out, which is what the usual hand edit of such a file does (accept ``cache_position=None`` and ignore
it). The fix here is generic and per instance: wrap the instance's ``prepare_inputs_for_generation`` so
that it leaves out the generation-only inputs its ``forward`` does not accept, and nothing else.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Dict, Optional, Tuple

from torch import nn

from hallupatch.wrapping import method_wrapper

#: inputs that generation adds for its own bookkeeping and that a model may compute itself when absent
GENERATION_ONLY_INPUTS: Tuple[str, ...] = ("cache_position",)

PREPARE = "prepare_inputs_for_generation"


def unaccepted_generation_inputs(model: nn.Module) -> Tuple[str, ...]:
    """The :data:`GENERATION_ONLY_INPUTS` that ``model.forward`` cannot take (no such parameter, no ``**kwargs``)."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return ()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return ()
    return tuple(name for name in GENERATION_ONLY_INPUTS if name not in parameters)


def drop_inputs(names: Tuple[str, ...], prepare: Callable[..., Dict[str, Any]], *args: Any, **kwargs: Any
                ) -> Dict[str, Any]:
    """``prepare(*args, **kwargs)`` without ``names``: the replacement installed on ``prepare_inputs_for_generation``."""
    inputs = prepare(*args, **kwargs)
    for name in names:
        inputs.pop(name, None)
    return inputs


def _drops_inputs(value: Any) -> bool:
    """Whether ``value`` (an instance attribute) is already a :func:`drop_inputs` wrapper."""
    replacement = value.args[3] if isinstance(value, functools.partial) and len(value.args) == 4 else None
    return isinstance(replacement, functools.partial) and replacement.func is drop_inputs


def generation_inputs_to_drop(model: nn.Module) -> Optional[functools.partial]:
    """The replacement for ``model.prepare_inputs_for_generation`` that ``generate()`` needs (a picklable
    partial of :func:`drop_inputs`), or ``None`` when its ``forward`` takes every input or it has one already."""
    names = unaccepted_generation_inputs(model)
    if not names or not hasattr(model, PREPARE) or _drops_inputs(vars(model).get(PREPARE)):
        return None
    return functools.partial(drop_inputs, names)


def make_generate_compatible(model: nn.Module) -> nn.Module:
    """Make ``model.generate()`` work when the model's ``forward`` lacks an input generation passes.

    For the original LLaVA repository's ``LlavaLlamaForCausalLM`` with transformers 4.40 (whose
    ``forward`` has no ``cache_position``): generation then runs as with the hand-edited file that
    accepts and ignores ``cache_position``, token for token, without editing any file. Only this
    instance changes; a model whose ``forward`` accepts the inputs is left as it is; calling it again
    changes nothing. ``hallupatch.apply`` does the same for the time it is applied (``remove`` undoes
    that); this function is for unpatched models (e.g. an evaluation with no method) and its change
    stays on the instance. Returns the same model.
    """
    drop = generation_inputs_to_drop(model)
    if drop is not None:
        setattr(model, PREPARE, method_wrapper(model, PREPARE, drop))
    return model
