"""Benchmarks as registered tasks (the shape of lmms-eval's task registry).

A task is one small class in one file of this package: the command-line arguments it owns, how it
loads its questions, how it asks them, how it scores answers, the table it prints and the extra files
it writes. :mod:`hallupatch.eval.harness` runs any task the same way; nothing outside a task's own
file knows which benchmark it is.

Adding a benchmark: write ``tasks/<name>.py`` with a :class:`Task` subclass decorated with
:func:`register_task`, and add ``<name>`` to :data:`BUILTIN_TASKS` (a task defined elsewhere is
registered by importing its module before the harness runs).
"""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type

from hallupatch.eval.data import DataError, Question, read_id_text_answers

#: built-in task modules, in the order the command line lists them
BUILTIN_TASKS = ("mme", "pope", "chair", "regcap", "phd")
_REGISTRY: Dict[str, Type["Task"]] = {}

Scores = Dict[str, Any]


class Task:
    """One benchmark. The harness creates one instance per run with the parsed arguments.

    Class attributes (declarative):
        name: the command-line name (``python -m hallupatch.eval <name>``).
        title: the benchmark's name as its authors write it (messages, tables).
        summary: one line for ``--help``.
        data_help: the data layouts it reads, shown in ``--help`` and in the "needs --data" error.
        free_text: the question is asked as written (captions); ``False`` asks it in the model
            recipe's yes/no style (LLaVA-1.5's short-answer suffix).
        max_new_tokens: the task's published generation length; ``None`` = the model recipe's.
        paired_test: how two methods' answers are compared: ``"mcnemar"`` (exact McNemar on each
            question's correctness, for yes/no tasks) or ``"bootstrap"`` (paired bootstrap of the
            metrics :meth:`metrics_from_stats` computes from the items' :meth:`item_stats`).
        details_file: name of the per-answer details file :meth:`score` may return, or ``None``.
        screen_columns: the :meth:`headline` scores the printed comparison shows, with their column
            names (a table at most 100 characters wide); empty = every headline score under its own name.
            ``comparison.json`` always has them all.

    What the lab suite (``python -m hallupatch.eval lab``, :mod:`hallupatch.eval.lab`) needs from a task
    (declarative, so that the suite never names a benchmark):
        lab_options: ``None``: not part of the suite; else the task's own options the suite passes when
            it runs the task on the lab (e.g. how many lab images to caption), as command-line tokens.
        lab_data: how the suite's header names this task's part of the lab's data.
        lab_traces: the figure's layer panels (where MemVR fired, which layer DoLa contrasted) read the
            per-answer traces of this task's answers.
        :meth:`lab_panel`: the figure panel drawn from this task's comparison.
        lab_question_files: the task reads one file of yes/no questions in POPE's format as one split
            (``--data FILE``): the powered study (``eval lab --full``, :mod:`hallupatch.eval.lab_study`)
            asks its question sets through it.
    """

    name: str = ""
    title: str = ""
    summary: str = ""
    data_help: str = ""
    free_text: bool = False
    max_new_tokens: Optional[int] = None
    paired_test: str = "mcnemar"
    details_file: Optional[str] = None
    screen_columns: Mapping[str, str] = {}
    lab_options: Optional[Tuple[str, ...]] = None
    lab_question_files: bool = False
    lab_data: str = ""
    lab_traces: bool = False

    def __init__(self, args: Optional[argparse.Namespace] = None):
        self.args = args

    # -- what the task owns on the command line -------------------------------------------------
    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        """Add this task's own options (shown under its name in ``--help``)."""

    def settings(self) -> Dict[str, Any]:
        """This task's settings recorded in ``run.json`` (a resume with others is refused)."""
        return {}

    def embedded_data(self, work_dir: Path, split: str = "test") -> Optional[Tuple[Path, str]]:
        """The built-in data to use when no ``--data`` is given (the lab's ``split``: dev, test or heldout),
        written under ``work_dir``, and the label ``run.json`` records for it; ``None``: the task needs
        ``--data``."""
        return None

    # -- questions ---------------------------------------------------------------------------------
    def load(self, data: Path, recipe: Optional[str], out_dir: Path, answers: Optional[Path]) -> List[Question]:
        """The questions, from ``data`` in the benchmark's official layout.

        ``recipe``: the model's evaluation recipe name (``None`` when scoring answers made elsewhere);
        ``answers``: an answers file made elsewhere, or ``None``; with it no image is opened.
        """
        raise NotImplementedError

    def read_answers(self, path: Path, questions: Sequence[Question]) -> Dict[str, str]:
        """``{question id: answer text}`` from an answers file made elsewhere (default: LLaVA's
        ``question_id`` + ``text`` JSONL, every id one of the loaded questions')."""
        texts = read_id_text_answers(path)
        known = {q.qid for q in questions}
        unknown = [k for k in texts if k not in known]
        if unknown:
            raise DataError(f"{path}: question ids {unknown[:5]} are not in the loaded {self.name} data")
        return texts

    def prepare_output(self, out_dir: Path) -> None:
        """Called once the output folder exists (main process): save what a resume must reuse."""

    def answering(self, backend):
        """The backend that answers this task's questions (a task may wrap it, e.g. to rank candidates)."""
        return backend

    # -- scores ------------------------------------------------------------------------------------
    def score(self, questions: Sequence[Question], texts: Mapping[str, str]) -> Tuple[Scores, Optional[List[dict]]]:
        """``(scores, per-answer details or None)`` of the answered questions, as the official tool
        scores them; ``scores`` has ``benchmark``, ``answered`` and ``questions``."""
        raise NotImplementedError

    def table(self, scores: Mapping[str, Any]) -> str:
        """The scores as a plain-text table."""
        raise NotImplementedError

    def headline(self, scores: Mapping[str, Any]) -> Dict[str, float]:
        """The few numbers a method comparison reports, by name."""
        raise NotImplementedError

    def item_correct(self, question: Question, text: str) -> bool:
        """For ``paired_test = "mcnemar"``: whether ``text`` answers ``question`` right."""
        raise NotImplementedError

    def item_stats(self, questions: Sequence[Question], texts: Mapping[str, str]) -> Dict[str, Dict[str, float]]:
        """For ``paired_test = "bootstrap"``: per answered question id, additive counts whose sums over
        any set of items give that set's metrics through :meth:`metrics_from_stats`."""
        raise NotImplementedError

    def metrics_from_stats(self, sums: Mapping[str, float], count: int) -> Dict[str, float]:
        """For ``paired_test = "bootstrap"``: the compared metrics from ``count`` items' summed stats."""
        raise NotImplementedError

    def write_files(self, out_dir: Path, questions: Sequence[Question], records: Mapping[str, Mapping[str, Any]]
                    ) -> List[Path]:
        """Extra result files (e.g. the official tool's input), from the answer records by question id."""
        return []

    def result_note(self, out_dir: Path) -> str:
        """Where the extra results are, for the report's last line ("" for none)."""
        return f", per-answer details: {out_dir / self.details_file}" if self.details_file else ""

    # -- the lab suite -------------------------------------------------------------------------------
    def lab_panel(self, ax, comparison: Mapping[str, Any], folders: Mapping[str, Path]) -> None:
        """For a task in the lab suite: draw its panel of ``lab.png`` on the matplotlib axes ``ax`` from
        its ``comparison`` (``comparison.json``) and each compared setting's results folder (by label)."""
        raise NotImplementedError


def register_task(cls: Type[Task]) -> Type[Task]:
    """Class decorator: make ``cls`` runnable as ``python -m hallupatch.eval <cls.name>``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a name")
    if cls.paired_test not in ("mcnemar", "bootstrap"):
        raise ValueError(f"{cls.__name__}.paired_test must be 'mcnemar' or 'bootstrap'; got {cls.paired_test!r}")
    _REGISTRY[cls.name] = cls
    return cls


def registered_tasks() -> Dict[str, Type[Task]]:
    """Every registered task by name (the built-in ones first, in :data:`BUILTIN_TASKS` order)."""
    for name in BUILTIN_TASKS:
        importlib.import_module(f"{__name__}.{name}")
    return dict(_REGISTRY)


def get_task(name: str) -> Type[Task]:
    tasks = registered_tasks()
    if name not in tasks:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {sorted(tasks)}")
    return tasks[name]


def answered_questions(questions: Sequence[Question], texts: Mapping[str, str]) -> List[Question]:
    """The questions that have an answer in ``texts``; none at all is a ``StoreError``."""
    from hallupatch.eval.store import StoreError

    answered = [q for q in questions if q.qid in texts]
    if not answered:
        raise StoreError(f"no answers to score: none of the {len(questions)} questions has an answer")
    return answered


def with_counts(scores: Mapping[str, Any], answered: Sequence[Any], questions: Sequence[Any]) -> Scores:
    """``scores`` plus how many of the loaded questions were ``answered`` (every task's scores carry both)."""
    return {**scores, "answered": len(answered), "questions": len(questions)}


def two_column_table(rows: Sequence[Tuple[str, str]], scores: Mapping[str, Any]) -> str:
    """A ``name value`` table (the caption benchmarks' tables), with the partial-scoring note."""
    return "\n".join([f"{name:<10}{value:>8}" for name, value in rows] + partial_note(scores))


def fmt_percent(value: Optional[float]) -> str:
    """A rate in [0, 1] as a percentage with one decimal, ``n/a`` for ``None`` (the caption tables)."""
    return "n/a" if value is None else f"{value * 100:.1f}"


def partial_note(scores: Mapping[str, Any]) -> List[str]:
    """The table line saying that only part of the questions was scored (none when all were)."""
    if scores.get("answered", 0) < scores.get("questions", 0):
        return [f"(scored {scores['answered']} of {scores['questions']})"]
    return []
