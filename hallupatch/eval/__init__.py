"""Benchmark evaluation: ``python -m hallupatch.eval <benchmark> ...`` (DESIGN §5).

One harness (``harness.py``) runs every benchmark, each a registered task (``tasks/<name>.py``: its
options, loading, prompt style, scorer, table and files), with an evaluation recipe per kind of checkpoint
(``models.py``); answers are stored resumably (``store.py``); several methods are compared with
paired tests (``stats.py``). ``cli.py`` is the command line.

``main`` and ``run`` (the command line) are imported on first use, so that importing the harness's API
(e.g. from the lab package, ``hallupatch.lab``) does not import the command line, which imports the lab.
"""
from hallupatch.eval.data import DataError, Question
from hallupatch.eval.scoring import parse_mme_answer, parse_pope_answer, score_mme, score_pope
from hallupatch.eval.store import StoreError
from hallupatch.eval.tasks import Task, get_task, register_task, registered_tasks

__all__ = [
    "main", "run", "score_mme", "score_pope", "parse_mme_answer", "parse_pope_answer",
    "Question", "DataError", "StoreError", "Task", "register_task", "registered_tasks", "get_task",
]


def __getattr__(name: str):
    if name in ("main", "run"):
        from hallupatch.eval import cli

        return getattr(cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
