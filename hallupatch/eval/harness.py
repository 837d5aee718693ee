"""The one evaluation harness: any registered task, any methods, one pipeline.

    load questions -> for each method: (patched model) -> answer with resume, sharding and progress
    -> merge -> score -> write -> report; several methods -> one comparison with paired tests.

The harness knows tasks only through :class:`~hallupatch.eval.tasks.Task`'s interface and models
only through :class:`~hallupatch.eval.models.Backend`'s; it never branches on a benchmark.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence

from hallupatch.eval import stats
from hallupatch.eval.data import DataError, Question
from hallupatch.eval.decoding import GREEDY, Decoding, seed_everything
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
    read_settings,
    RUN_FILE,
    write_json,
)
from hallupatch.eval.tasks import Task

COMPARISON_FILE = "comparison.json"
REPORT_FILE = "report.txt"   # in a multi-method run, each method's own table (what a single run prints)


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
def method_records(model, method: str, passes: Sequence[int], rows_per_sample: int = 1) -> List[Dict[str, Any]]:
    """What ``method`` did for each sample of the latest ``generate()`` (``passes[i]``: forward passes
    of sample ``i``'s own answer), as answer-record fields: ``memvr`` (the trigger layer, or None, per
    pass), ``dola_layers`` (the premature hidden-state index per step) and ``opera_rollbacks`` (each
    rollback's ``[from_position, to_position]``). Only discrete decisions are recorded, so answers files
    stay byte-identical across batch sizes. Traces are read once per batch.

    ``rows_per_sample``: the model's rows per sample (the beams of beam search; sample ``i`` owns rows
    ``i*k .. i*k+k-1``). With several, each pass records one trigger layer per beam row, in row order
    (beam search reorders its hypotheses between passes, so a row is not one hypothesis throughout).
    """
    import hallupatch

    parts = method.split("+")
    fired = hallupatch.get_trace(model, "memvr").trigger_layers() if "memvr" in parts else None
    contrasted = hallupatch.get_trace(model, "dola").layers() if "dola" in parts else None
    retraced = hallupatch.get_trace(model, "opera").rollbacks if "opera" in parts else None
    k = rows_per_sample
    records: List[Dict[str, Any]] = []
    for sample, n in enumerate(passes):
        fields: Dict[str, Any] = {}
        if fired is not None and (sample + 1) * k <= len(fired):
            rows = [fired[sample * k + beam][:n] for beam in range(k)]
            if k == 1:
                own = rows[0]
                triggered = sum(x is not None for x in own)
            else:
                own = [list(per_pass) for per_pass in zip(*rows)]
                triggered = sum(any(x is not None for x in per_pass) for per_pass in own)
            fields["memvr"] = {"passes": len(own), "triggered_passes": triggered, "trigger_layers": own}
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


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during answering: where the run stopped (its answers so far are on disk)."""

    def __init__(self, out_dir: Path, answered: int, total: int):
        super().__init__(f"interrupted in {out_dir} with {answered} of {total} question(s) answered")
        self.out_dir, self.answered, self.total = Path(out_dir), answered, total


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
    question_seeds: Optional[int] = None,
    label: Optional[str] = None,
) -> int:
    """Answer this process's shard of ``questions`` not yet in ``out_dir``, appending as it goes.

    Returns the number of answers produced now. ``method``: the method applied to the model, whose
    trace each answer records (:func:`method_records`). ``question_seeds``: a run seed; each question
    is then answered on its own, with the random generators seeded by :func:`question_seed`, so that
    sampled answers do not depend on the batch size, the shard or an interruption. Ctrl-C raises
    :class:`RunInterrupted` (every answer written before it is kept). ``label``: one of several settings
    of a run; its progress bar says which and is cleared when done (the screen keeps only the comparison).
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {batch_size}")
    own_file = answers_path(out_dir, proc.rank, proc.world)
    mine = shard(questions, proc.rank, proc.world)
    done = finished_ids(out_dir, own_file=own_file)
    todo = [q for q in mine if q.qid not in done]
    bar = _progress(total=len(mine), initial=len(mine) - len(todo), enabled=progress, rank=proc.rank, label=label)
    rows_per_sample = getattr(getattr(backend, "decoding", None), "num_beams", 1) or 1
    produced = 0
    try:
        with AnswerWriter(own_file) as writer:
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                # one generate() call per group: each question alone when it draws random numbers of its
                # own seed, else the groups the backend can batch (e.g. LLaVA-NeXT's images of one size)
                groups = [[q] for q in batch] if question_seeds is not None else generate_batches(backend, batch)
                answered: Dict[str, Dict[str, Any]] = {}
                for group in groups:
                    if question_seeds is not None:
                        seed_everything(question_seed(question_seeds, group[0].qid))
                    outputs = backend.generate(group, max_new_tokens)
                    fields = method_records(backend.model, method, [o.get("new_tokens", 0) for o in outputs],
                                            rows_per_sample) if method != "none" else [None] * len(group)
                    answered.update({q.qid: answer_record(q, dict(out, prompt=backend.prompt(q)), f)
                                     for q, out, f in zip(group, outputs, fields)})
                records = [answered[q.qid] for q in batch]
                writer.write(records)
                produced += len(records)
                bar.update(len(records))
    except KeyboardInterrupt:
        raise RunInterrupted(out_dir, len(mine) - len(todo) + produced, len(mine)) from None
    finally:
        bar.close()
    return produced


def question_seed(seed: int, qid: str) -> int:
    """The seed of question ``qid`` in a run seeded with ``seed`` (a hash of both, < 2**32)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}\0{qid}".encode("utf-8")).digest()[:4], "big")


def generate_batches(backend, batch: Sequence[Question]) -> List[List[Question]]:
    """``batch`` split into the groups one ``generate()`` call can take (``backend.batch_key``: e.g.
    LLaVA-NeXT's images of one size), each in question order."""
    key = getattr(backend, "batch_key", None)   # backends written for tests may not have it
    groups: Dict[Any, List[Question]] = {}
    for q in batch:
        groups.setdefault(key(q) if key is not None else None, []).append(q)
    return list(groups.values())


def _progress(total: int, initial: int, enabled: bool, rank: int, label: Optional[str] = None):
    from tqdm.auto import tqdm

    desc = "answering" + (f" {label}" if label else "") + (f" (rank {rank})" if rank else "")
    return tqdm(
        total=total, initial=initial, unit="q", unit_scale=False, dynamic_ncols=True, disable=not enabled,
        desc=desc, position=rank, file=sys.stderr, leave=label is None,
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


def check_knobs(variants: Mapping[str, Variant]) -> None:
    """The checks of each variant's knobs that need no model (types and ranges: each method's config is
    built from them), so that a wrong knob is refused before a model is loaded. Errors name the variant."""
    from hallupatch.methods import parse_method

    for label, variant in variants.items():
        if variant.method == "none":
            continue
        try:
            for method in parse_method(variant.method):
                fields = method.config_cls.knobs()
                method.config_cls.from_dict({k: v for k, v in variant.knobs.items() if k in fields})
        except (ValueError, TypeError, FileNotFoundError) as err:
            raise type(err)(f"{label}: {err}") from None


def check_variants(model, variants: Mapping[str, Variant], decoding: Decoding = GREEDY) -> None:
    """Every check ``hallupatch.apply`` makes (knob ranges against this model's layers, a layer prior
    against its candidate layers) and each method's check of the decoding settings, for every variant,
    by applying and removing it: run before anything is written, so a refused setting leaves no trace.
    Errors name the variant."""
    from transformers import GenerationConfig

    from hallupatch.engine import get_patch

    for label, variant in variants.items():
        if variant.method == "none":
            continue
        generation = GenerationConfig.from_dict({**model.generation_config.to_dict(),
                                                 **decoding.for_method(variant.method).generate_kwargs()})
        try:
            with applied(model, variant.method, variant.knobs):
                for installed in get_patch(model).methods.values():
                    check = getattr(installed, "check_generation_config", None)
                    if check is not None:
                        check(generation)
        except (ValueError, TypeError, FileNotFoundError) as err:
            raise type(err)(f"{label}: {err}") from None


def file_hashes(knobs: Mapping[str, Any]) -> Dict[str, str]:
    """``{knob: "sha256:..."}`` for each knob that names a file (a layer prior JSON), so that a resume with
    another file at the same path is refused."""
    import hashlib

    return {name: "sha256:" + hashlib.sha256(Path(value).read_bytes()).hexdigest()
            for name, value in knobs.items() if name == "layer_prior" and isinstance(value, (str, os.PathLike))}


def run_settings(run: Run, variant: Variant) -> Dict[str, Any]:
    """What ``run.json`` records for one variant: the run-wide settings, the method, its knobs (with
    the hash of any file a knob names) and the batch size (recorded, not compared on resume)."""
    settings = {**run.settings, "method": variant.method, "knobs": dict(variant.knobs), "batch_size": run.batch_size,
                "decoding": run.decoding.for_method(variant.method).settings()}
    hashes = file_hashes(variant.knobs)
    if hashes:
        settings["file_hashes"] = hashes
    return settings


def seeds_per_question(decoding: Decoding, variant: Variant) -> Optional[int]:
    """The run seed when its answers draw random numbers (sampling, or a method drawing from the global
    generator: :func:`draws_random_numbers`), so each question is seeded on its own (the same seed gives the same answers at any batch
    size, shard or resume); ``None`` otherwise (answers are deterministic and batched)."""
    if decoding.seed is None:
        return None
    return decoding.seed if decoding.do_sample or draws_random_numbers(variant) else None


def draws_random_numbers(variant: Variant) -> bool:
    """Whether one of the variant's methods draws from the global generator with its knobs (a layer prior
    without a seed, VCD's noise without ``noise_seed``): its method configs say."""
    from hallupatch.methods import parse_method

    return variant.method != "none" and any(m.config_cls.draws_random_numbers(variant.knobs)
                                            for m in parse_method(variant.method))


def evaluate(task: Task, run: Run) -> tuple:
    """Answer and score ``run.questions`` once per method; returns ``({method: scores}, comparison)``
    (scores ``None`` on the processes of a sharded run other than the main one; comparison ``None``
    unless several methods ran), and writes the comparison to ``comparison.json``.

    Every method's folder is checked for a resume first, so a refused one stops the run before any
    method answers."""
    proc = current_process()
    results: Dict[str, Optional[Dict[str, Any]]] = {}
    settings = {label: run_settings(run, variant) for label, variant in run.methods.items()}
    if not run.overwrite:
        for label in run.methods:
            check_resumable(method_folder(run, label), settings[label])
    with question_style(run.backend, task.free_text):
        for label, variant in run.methods.items():
            method, knobs = variant.method, variant.knobs
            out = method_folder(run, label)
            open_run(out, settings[label], proc, overwrite=run.overwrite, on_main=lambda: task.prepare_output(out))
            decoding = run.decoding.for_method(method)   # OPERA: 5 beams where the run sets none
            run.backend.decoding = decoding
            decoding.seed_everything()
            with applied(run.backend.model, method, knobs):
                start = time.perf_counter()
                produced = answer_questions(
                    task.answering(run.backend), run.questions, out, batch_size=run.batch_size,
                    max_new_tokens=run.max_new_tokens, proc=proc, method=method,
                    progress=run.progress, question_seeds=seeds_per_question(run.decoding, variant),
                    label=f"{task.name}, {label}" if len(run.methods) > 1 else None,
                )
                elapsed = time.perf_counter() - start
            proc.barrier()
            if not proc.is_main:
                results[label] = None
                continue
            # as run.json records them (with every batch size a resumed run used)
            results[label] = finish(task, run.questions, out, read_settings(out / RUN_FILE))
            timing = (produced, elapsed, proc.world)
            if len(run.methods) == 1:
                report(task, results[label], out, timing)
                continue
            # several methods: each one's table is a detail, in its folder; the screen gets the comparison
            with open(out / REPORT_FILE, "w", encoding="utf-8") as file, contextlib.redirect_stdout(file):
                print(f"{task.name}, {label}")
                report(task, results[label], out, timing)

    comparison = None
    if len(run.methods) > 1 and proc.is_main:
        texts = {m: {qid: r["text"] for qid, r in merge_answers(method_folder(run, m), [q.qid for q in run.questions]).items()}
                 for m in run.methods}
        comparison = compare(task, run.questions, {m: results[m] for m in run.methods}, texts)
        write_json(run.out_dir / COMPARISON_FILE, comparison)
        print(format_comparison(comparison, task.screen_columns))
        print(details_line(run.out_dir))
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
MDE_MEANING = f"found with {stats.PLANNED_POWER:.0%} power at p < {stats.ALPHA}"


def compare(task: Task, questions: Sequence[Question], scores: Mapping[str, Mapping[str, Any]],
            texts: Mapping[str, Mapping[str, str]]) -> Dict[str, Any]:
    """Per method: the task's headline scores, their difference from the first method and a paired
    test on the same questions (the task's ``paired_test``), with its minimum detectable effect (``mde``).

    McNemar: ``{"b", "c", "p", "discordance", "mde"}`` per method, ``discordance`` the share of questions the
    pair answers differently and ``mde`` the accuracy difference in points that the exact test detects
    with 80% power at that discordance (:func:`stats.mcnemar_mde`; ``inf`` when none is detectable).
    Bootstrap: ``{"difference", "ci95", "p", "mde"}`` per score (:func:`stats.bootstrap_mde`)."""
    methods = list(scores)
    baseline = methods[0]
    heads = {m: task.headline(scores[m]) for m in methods}
    out: Dict[str, Any] = {"benchmark": task.name, "baseline": baseline, "questions": len(questions), "methods": {}}
    if task.paired_test == "mcnemar":
        out["test"] = "exact McNemar, two-sided, on each question's correctness"
        out["mde"] = f"the smallest accuracy change (points) {MDE_MEANING}, at the pair's discordance"
        correct = {m: [task.item_correct(q, texts[m][q.qid]) for q in questions] for m in methods}
    else:
        out["test"] = f"paired bootstrap, two-sided, {stats.BOOTSTRAP_RESAMPLES} resamples (seed 0)"
        out["mde"] = f"the smallest change {MDE_MEANING} ({stats.normal_mde_factor():.2f} x the bootstrap sd)"
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
                discordance = (counts["b"] + counts["c"]) / len(questions) if questions else 0.0
                mde = stats.mcnemar_mde(len(questions), discordance) if questions else math.inf
                entry["test"] = {**counts, "p": stats.mcnemar_exact(counts["b"], counts["c"]),
                                 "discordance": discordance, "mde": 100 * mde}
            else:
                entry["test"] = stats.paired_bootstrap([item_stats[baseline][i] for i in shared],
                                                       [item_stats[m][i] for i in shared], task.metrics_from_stats)
        out["methods"][m] = entry
    return out


SCREEN_WIDTH = 100   # the printed comparison fits a 100-column terminal
MAX_LABEL = 32       # longer method labels are shortened on screen
GAP = 2              # spaces between the table's columns
NO_BREAK = "\xa0"    # a space textwrap does not break at (one method's entry in a list stays on one line)


def details_line(out_dir: Path) -> str:
    """Where a multi-method run's details are (printed under its comparison table)."""
    return f"details: {COMPARISON_FILE} and <method>/{REPORT_FILE} in {out_dir}"


def format_p(p: Optional[float]) -> str:
    """A p-value as printed: ``<0.001``, else three decimals; ``n/a`` when there is none."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _number(value: Optional[float], signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _mde(value: Optional[float]) -> str:
    """A minimum detectable effect as printed: one decimal, ``inf`` when nothing is detectable, ``-``
    when there is none (a bootstrap whose resampled differences never vary)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.1f}"


def format_comparison(comparison: Mapping[str, Any], columns: Optional[Mapping[str, str]] = None,
                      width: int = SCREEN_WIDTH) -> str:
    """The comparison as one plain-text table, one row per method, at most ``width`` characters wide.

    ``columns``: ``{headline score: column name}`` to show (default: every headline score). Per score:
    the method's value and its change against the baseline, plus the paired bootstrap's p when the test
    is per score; an exact McNemar test (one per method, on each question's correctness) gets its own
    ``p`` column and its minimum detectable effect an ``mde`` column. A per-score bootstrap's minimum
    detectable effects are listed under the table, per method (they do not fit beside three scores).
    Columns are as wide as their contents.
    Scores that do not fit in ``width`` are left out, and the table says so; every score and test is in
    ``comparison.json``."""
    methods = comparison["methods"]
    baseline = comparison["baseline"]
    heads = methods[baseline]["scores"]
    shown = {k: v for k, v in (columns or {k: k for k in heads}).items() if k in heads}
    compared = {m: e for m, e in methods.items() if m != baseline}
    # McNemar: one p per method ({"b", "c", "p", ...}); bootstrap: one {"p", "ci95", "mde", ...} per score
    mcnemar = any("p" in e.get("test", {}) and not isinstance(e["test"]["p"], dict) for e in methods.values())
    values = {m: {k: _number(e["scores"].get(k)) for k in shown} for m, e in methods.items()}
    changes = {m: {k: _number(e["difference"].get(k), signed=True) for k in shown} for m, e in compared.items()}
    # a comparison written before minimum detectable effects were computed has none: no mde column then
    mde_column = mcnemar and "mde" in comparison
    mdes = {m: _mde(e["test"].get("mde")) for m, e in compared.items()} if mde_column else {}
    w_value = max([len("value"), *(len(v) for row in values.values() for v in row.values())])
    w_change = max([len("change"), *(len(v) for row in changes.values() for v in row.values())])
    w_p = len("<0.001")
    w_mde = max([len("mde"), *(len(v) for v in mdes.values())])
    cell = w_value + 1 + w_change + (0 if mcnemar else 1 + w_p)
    tail = (GAP + w_p if mcnemar else 0) + (GAP + w_mde if mde_column else 0)
    label_width = min(max(len("method"), *(len(m) for m in methods)), MAX_LABEL) + GAP
    room = max(1, (width - label_width - tail) // (cell + GAP))
    left_out = list(shown)[room:]
    shown = dict(list(shown.items())[:room])

    def short(label: str) -> str:
        return label if len(label) <= MAX_LABEL else label[: MAX_LABEL - 3] + "..."

    def row(label: str, cells: Sequence[str], end: Sequence[str] = ()) -> str:
        widths = (w_p, w_mde)
        return (f"{short(label):<{label_width}}" + "".join(f"{c:>{cell + GAP}}" for c in cells)
                + "".join(f"{e:>{w + GAP}}" for e, w in zip(end, widths))).rstrip()

    def value_cell(value: str, change: str = "", p: str = "") -> str:
        return f"{value:>{w_value}} {change:>{w_change}}" + ("" if mcnemar else f" {p:>{w_p}}")

    lines = [row("", [name[: cell] for name in shown.values()], ["p", "mde"][: int(mcnemar) + int(mde_column)]),
             row("method", [value_cell("value", "change", "p") for _ in shown])]
    for m, entry in methods.items():
        if m == baseline:
            lines.append(row(m, [value_cell(values[m][key]) for key in shown]))
            continue
        test = entry["test"]
        cells = [value_cell(values[m][key], changes[m][key], format_p(test[key]["p"] if key in test else None))
                 for key in shown]
        ends = ([format_p(test["p"])] + ([mdes[m]] if mde_column else [])) if mcnemar else []
        lines.append(row(m, cells, ends))
    title = f"{comparison['benchmark']}: {comparison['questions']} questions, change against {baseline}"
    note = f"p: {comparison['test']}"
    # short legends (the screen has one or two lines per table for them); comparison["mde"] says it in full
    power = f"with {stats.PLANNED_POWER:.0%} power"
    listed = ""   # the bootstrap's minimum detectable effects, per method, under the table
    if mde_column:
        note += f"; mde: accuracy change {power}"
    elif "mde" in comparison:
        def method_mdes(entry: Mapping[str, Any]) -> str:   # "-" where a score has none
            return "/".join(_mde(entry["test"][key].get("mde")) if key in entry["test"] else "-" for key in shown)
        listed = f"mde ({'/'.join(shown.values())}), change {power}: " + "; ".join(
            f"{short(m)} {method_mdes(e)}".replace(" ", NO_BREAK) for m, e in compared.items())
    note += f"; not shown: {', '.join(left_out)}" if left_out else ""
    notes = [line.replace(NO_BREAK, " ") for text in (note, listed) for line in textwrap.wrap(text, width)]
    return "\n".join([title, *lines, *notes])
