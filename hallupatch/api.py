"""Public entry points: ``apply``, ``remove``, ``patched``, ``set_visual_memory``, ``get_trace``."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from hallupatch.engine import PATCH_ATTRIBUTE, Patch, as_memory_list, get_patch
from hallupatch.methods import parse_method
from hallupatch.spec import resolve


def apply(model: nn.Module, method: str = "memvr", config: Any = None, **knobs: Any) -> nn.Module:
    """Patch ``model`` in place with a decoding-time method and return the same object.

    Args:
        model: a supported model (llama / LLaVA, Qwen-VL-Chat, GLM-4V); unsupported ones raise ``TypeError``.
        method: ``"memvr"``, ``"dola"`` or several joined with ``"+"`` (``"memvr+dola"``).
        config: optional config object(s) (e.g. ``MemVRConfig(...)``), one per method; knobs override them.
        **knobs: the methods' config fields (e.g. ``retracing_ratio=0.2``); each is validated and an
            unknown one raises ``TypeError`` listing the valid knobs.

    Knobs the user does not give take the model family's published defaults, then the config's own.
    A knob that several of the chosen methods have (``early_exit_norm`` in ``"memvr+dola"``) must be set
    through config objects. Applying again replaces the previous configuration (a refused one leaves it
    in place); visual tokens given with :func:`set_visual_memory` are kept.
    """
    methods = parse_method(method)
    parts = resolve(model)
    given = {type(c): c for c in ([] if config is None else config if isinstance(config, (list, tuple)) else [config])}
    valid = {f.name for m in methods for f in dataclasses.fields(m.config_cls)}
    unknown = sorted(set(knobs) - valid)
    if unknown:
        raise TypeError(f"unknown knob(s) {unknown} for method {method!r}; valid knobs: {sorted(valid)}")
    owners = {k: [m.name for m in methods if k in {f.name for f in dataclasses.fields(m.config_cls)}] for k in knobs}
    shared = {k: names for k, names in owners.items() if len(names) > 1}
    if shared:
        raise ValueError(
            f"knob(s) {sorted(shared)} belong to several of the methods {method!r} (their defaults differ); "
            "set them per method with config objects, e.g. config=[hallupatch.MemVRConfig(early_exit_norm=True), "
            "hallupatch.DoLaConfig(early_exit_norm=False)]"
        )
    configs = []
    for m in methods:
        fields = {f.name for f in dataclasses.fields(m.config_cls)}
        base = dataclasses.asdict(given[m.config_cls]) if m.config_cls in given else dict(parts.spec.method_defaults.get(m.name, {}))
        base.update({k: v for k, v in knobs.items() if k in fields})
        cfg = m.config_cls(**base)
        if hasattr(cfg, "validate_for"):
            cfg.validate_for(parts)  # before anything changes: a refused apply keeps the previous patch
        configs.append(cfg)

    previous = get_patch(model)
    remove(model)
    patch = Patch(model, parts)
    if previous is not None:  # visual tokens given by the user are data, not configuration: keep them
        patch.state.explicit_memory = previous.state.explicit_memory
    try:
        for m, cfg in zip(methods, configs):
            patch.configs[m.name] = cfg
            patch.methods[m.name] = m.install(patch, cfg)
    except Exception:
        patch.undo()
        raise
    setattr(model, PATCH_ATTRIBUTE, patch)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo every change ``apply`` made; a no-op on an unpatched model. Returns the same object."""
    patch = get_patch(model)
    if patch is not None:
        patch.undo()
        delattr(model, PATCH_ATTRIBUTE)
    return model


@contextlib.contextmanager
def patched(model: nn.Module, method: str = "memvr", config: Any = None, **knobs: Any) -> Iterator[nn.Module]:
    """``with hallupatch.patched(model, method="memvr"): model.generate(...)``; removed on exit."""
    apply(model, method, config=config, **knobs)
    try:
        yield model
    finally:
        remove(model)


def set_visual_memory(
    model: nn.Module, tokens: Union[torch.Tensor, Sequence[Optional[torch.Tensor]], None]
) -> None:
    """Give a patched model the visual tokens to retrace explicitly (e.g. a plain ``LlamaForCausalLM``).

    ``tokens``: ``(batch, n_tokens, hidden)``, ``(n_tokens, hidden)`` for one sample, or a list with one
    ``(n_i, hidden)`` tensor or ``None`` per sample. It is used for every following generation instead of
    captured images, until replaced or cleared with ``tokens=None``.
    """
    patch = _require_patch(model, "set_visual_memory")
    memory = as_memory_list(tokens)
    hidden = patch.parts.final_norm.weight.shape[-1] if hasattr(patch.parts.final_norm, "weight") else None
    for t in memory or []:
        if t is not None and hidden is not None and t.shape[-1] != hidden:
            raise ValueError(f"visual tokens must have the model's hidden size {hidden}; got {t.shape[-1]}")
    patch.state.explicit_memory = memory


def get_trace(model: nn.Module):
    """MemVR's trace of the latest forward / ``generate()``: per pass and sample, where retracing fired.

    Returns a :class:`~hallupatch.methods.memvr.MemVRTrace`; see ``trace.trigger_layers()`` and
    ``trace.passes[i].entropies``.
    """
    patch = _require_patch(model, "get_trace")
    if "memvr" not in patch.methods:
        raise ValueError("get_trace needs a model patched with MemVR: hallupatch.apply(model, method='memvr')")
    return patch.methods["memvr"].trace


def _require_patch(model: nn.Module, what: str) -> Patch:
    patch = get_patch(model)
    if patch is None:
        raise ValueError(f"{what} needs a patched model: call hallupatch.apply(model, method=...) first")
    return patch
