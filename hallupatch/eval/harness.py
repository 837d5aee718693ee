"""The one evaluation harness: any registered task, any methods, one pipeline.

    load questions -> for each method: (patched model) -> answer with resume, sharding and progress
    -> merge -> score -> write -> report; several methods -> one comparison with paired tests.

The harness knows tasks only through :class:`~hallupatch.eval.tasks.Task`'s interface and models
only through :class:`~hallupatch.eval.models.Backend`'s; it never branches on a benchmark.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence

from hallupatch.eval import stats
from hallupatch.eval.data import DataError, Question
from hallupatch.eval.decoding import GREEDY, Decoding
from hallupatch.eval.store import (
    AnswerWriter,
    StoreError,
    answers_path,
    check_resumable,
    check_settings,
    finished_ids,
    folder_name,
    merge_answers,
    prepare_output,
    write_json,
)
from hallupatch.eval.tasks import Task

COMPARISON_FILE = "comparison.json"


# --------------------------------------------------------------------------- processes
@dataclass
class Distributed:
    """This process's place among the evaluation processes (``accelerate launch`` or one process).

    ``device``: the device this process should use (its own GPU when launched on several), or ``None``.
    """

    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = lambda: None
    device: Optional[str] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current_process() -> Distributed:
    """Rank and world size when launched as several processes (``accelerate launch``, ``torchrun``),
    through ``accelerate``'s ``PartialState``; a single process otherwise.

    Where ``accelerate`` does not form the process group itself (it leaves CPU-only machines to MPI),
    a gloo group is formed from the launcher's ``RANK``/``WORLD_SIZE`` so the shards still split.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    try:
        from accelerate import PartialState
    except ImportError:
        raise ImportError("several processes were launched but `accelerate` is not installed: pip install accelerate") from None
    state = PartialState()
    if state.num_processes == world:
        device = str(state.device) if state.device.type != "cpu" else None
        return Distributed(state.process_index, state.num_processes, state.wait_for_everyone, device)
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), dist.barrier)


def shard(questions: Sequence[Question], rank: int, world: int) -> List[Question]:
    """The questions process ``rank`` of ``world`` answers: every ``world``-th, from ``rank``."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world - 1}]; got {rank}")
    return list(questions[rank::world])


def check_unique(questions: Sequence[Question]) -> None:
    seen: Dict[str, str] = {}
    for q in questions:
        if q.qid in seen:
            raise DataError(f"{q.source}: question id {q.qid!r} repeats {seen[q.qid]}")
        seen[q.qid] = q.source


# --------------------------------------------------------------------------- answering
def method_records(model, method: str, passes: Sequence[int]) -> List[Dict[str, Any]]:
    """What ``method`` did for each sample of the latest ``generate()`` (``passes[i]``: forward passes
    of sample ``i``'s own answer), as answer-record fields: ``memvr`` (the trigger layer, or None, per
    pass), ``dola_layers`` (the premature hidden-state index per step) and ``opera_rollbacks`` (each
    rollback's ``[from_position, to_position]``). Only discrete decisions are
    recorded, so answers files stay byte-identical across batch sizes. Traces are read once per batch."""
    import hallupatch

    parts = method.split("+")
    fired = hallupatch.get_trace(model, "memvr").trigger_layers() if "memvr" in parts else None
    contrasted = hallupatch.get_trace(model, "dola").layers() if "dola" in parts else None
    retraced = hallupatch.get_trace(model, "opera").rollbacks if "opera" in parts else None
    records: List[Dict[str, Any]] = []
    for sample, n in enumerate(passes):
        fields: Dict[str, Any] = {}
        if fired is not None and sample < len(fired):
            own = fired[sample][:n]
            fields["memvr"] = {"passes": len(own), "triggered_passes": sum(x is not None for x in own),
                               "trigger_layers": own}
        if contrasted is not None and sample < len(contrasted):
            fields["dola_layers"] = contrasted[sample][:n]
        if retraced is not None and sample < len(retraced):
            fields["opera_rollbacks"] = [[r.from_position, r.to_position] for r in retraced[sample]]
        records.append(fields)
    return records


def answer_record(q: Question, generated: Mapping[str, Any],
                  method_fields: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """One line of ``answers.jsonl`` (LLaVA's answer fields ``question_id, prompt, text`` plus ours;
    ``method_fields`` from :func:`method_records`)."""
    record = {
        "question_id": q.qid,
        "image_id": q.image_id,
        "group": q.group,
        "question": q.question,
        "prompt": generated.get("prompt", q.question),
        "text": generated["text"],
        "answer": q.answer,
    }
    for key in ("new_tokens", "layer", "candidates"):  # candidates: cycle-consistency ranking (eval/ranking.py)
        if key in generated:
            record[key] = generated[key]
    record.update(method_fields or {})
    return record


def open_run(out_dir: Path, settings: Mapping[str, Any], proc: Distributed, overwrite: bool = False,
             on_main: Optional[Callable[[], None]] = None) -> None:
    """Make ``out_dir`` ready for this run on every process: refuse a run it cannot resume (every
    process checks, so none waits at the barrier for one that stopped), create it and its ``run.json`` on
    the main process (then ``on_main()``), and let the others check the stored settings."""
    if not overwrite:
        check_resumable(out_dir, settings)
    if proc.is_main:
        prepare_output(out_dir, settings, overwrite=overwrite)
        if on_main is not None:
            on_main()
    proc.barrier()
    if not proc.is_main:
        check_settings(out_dir, settings)


def answer_questions(
    backend,
    questions: Sequence[Question],
    out_dir: Path,
    *,
    batch_size: int = 1,
    max_new_tokens: Optional[int] = None,
    proc: Distributed = Distributed(),
    method: str = "none",
    progress: bool = True,
) -> int:
    """Answer this process's shard of ``questions`` not yet in ``out_dir``, appending as it goes.

    Returns the number of answers produced now. ``method``: the method applied to the model, whose
    trace each answer records (:func:`method_records`).
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {batch_size}")
    own_file = answers_path(out_dir, proc.rank, proc.world)
    mine = shard(questions, proc.rank, proc.world)
    done = finished_ids(out_dir, own_file=own_file)
    todo = [q for q in mine if q.qid not in done]
    bar = _progress(total=len(mine), initial=len(mine) - len(todo), enabled=progress, rank=proc.rank)
    produced = 0
    try:
        with AnswerWriter(own_file) as writer:
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                outputs = backend.generate(batch, max_new_tokens)
                fields = method_records(backend.model, method, [o.get("new_tokens", 0) for o in outputs]) \
                    if method != "none" else [None] * len(batch)
                records = [answer_record(q, dict(out, prompt=backend.prompt(q)), f)
                           for q, out, f in zip(batch, outputs, fields)]
                writer.write(records)
                produced += len(records)
                bar.update(len(records))
    finally:
        bar.close()
    return produced


def _progress(total: int, initial: int, enabled: bool, rank: int):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, unit="q", unit_scale=False, dynamic_ncols=True, disable=not enabled,
        desc="answering" if rank == 0 else f"answering (rank {rank})", position=rank, file=sys.stderr,
    )


def print_report(table: str, timing: Optional[tuple], results: str) -> None:
    """Print a finished run: its score table, how many questions were answered now and how fast
    (``timing`` = ``(produced, seconds, world size)``, ``None`` when scoring outside answers), and where
    the results are."""
    print(table)
    if timing is not None:
        produced, elapsed, world = timing
        rate = produced / elapsed if elapsed > 0 and produced else 0.0
        where = f" on rank 0 of {world}" if world > 1 else ""
        print(f"answered {produced} question(s) now{where} in {elapsed:.1f} s ({rate:.2f} questions/s)")
    print(f"results: {results}")


# --------------------------------------------------------------------------- results
def write_results(task: Task, questions: Sequence[Question], records: Mapping[str, Mapping[str, Any]], out_dir: Path,
                  settings: Mapping[str, Any]) -> Dict[str, Any]:
    """Score ``records`` (answer records by question id), write ``scores.json``, the task's details and
    extra files; returns the scores."""
    out_dir = Path(out_dir)
    texts = {qid: r["text"] for qid, r in records.items()}
    scores, details = task.score(questions, texts)
    scores["settings"] = dict(sorted(settings.items()))
    write_json(out_dir / "scores.json", scores)
    if details is not None and task.details_file:
        write_json(out_dir / task.details_file, details)
    task.write_files(out_dir, questions, records)
    return scores


def finish(task: Task, questions: Sequence[Question], out_dir: Path, settings: Mapping[str, Any]) -> Dict[str, Any]:
    """Merge all answers files, check that every question has an answer, then :func:`write_results`."""
    merged = merge_answers(out_dir, [q.qid for q in questions])
    missing = [q.qid for q in questions if q.qid not in merged]
    if missing:
        raise StoreError(
            f"{len(missing)} question(s) have no answer in {out_dir} (e.g. {missing[:3]}); "
            "a process stopped early: rerun the same command to answer them"
        )
    return write_results(task, questions, merged, out_dir, settings)


def report(task: Task, scores: Mapping[str, Any], out_dir: Path, timing: Optional[tuple]) -> None:
    print_report(task.table(scores), timing, f"{Path(out_dir) / 'scores.json'}{task.result_note(Path(out_dir))}")


# --------------------------------------------------------------------------- one run
@dataclass(frozen=True)
class Variant:
    """One method with its knobs; a run keys its variants by a label (the method's name, or e.g.
    ``"memvr threshold 0"`` when one method runs in several settings)."""

    method: str
    knobs: Dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclass
class Run:
    """What a run of one task needs besides the task: the answering model and the generation settings.

    ``settings`` are the run-wide settings recorded in every ``run.json`` (the method and its knobs are
    added per method); ``methods`` maps each method to its knobs, in the order given; ``decoding``: how
    the backend generates (seeded again before each method).
    """

    backend: Any
    questions: List[Question]
    out_dir: Path
    methods: Dict[str, Variant]
    settings: Dict[str, Any]
    batch_size: int = 1
    max_new_tokens: Optional[int] = None
    overwrite: bool = False
    progress: bool = True
    decoding: Decoding = GREEDY


def method_folder_name(label: str) -> str:
    """The sub-folder of a variant in a multi-method run (``memvr+dola`` -> ``memvr-dola``)."""
    return folder_name(label.replace("+", "-"))


def method_folder(run: Run, label: str) -> Path:
    """Each variant of a multi-method run answers into its own folder; a single one uses the output folder."""
    return run.out_dir if len(run.methods) == 1 else run.out_dir / method_folder_name(label)


@contextlib.contextmanager
def applied(model, method: str, knobs: Mapping[str, Any]) -> Iterator[None]:
    """``method`` applied to ``model`` for the block (``"none"``: the model as it is)."""
    if method == "none":
        yield
        return
    import hallupatch

    hallupatch.apply(model, method, **knobs)
    try:
        yield
    finally:
        hallupatch.remove(model)


@contextlib.contextmanager
def question_style(backend, free_text: bool) -> Iterator[None]:
    """Ask the task's questions as written (captions) or in the recipe's yes/no style, for the block."""
    if not free_text:
        yield
        return
    saved = backend.recipe
    backend.recipe = dataclasses.replace(saved, question_style="as_is")
    try:
        yield
    finally:
        backend.recipe = saved


def evaluate(task: Task, run: Run) -> tuple:
    """Answer and score ``run.questions`` once per method; returns ``({method: scores}, comparison)``
    (scores ``None`` on the processes of a sharded run other than the main one; comparison ``None``
    unless several methods ran), and writes the comparison to ``comparison.json``."""
    proc = current_process()
    results: Dict[str, Optional[Dict[str, Any]]] = {}
    with question_style(run.backend, task.free_text):
        for label, variant in run.methods.items():
            method, knobs = variant.method, variant.knobs
            out = method_folder(run, label)
            decoding = run.decoding.for_method(method)   # OPERA: 5 beams where the run sets none
            settings = {**run.settings, "method": method, "knobs": dict(knobs), "decoding": decoding.settings()}
            open_run(out, settings, proc, overwrite=run.overwrite, on_main=lambda: task.prepare_output(out))
            run.backend.decoding = decoding
            decoding.seed_everything()
            with applied(run.backend.model, method, knobs):
                start = time.perf_counter()
                produced = answer_questions(
                    task.answering(run.backend), run.questions, out, batch_size=run.batch_size,
                    max_new_tokens=run.max_new_tokens, proc=proc, method=method,
                    progress=run.progress,
                )
                elapsed = time.perf_counter() - start
            proc.barrier()
            if not proc.is_main:
                results[label] = None
                continue
            if len(run.methods) > 1:
                print(f"== {task.name}, {label}")
            results[label] = finish(task, run.questions, out, settings)
            report(task, results[label], out, (produced, elapsed, proc.world))
    comparison = None
    if len(run.methods) > 1 and proc.is_main:
        texts = {m: {qid: r["text"] for qid, r in merge_answers(method_folder(run, m), [q.qid for q in run.questions]).items()}
                 for m in run.methods}
        comparison = compare(task, run.questions, {m: results[m] for m in run.methods}, texts)
        write_json(run.out_dir / COMPARISON_FILE, comparison)
        print(format_comparison(comparison))
        print(f"comparison: {run.out_dir / COMPARISON_FILE}")
    return results, comparison


def score_outside_answers(task: Task, questions: Sequence[Question], answers: Path, out_dir: Path) -> Dict[str, Any]:
    """Score an answers file made elsewhere (no model, no image) and report it."""
    texts = task.read_answers(answers, questions)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = {qid: {"question_id": qid, "text": text} for qid, text in texts.items()}
    scores = write_results(task, questions, records, out_dir, {"answers": str(Path(answers).resolve())})
    report(task, scores, out_dir, None)
    return scores


# --------------------------------------------------------------------------- comparison of methods
def compare(task: Task, questions: Sequence[Question], scores: Mapping[str, Mapping[str, Any]],
            texts: Mapping[str, Mapping[str, str]]) -> Dict[str, Any]:
    """Per method: the task's headline scores, their difference from the first method and a paired
    test on the same questions (the task's ``paired_test``)."""
    methods = list(scores)
    baseline = methods[0]
    heads = {m: task.headline(scores[m]) for m in methods}
    out: Dict[str, Any] = {"benchmark": task.name, "baseline": baseline, "questions": len(questions), "methods": {}}
    if task.paired_test == "mcnemar":
        out["test"] = "exact McNemar, two-sided, on each question's correctness"
        correct = {m: [task.item_correct(q, texts[m][q.qid]) for q in questions] for m in methods}
    else:
        out["test"] = f"paired bootstrap, two-sided, {stats.BOOTSTRAP_RESAMPLES} resamples (seed 0)"
        item_stats = {m: task.item_stats(questions, texts[m]) for m in methods}
        shared = [q.qid for q in questions if all(q.qid in item_stats[m] for m in methods)]
    for m in methods:
        entry: Dict[str, Any] = {"scores": heads[m]}
        if task.paired_test == "mcnemar":
            entry["correct"] = sum(correct[m])
        if m != baseline:
            entry["difference"] = {k: heads[m][k] - heads[baseline][k] for k in heads[m] if k in heads[baseline]}
            if task.paired_test == "mcnemar":
                counts = stats.mcnemar_counts(correct[baseline], correct[m])
                entry["test"] = {**counts, "p": stats.mcnemar_exact(counts["b"], counts["c"])}
            else:
                entry["test"] = stats.paired_bootstrap([item_stats[baseline][i] for i in shared],
                                                       [item_stats[m][i] for i in shared], task.metrics_from_stats)
        out["methods"][m] = entry
    return out


def _number(value: float, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def format_comparison(comparison: Mapping[str, Any]) -> str:
    """The comparison as a plain-text table: scores per method, the difference from the baseline and
    the paired test's p-value (McNemar: also the discordant counts b/c)."""
    methods = comparison["methods"]
    baseline = comparison["baseline"]
    names = list(methods[baseline]["scores"])
    width = max(12, *(len(m) + 2 for m in methods))
    lines = [f"{'method':<{width}}" + "".join(f"{n:>{max(12, len(n) + 2)}}" for n in names)]
    for m, entry in methods.items():
        lines.append(f"{m:<{width}}" + "".join(f"{_number(entry['scores'].get(n)):>{max(12, len(n) + 2)}}" for n in names))
        if m == baseline:
            continue
        lines.append(f"{'  change':<{width}}" + "".join(
            f"{_number(entry['difference'].get(n), signed=True):>{max(12, len(n) + 2)}}" for n in names))
        test = entry["test"]
        if "b" in test:
            lines.append(f"{'  McNemar':<{width}}p = {test['p']:.4f} (b = {test['b']}, c = {test['c']}; "
                         f"correct {methods[baseline]['correct']} -> {entry['correct']} of {comparison['questions']})")
        else:
            lines.append(f"{'  p':<{width}}" + "".join(
                f"{_number(test[n]['p'] if n in test else None):>{max(12, len(n) + 2)}}" for n in names))
    lines.append(f"(change: against {baseline}; test: {comparison['test']})")
    return "\n".join(lines)
