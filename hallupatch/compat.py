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

import inspect
from typing import Any, Callable, Dict, Tuple

from torch import nn

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


class InputsDroppedForForward:
    """A model's ``prepare_inputs_for_generation`` that leaves out ``names`` (inputs its ``forward`` lacks).

    A callable object rather than a closure, so a deep copy of the model gets a wrapper bound to the copy.
    It shows the wrapped method's signature: generation reads it (e.g. whether ``inputs_embeds`` is taken).
    """

    def __init__(self, prepare: Callable[..., Dict[str, Any]], names: Tuple[str, ...]):
        self.prepare = prepare
        self.names = names

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.prepare)

    def __call__(self, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        inputs = self.prepare(*args, **kwargs)
        for name in self.names:
            inputs.pop(name, None)
        return inputs


def generation_inputs_wrapper(model: nn.Module):
    """The replacement of ``model.prepare_inputs_for_generation`` that ``generate()`` needs, or ``None``."""
    current = getattr(model, PREPARE, None)
    names = unaccepted_generation_inputs(model)
    if current is None or not names or isinstance(current, InputsDroppedForForward):
        return None
    return InputsDroppedForForward(current, names)


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
    wrapper = generation_inputs_wrapper(model)
    if wrapper is not None:
        setattr(model, PREPARE, wrapper)
    return model
