"""Instance-method wrappers that stay picklable and deep-copyable (used by the engine and ``compat``).

:func:`method_wrapper` puts a :class:`MethodWrapper` (a ``functools.partial``) on an instance in place of one
of its methods; it calls ``replacement(original, *args, **kwargs)`` with the original found at call time,
so copies and unpickled models call their own.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Optional


class MethodWrapper(functools.partial):
    """What :meth:`Patch.wrap_method` puts on an instance: ``_call_wrapped(obj, name, own, replacement, ...)``.
    A partial, so copies and pickles of the model carry it; it shows the original method's signature,
    found when asked (generation reads the signature of ``prepare_inputs_for_generation``)."""

    @property
    def __signature__(self) -> inspect.Signature:
        obj, name, own, _ = self.args
        return inspect.signature(_original(obj, name, own))


def method_wrapper(obj: Any, name: str, replacement: Callable) -> MethodWrapper:
    """``obj.name`` as ``replacement(original, *args, **kwargs)``, the original found at call time."""
    wrapper = MethodWrapper(_call_wrapped, obj, name, vars(obj).get(name), replacement)
    wrapper.__doc__ = getattr(obj, name).__doc__
    return wrapper


def _original(obj: Any, name: str, own: Optional[Callable]) -> Callable:
    """The method a wrapper replaced: the instance's own attribute, else the class's bound to ``obj``
    (staticmethods stay unbound)."""
    if own is not None:
        return own
    owner = next(klass for klass in type(obj).__mro__ if name in vars(klass))
    return vars(owner)[name].__get__(obj, type(obj))


def _call_wrapped(obj: Any, name: str, own: Optional[Callable], replacement: Callable, *args, **kwargs):
    """The body of :meth:`Patch.wrap_method`'s wrappers: ``replacement(original, *args, **kwargs)``."""
    return replacement(_original(obj, name, own), *args, **kwargs)
