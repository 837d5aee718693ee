"""Method registry: each decoding-time method is a config dataclass plus an ``install`` function.

``install(patch, config)`` adds the method's hooks through the engine's :class:`~hallupatch.engine.Patch`;
a config's optional ``validate_for(parts)`` (checks that need the model) is run by ``hallupatch.apply``
before anything changes, so a refused configuration leaves the model as it was;
``hallupatch.apply`` combines methods with ``"+"`` (e.g. ``"memvr+dola"``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List

METHODS: Dict[str, "Method"] = {}


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type
    install: Callable


def register_method(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def parse_method(method: str) -> List[Method]:
    """``"memvr+dola"`` -> the registered methods, in order; unknown names raise ``ValueError``."""
    _load_builtin_methods()
    names = [name.strip() for name in str(method).split("+")]
    unknown = [name for name in names if name not in METHODS]
    if unknown or len(set(names)) != len(names):
        raise ValueError(
            f"unknown method {method!r}: use one of {sorted(METHODS)} or several joined with '+' (e.g. 'memvr+dola')"
        )
    return [METHODS[name] for name in names]


def _load_builtin_methods() -> None:
    from hallupatch.methods import dola, memvr  # noqa: F401
