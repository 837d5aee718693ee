"""Suggesting the valid name nearest a mistyped one (methods, presets, benchmarks, recipes)."""
from __future__ import annotations

import argparse
import difflib
from typing import Iterable


def did_you_mean(name: object, valid: Iterable[object]) -> str:
    """``" (did you mean 'memvr'?)"`` for the valid name closest to ``name`` (difflib's ratio >= 0.6), else ``""``."""
    close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class SuggestingParser(argparse.ArgumentParser):
    """argparse, with the nearest valid name suggested for a mistyped choice (a sub-command, ``--recipe``)."""

    def _check_value(self, action, value):
        if action.choices is not None and value not in action.choices:
            raise argparse.ArgumentError(action, f"invalid choice: {value!r}{did_you_mean(value, action.choices)} "
                                                 f"(choose from {', '.join(map(str, action.choices))})")
