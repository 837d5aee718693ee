"""Early-exit heads: next-token logits read from any layer (the logit lens).

Hidden-state indices follow transformers' ``output_hidden_states`` tuple (DESIGN §4a): index 0 is the
embedding output, index ``k`` (1 <= k < N) the raw output of decoder layer ``k`` (1-based), index ``N``
the last layer's output *after* the final norm. "After 0-based decoder layer ``l``" is index ``l + 1``.
"""
from __future__ import annotations

import operator
from typing import Sequence, Union

import torch
from torch import nn

from hallupatch.spec import ModelParts, resolve
from hallupatch.model_wrappers import unwrap


def parts_of(model: nn.Module) -> ModelParts:
    """The resolved parts of a model, reusing the patch's resolution when the model is patched."""
    from hallupatch.engine import get_patch

    patch = get_patch(model)
    return patch.parts if patch is not None else resolve(unwrap(model).base)


def head_logits(parts: ModelParts, hidden: torch.Tensor, norm: bool = True) -> torch.Tensor:
    """``lm_head(final_norm(hidden))`` (``norm=True``) or ``lm_head(hidden)``, in the model's dtype."""
    if norm:
        hidden = parts.final_norm(hidden)
    return parts.lm_head(hidden)


def early_exit_logits(
    model: nn.Module,
    hidden_states: Union[torch.Tensor, Sequence[torch.Tensor]],
    layer: int,
    norm: bool = True,
) -> torch.Tensor:
    """Logits of one layer's hidden state: ``lm_head(final_norm(h))``, the logit lens in one call.

    At the last index this equals the model's own logits.

    Args:
        model: any supported model (patched or not).
        hidden_states: either the tuple from ``output_hidden_states=True`` (``layer`` indexes it) or a
            single tensor ``(..., hidden)`` that is hidden-state index ``layer``.
        layer: hidden-state index, 0 (embeddings) to N (final, already normalised); negative values
            count from the end as in Python.
        norm: apply the final norm first (the logit lens, MemVR's choice); ``False`` gives
            ``lm_head(h)`` as DoLa uses. At index N the final norm is applied only where the family's
            last hidden state lacks it (GLM-4V), so it is never applied twice.
    """
    parts = parts_of(model)
    n = parts.num_layers
    usage = f"layer must be an int hidden-state index in [0, {n}] (or negative from the end)"
    try:
        index = operator.index(layer)  # ints, numpy ints, integer scalar tensors; not floats or strings
    except TypeError:
        raise TypeError(f"{usage}; got {layer!r} of type {type(layer).__name__}") from None
    if isinstance(layer, bool):
        raise TypeError(f"{usage}; got {layer!r}")
    if not -(n + 1) <= index <= n:
        raise ValueError(f"{usage}; got {index}")
    layer = index % (n + 1)
    hidden = _hidden_state_at(hidden_states, layer, n)
    expected = parts.lm_head.weight.shape[-1] if hasattr(parts.lm_head, "weight") else None
    if expected is not None and (hidden.dim() == 0 or hidden.shape[-1] != expected):
        raise ValueError(
            f"hidden_states must end in the model's hidden size {expected} (..., {expected}); got shape "
            f"{tuple(hidden.shape)}"
        )
    already_normed = layer == n and parts.spec.final_hidden_normed
    return head_logits(parts, hidden, norm=norm and not already_normed)


def _hidden_state_at(hidden_states, layer: int, num_layers: int) -> torch.Tensor:
    """Hidden-state index ``layer`` of ``hidden_states`` (one tensor, or forward's per-layer tuple)."""
    if isinstance(hidden_states, torch.Tensor):
        return hidden_states
    if not isinstance(hidden_states, (tuple, list)):
        raise TypeError(
            "hidden_states must be a torch.Tensor (..., hidden) or the tuple of output_hidden_states=True; got "
            f"{type(hidden_states).__name__}" + (" (convert it with torch.from_numpy)" if hasattr(hidden_states, "__array__") else "")
        )
    if hidden_states and isinstance(hidden_states[0], (tuple, list)):
        raise TypeError(
            f"hidden_states is nested ({len(hidden_states)} tuples): generate() returns one hidden-state tuple per "
            "generated step; pass one step's tuple, e.g. out.hidden_states[step]"
        )
    if len(hidden_states) != num_layers + 1:
        raise ValueError(
            f"hidden_states has {len(hidden_states)} entries; this model's output_hidden_states tuple has "
            f"{num_layers + 1} (embeddings + {num_layers} layers)"
        )
    hidden = hidden_states[layer]
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden_states[{layer}] must be a torch.Tensor; got {type(hidden).__name__}")
    return hidden
