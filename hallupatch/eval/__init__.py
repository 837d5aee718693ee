"""Benchmark evaluation: ``python -m hallupatch.eval {mme,pope} ...`` (DESIGN §5).

A benchmark is a task (``tasks.py``: questions loaded from the official layout), a prompt recipe per
model family (``models.py``) and a scorer that reproduces the official tool (``scoring.py``); answers
are stored resumably (``store.py``) by the loop in ``runner.py``.
"""
from hallupatch.eval.cli import main, run
from hallupatch.eval.scoring import parse_mme_answer, parse_pope_answer, score_mme, score_pope
from hallupatch.eval.tasks import DataError, Question, load_mme, load_pope
from hallupatch.eval.store import StoreError

__all__ = [
    "main", "run", "score_mme", "score_pope", "parse_mme_answer", "parse_pope_answer",
    "load_mme", "load_pope", "Question", "DataError", "StoreError",
]
