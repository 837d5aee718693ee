"""The evaluation loop: shard, batch, generate, store, merge, score, report."""
from __future__ import annotations

import os
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from hallupatch.eval.scoring import MMERecord, POPERecord, mme_tool_lines, score_mme, score_pope
from hallupatch.eval.store import (
    AnswerWriter,
    StoreError,
    answers_path,
    check_resumable,
    check_settings,
    finished_ids,
    merge_answers,
    prepare_output,
    write_json,
)
from hallupatch.eval.tasks import DataError, Question, json_lines


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
def _trace_summary(trace, sample: int, passes: int) -> Optional[Dict[str, Any]]:
    """MemVR's record for one sample: per forward pass of its own answer, the trigger layer or None."""
    layers = trace.trigger_layers()
    if sample >= len(layers):
        return None
    own = layers[sample][:passes]
    return {"passes": len(own), "triggered_passes": sum(x is not None for x in own), "trigger_layers": own}


def answer_record(q: Question, generated: Mapping[str, Any], trace: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """One line of ``answers.jsonl`` (LLaVA's answer fields ``question_id, prompt, text`` plus ours)."""
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
    if trace is not None:
        record["memvr"] = trace
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
    trace: bool = False,
    progress: bool = True,
) -> int:
    """Answer this process's shard of ``questions`` not yet in ``out_dir``, appending as it goes.

    Returns the number of answers produced now. ``trace=True`` records MemVR's trace per answer.
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
                t = None
                if trace:
                    import hallupatch

                    t = hallupatch.get_trace(backend.model)
                records = []
                for i, (q, out) in enumerate(zip(batch, outputs)):
                    out = dict(out, prompt=backend.prompt(q))
                    summary = _trace_summary(t, i, out.get("new_tokens", 0)) if t is not None else None
                    records.append(answer_record(q, out, summary))
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


# --------------------------------------------------------------------------- results
def score_answers(benchmark: str, questions: Sequence[Question], texts: Mapping[str, str]) -> Dict[str, Any]:
    """Official-tool scores of ``texts`` (question id -> answer text) on the answered ``questions``."""
    answered = [q for q in questions if q.qid in texts]
    if not answered:
        raise StoreError("no answers to score")
    if benchmark == "mme":
        scores = score_mme(MMERecord(q.group, q.image_id, q.answer, texts[q.qid]) for q in answered)
    elif benchmark == "pope":
        scores = score_pope(POPERecord(q.group, q.answer, texts[q.qid]) for q in answered)
    else:
        raise ValueError(f"unknown benchmark {benchmark!r}; use mme or pope")
    scores["answered"] = len(answered)
    scores["questions"] = len(questions)
    return scores


def write_mme_tool_files(folder: Path, questions: Sequence[Question], texts: Mapping[str, str]) -> List[Path]:
    """The official MME tool's input: ``<subtask>.txt`` with ``image\\tquestion\\tgt\\tprediction`` lines,
    an image's questions on consecutive lines (the tool pairs lines two by two)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows: Dict[str, Dict[str, List[dict]]] = defaultdict(dict)
    for q in questions:
        if q.qid in texts:
            rows[q.group].setdefault(q.image_id, []).append(
                {"image": q.image_name, "question": q.question, "answer": q.answer, "prediction": texts[q.qid]}
            )
    written = []
    for subtask, by_image in rows.items():
        path = folder / f"{subtask}.txt"
        lines = mme_tool_lines([row for image_rows in by_image.values() for row in image_rows])
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        written.append(path)
    return written


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


def format_table(scores: Mapping[str, Any]) -> str:
    """The scores as a plain-text table."""
    out = []
    if scores["benchmark"] == "mme":
        out.append(f"{'subtask':<24}{'category':<12}{'acc':>8}{'acc+':>8}{'score':>9}{'other':>7}")
        for name, s in scores["subtasks"].items():
            out.append(
                f"{name:<24}{s['category']:<12}{s['acc'] * 100:>8.2f}{s['acc_plus'] * 100:>8.2f}"
                f"{s['score']:>9.2f}{s['other_answers']:>7d}"
            )
        out.append("-" * 68)
        out.append(f"{'perception':<44}{scores['perception']:>9.2f}")
        out.append(f"{'cognition':<44}{scores['cognition']:>9.2f}")
    else:
        out.append(f"{'split':<14}{'accuracy':>10}{'precision':>11}{'recall':>9}{'F1':>8}{'yes-ratio':>11}")
        for name, s in scores["splits"].items():
            out.append(
                f"{name:<14}{s['accuracy'] * 100:>10.2f}{s['precision'] * 100:>11.2f}{s['recall'] * 100:>9.2f}"
                f"{s['f1'] * 100:>8.2f}{s['yes_ratio'] * 100:>11.2f}"
            )
        out.append("-" * 63)
        out.append(f"{'mean':<14}{scores['mean_accuracy'] * 100:>10.2f}{'':>20}{scores['mean_f1'] * 100:>8.2f}")
    if scores.get("answered", 0) < scores.get("questions", 0):
        out.append(f"(scored {scores['answered']} of {scores['questions']} questions)")
    return "\n".join(out)


def finish(benchmark: str, questions: Sequence[Question], out_dir: Path, settings: Mapping[str, Any]) -> Dict[str, Any]:
    """Merge all answers files, check completeness, write ``scores.json`` (and MME tool files)."""
    merged = merge_answers(out_dir, [q.qid for q in questions])
    missing = [q.qid for q in questions if q.qid not in merged]
    if missing:
        raise StoreError(
            f"{len(missing)} question(s) have no answer in {out_dir} (e.g. {missing[:3]}); "
            "a process stopped early: rerun the same command to answer them"
        )
    texts = {qid: r["text"] for qid, r in merged.items()}
    return write_results(benchmark, questions, texts, out_dir, settings)


def write_results(benchmark, questions, texts, out_dir: Path, settings: Mapping[str, Any]) -> Dict[str, Any]:
    scores = score_answers(benchmark, questions, texts)
    scores["settings"] = dict(sorted(settings.items()))
    write_json(Path(out_dir) / "scores.json", scores)
    if benchmark == "mme":
        write_mme_tool_files(Path(out_dir) / "mme_tool", questions, texts)
    return scores


# --------------------------------------------------------------------------- answers produced elsewhere
_PROMPT_NOISE = re.compile(r"Answer the question using a single word or phrase\.|Please answer yes or no\.")


def _norm_prompt(text: str) -> str:
    return " ".join(_PROMPT_NOISE.sub(" ", text).split())


def _image_key(image_id: str):
    parts = str(image_id).split("/")
    return (parts[0], parts[-1].rsplit(".", 1)[0]) if len(parts) > 1 else ("", parts[0])


def load_external_answers(path: Path, questions: Sequence[Question]) -> Dict[str, str]:
    """``{question id: text}`` from an answers JSONL produced elsewhere (LLaVA's ``question_id, text``
    and optional ``prompt``, or this tool's own ``answers.jsonl``).

    A line whose ``question_id`` is one of ours is matched directly. LLaVA's MME ids name the image
    (``<subtask>/<file>``, shared by its two questions): those are matched by ``prompt`` when given,
    else in order. A POPE id that exists in several loaded splits is an error (score one split at a time).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"answers file not found: {path}")
    by_qid = {q.qid: q for q in questions}
    by_image: Dict[Any, List[Question]] = defaultdict(list)
    by_plain: Dict[str, List[Question]] = defaultdict(list)
    for q in questions:
        by_image[_image_key(q.image_id)].append(q)
        if "#" not in q.qid:
            by_plain[q.qid.split("/", 1)[-1]].append(q)  # POPE: "<split>/<id>" -> "<id>"
    texts: Dict[str, str] = {}
    for where, row in json_lines(path):
        if "question_id" not in row or "text" not in row:
            raise DataError(f"{where}: an answer line needs 'question_id' and 'text'")
        qid, text = str(row["question_id"]), str(row["text"])
        if qid in by_qid:
            target = by_qid[qid]
        elif qid in by_plain and len(by_plain[qid]) == 1:
            target = by_plain[qid][0]  # POPE numbers every split 1..N: the prompt, when given, must agree
            if "prompt" in row and _norm_prompt(target.question) != _norm_prompt(str(row["prompt"])):
                raise DataError(
                    f"{where}: question {qid!r} asks {str(row['prompt'])[:80]!r} but question {qid} of split "
                    f"{target.group!r} asks {target.question[:80]!r}; score the split these answers belong to (--splits)"
                )
        elif qid in by_plain:
            raise DataError(
                f"{where}: question id {qid!r} exists in several splits ({sorted({q.group for q in by_plain[qid]})}); "
                "score one split at a time with --splits"
            )
        else:
            candidates = [q for q in by_image.get(_image_key(qid), []) if q.qid not in texts]
            if "prompt" in row:
                candidates = [q for q in candidates if _norm_prompt(q.question) == _norm_prompt(str(row["prompt"]))]
            if not candidates:
                raise DataError(f"{where}: question {qid!r} matches no unanswered question of the loaded data")
            target = candidates[0]
        texts.setdefault(target.qid, text)
    return texts
