"""Method registry: each decoding-time method is a :class:`MethodConfig` dataclass plus an ``install`` function.

``install(patch, config)`` adds the method's hooks through the engine's :class:`~hallupatch.engine.Patch`;
the config's ``validate_for(parts)`` (checks that need the model) is run by ``hallupatch.apply``
before anything changes, so a refused configuration leaves the model as it was;
``hallupatch.apply`` combines methods with ``"+"`` (e.g. ``"memvr+dola"``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Type, TypeVar

C = TypeVar("C", bound="MethodConfig")


class MethodConfig:
    """The base of every method's config dataclass: one place for validation and (de)serialisation.

    ``validate()`` runs on construction (checks that need no model: types and ranges, a ``ValueError``
    naming the valid range); ``validate_for(parts)`` runs in ``hallupatch.apply`` (checks that need the
    model); ``to_dict`` / ``from_dict`` give the JSON form used by ``run.json``, the drop-in config block
    and the checkpoint installer.
    """

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check the fields on their own; subclasses raise ``ValueError`` naming the valid range."""

    def validate_for(self, parts: Any) -> None:
        """Check the fields against a model's :class:`~hallupatch.spec.ModelParts`."""

    @classmethod
    def draws_random_numbers(cls, knobs: Mapping[str, Any]) -> bool:
        """Whether the method, with these knobs, draws from torch's global generator while it generates
        (so that a harness seeds each question on its own to make answers independent of the batch)."""
        return False

    @classmethod
    def knobs(cls) -> List[str]:
        """The field names, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> Dict[str, Any]:
        """The fields as JSON-ready values (paths as strings)."""
        return {k: (str(v) if hasattr(v, "__fspath__") else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls: Type[C], values: Mapping[str, Any]) -> C:
        """A validated config from ``values``; an unknown key raises ``TypeError`` listing the valid ones."""
        if not isinstance(values, Mapping):
            raise TypeError(f"{cls.__name__}.from_dict needs a mapping of knobs; got {type(values).__name__}")
        unknown = sorted(set(values) - set(cls.knobs()))
        if unknown:
            raise TypeError(f"unknown {cls.__name__} knob(s) {unknown}; valid knobs: {cls.knobs()}")
        return cls(**values)

METHODS: Dict[str, "Method"] = {}


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type
    install: Callable
    combinable: bool = True   # may be joined with other methods by "+" (one that owns a second branch or the
                              # beam search may not)


def register_method(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def parse_method(method: str) -> List[Method]:
    """``"memvr+dola"`` -> the registered methods, in order; unknown names raise ``ValueError``."""
    _load_builtin_methods()
    names = [name.strip() for name in str(method).split("+")]
    unknown = [name for name in names if name not in METHODS]
    if unknown or len(set(names)) != len(names):
        from hallupatch.names import did_you_mean

        hint = did_you_mean(unknown[0], METHODS) if unknown else ""
        raise ValueError(
            f"unknown method {method!r}{hint}: use one of {sorted(METHODS)} or several joined with '+' (e.g. 'memvr+dola')"
        )
    chosen = [METHODS[name] for name in names]
    alone = [m.name for m in chosen if not m.combinable]
    if alone and len(chosen) > 1:
        raise ValueError(
            f"method {alone[0]!r} owns a second branch of the model or the beam search and does not combine "
            f"with other methods; apply it alone (method={alone[0]!r})"
        )
    return chosen


def _load_builtin_methods() -> None:
    from hallupatch.methods import dola, icd, m3id, memvr, opera, pai, vcd  # noqa: F401
