"""Public entry points: ``apply``, ``remove``, ``patched``, ``set_visual_memory``, ``get_trace``."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from hallupatch.engine import (  # noqa: F401  (get_trace: public here)
    PATCH_ATTRIBUTE, Patch, as_memory_list, checkpointing_modules, get_patch, get_trace, refuse_gradient_checkpointing,
    require_patch,
)
from hallupatch.methods import Method, MethodConfig, parse_method
from hallupatch.methods.memvr import memory_problem
from hallupatch.spec import resolve
from hallupatch.model_wrappers import forget_compiled_code, refuse_unsupported_wrapper, unwrap


def apply(model: nn.Module, method: str = "memvr", config: Any = None, **knobs: Any) -> nn.Module:
    """Patch ``model`` in place with a decoding-time method and return the same object.

    Args:
        model: a supported model (llama / LLaVA, Qwen-VL-Chat, GLM-4V), or PEFT's ``PeftModel`` around one
            (the model inside is patched; LoRA adapters merged or not), or ``torch.compile(model)`` (its
            ``_orig_mod``; code already compiled in the process is discarded and compiles again with the
            patch). Unsupported models raise ``TypeError``.
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
    refuse_unsupported_wrapper(model)
    target = unwrap(model)
    parts = resolve(target.base)
    configs = build_configs(methods, parts.spec.method_defaults, config, knobs, method)
    for cfg in configs:
        cfg.validate_for(parts)  # before anything changes: a refused apply keeps the previous patch
    refuse_gradient_checkpointing(checkpointing_modules(model))

    previous = get_patch(model)
    remove(model)
    patch = Patch(target.base, parts, wrappers=target.wrappers)
    if previous is not None:  # visual tokens given by the user are data, not configuration: keep them
        patch.explicit_memory = previous.explicit_memory
    try:
        for m, cfg in zip(methods, configs):
            patch.configs[m.name] = cfg
            patch.methods[m.name] = m.install(patch, cfg)
    except Exception:
        patch.undo()
        raise
    setattr(target.base, PATCH_ATTRIBUTE, patch)
    forget_compiled_code()
    return model


def build_configs(methods: Sequence[Method], family_defaults: Mapping[str, Mapping[str, Any]], config: Any,
                  knobs: Mapping[str, Any], method: str) -> List[MethodConfig]:
    """One validated config per method: a given config object, else the family's published defaults,
    then ``knobs`` on top (a knob that several of the methods have must come through config objects)."""
    given = configs_by_class(methods, config, method)
    valid = {k for m in methods for k in m.config_cls.knobs()}
    unknown = sorted(set(knobs) - valid)
    if unknown:
        raise TypeError(f"unknown knob(s) {unknown} for method {method!r}; valid knobs: {sorted(valid)}")
    owners = {k: [m.name for m in methods if k in m.config_cls.knobs()] for k in knobs}
    shared = {k: names for k, names in owners.items() if len(names) > 1}
    if shared:
        raise ValueError(
            f"knob(s) {sorted(shared)} belong to several of the methods {method!r} (their defaults differ); "
            "set them per method with config objects, e.g. config=[hallupatch.MemVRConfig(early_exit_norm=True), "
            "hallupatch.DoLaConfig(early_exit_norm=False)]"
        )
    configs = []
    for m in methods:
        base = given[m.config_cls].to_dict() if m.config_cls in given else dict(family_defaults.get(m.name, {}))
        base.update({k: v for k, v in knobs.items() if k in m.config_cls.knobs()})
        configs.append(m.config_cls.from_dict(base))
    return configs


def configs_by_class(methods: Sequence[Method], config: Any, method: str) -> dict:
    """``config`` (``None``, one config object or a list/tuple of them) as ``{config class: object}``.

    Every object must be an instance of one of the methods' config classes, at most one per class:
    a config that does not belong to the method is refused, never replaced by defaults.
    """
    given = [] if config is None else list(config) if isinstance(config, (list, tuple)) else [config]
    expected = {m.config_cls: m.name for m in methods}
    names = ", ".join(f"{cls.__name__} (for {name!r})" for cls, name in expected.items())
    by_class: dict = {}
    for obj in given:
        owner = next((cls for cls in expected if isinstance(obj, cls)), None)
        if owner is None:
            raise TypeError(
                f"config={obj!r} does not belong to method {method!r}: pass config objects of the classes "
                f"{names}, e.g. config=hallupatch.{next(iter(expected)).__name__}(...), or knobs as keywords"
            )
        if owner in by_class:
            raise ValueError(
                f"config has two {owner.__name__} objects for method {method!r}; give one config per method"
            )
        by_class[owner] = obj
    return by_class


def remove(model: nn.Module) -> nn.Module:
    """Undo every change ``apply`` made; a no-op on an unpatched model. Returns the same object.
    (Works through PEFT's and torch.compile's wrappers as ``apply`` does.)"""
    patch = get_patch(model)
    if patch is not None:
        patch.undo()
        delattr(patch.model, PATCH_ATTRIBUTE)
        forget_compiled_code()
    return model


def restore_patch(model: nn.Module, previous: Optional[Patch]) -> nn.Module:
    """Put back the patch ``previous`` (its configs and explicit visual memory), or none when ``None``;
    what was applied meanwhile is removed."""
    if previous is None or not previous.configs:
        return remove(model)
    apply(model, method="+".join(previous.configs), config=list(previous.configs.values()))
    get_patch(model).explicit_memory = previous.explicit_memory
    return model


@contextlib.contextmanager
def patched(model: nn.Module, method: str = "memvr", config: Any = None, **knobs: Any) -> Iterator[nn.Module]:
    """``with hallupatch.patched(model, method="memvr"): model.generate(...)``; on exit the model is as
    before the block: unpatched, or patched as it was (same configs and visual memory)."""
    previous = get_patch(model)
    apply(model, method, config=config, **knobs)
    try:
        yield model
    finally:
        restore_patch(model, previous)


def set_visual_memory(
    model: nn.Module, tokens: Union[torch.Tensor, Sequence[Optional[torch.Tensor]], None]
) -> None:
    """Give a patched model the visual tokens to retrace explicitly (e.g. a plain ``LlamaForCausalLM``).

    ``tokens``: ``(batch, n_tokens, hidden)``, ``(n_tokens, hidden)`` for one sample, or a list with one
    ``(n_i, hidden)`` tensor or ``None`` per sample (no retracing for it). It is used for every following
    generation instead of captured images, until replaced or cleared with ``tokens=None``. Where
    ``generate()`` repeats each sample's row (beams, ``num_return_sequences``, contrastive search's
    candidates), every copy uses its sample's tokens. Empty, all-zero or non-finite tokens are refused.
    """
    patch = require_patch(model, "set_visual_memory")
    memory = as_memory_list(tokens)
    hidden = patch.parts.final_norm.weight.shape[-1] if hasattr(patch.parts.final_norm, "weight") else None
    for i, t in enumerate(memory or []):
        if t is None:
            continue
        if hidden is not None and t.shape[-1] != hidden:
            raise ValueError(f"visual tokens must have the model's hidden size {hidden}; got {t.shape[-1]}")
        problem = memory_problem(t)
        if problem:
            raise ValueError(
                f"sample {i}'s visual tokens are {problem}: MemVR scales the memory by 1 / mean|tokens|, so it "
                "needs finite tokens that are not all zero; give None for a sample without an image"
            )
    patch.explicit_memory = memory
