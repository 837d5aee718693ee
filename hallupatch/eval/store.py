"""Resumable answer storage: one JSON line per answer, appended and flushed as produced.

Layout of an output folder::

    run.json                 the settings of the run (a resume with other settings is refused)
    answers.jsonl            answers (one process), or after the merge of a sharded run
    answers.rank<R>.jsonl    answers of process R while a sharded run is in flight
    scores.json, mme_tool/   results (written by the finishing process)

A process killed mid-write leaves at most a partial last line in its own answers file; it is
detected and cut off on the next start, so nothing is corrupted or doubled.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

RUN_FILE = "run.json"
ANSWERS_FILE = "answers.jsonl"
_RANK_FILE = re.compile(r"answers\.rank(\d+)\.jsonl$")


class StoreError(RuntimeError):
    """An output folder that cannot be resumed as asked; the message says what to do."""


def answers_path(out_dir: Path, rank: int = 0, world: int = 1) -> Path:
    """The answers file that process ``rank`` of ``world`` appends to."""
    return Path(out_dir) / (ANSWERS_FILE if world == 1 else f"answers.rank{rank}.jsonl")


def all_answer_files(out_dir: Path) -> List[Path]:
    out_dir = Path(out_dir)
    files = [out_dir / ANSWERS_FILE] if (out_dir / ANSWERS_FILE).exists() else []
    ranked = [p for p in out_dir.glob("answers.rank*.jsonl") if _RANK_FILE.search(p.name)]
    return files + sorted(ranked, key=lambda p: int(_RANK_FILE.search(p.name).group(1)))


def read_answers(path: Path, repair: bool = False) -> List[dict]:
    """The complete answer lines of ``path`` (missing file: none).

    Text after the last line break is what a kill mid-write leaves: it is ignored, and with
    ``repair=True`` cut off the file (a warning says so). A complete line that is not an answer record
    means the file was edited or damaged: ``StoreError`` naming the path and line number.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    *complete, tail = data.split(b"\n")
    rows: List[dict] = []
    for number, raw in enumerate(complete, 1):
        try:
            row = json.loads(raw)
        except ValueError:
            row = None
        if not isinstance(row, dict) or "question_id" not in row:
            raise StoreError(
                f"{path}:{number}: not a valid answer line ({raw[:80]!r}); delete that line (its question is "
                "then answered again) or rerun with --overwrite"
            )
        rows.append(row)
    if tail and repair:
        with open(path, "r+b") as f:
            f.truncate(len(data) - len(tail))
        warnings.warn(f"{path}: dropped an incomplete last line (the run was interrupted mid-write)")
    return rows


def finished_ids(out_dir: Path, own_file: Optional[Path] = None) -> set:
    """Question ids answered in any answers file of ``out_dir``; ``own_file`` is repaired if cut."""
    done = set()
    for path in all_answer_files(out_dir):
        done.update(r["question_id"] for r in read_answers(path, repair=path == own_file))
    return done


class AnswerWriter:
    """Appends answer records to one file, flushing each batch to disk before returning."""

    def __init__(self, path: Path):
        self.path = Path(path)
        read_answers(self.path, repair=True)  # cut a partial last line before appending after it
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, records: Iterable[Mapping]) -> None:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        self._file.write(text)
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


#: settings that ``run.json`` records but a resume need not match: answers do not depend on them
RECORD_ONLY = ("batch_size",)


def _differences(stored: Mapping, current: Mapping) -> List[str]:
    keys = sorted((set(stored) | set(current)) - set(RECORD_ONLY))
    return [f"{k}: {stored.get(k)!r} (stored) vs {current.get(k)!r} (now)" for k in keys if stored.get(k) != current.get(k)]


def check_output_folder(out_dir: Path) -> None:
    """Refuse (``StoreError``, before any work) an ``--output`` that is a file, lies under a file, or
    would be created in or is a folder this user cannot write."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise StoreError(f"--output {out_dir} is a file, not a folder: give a folder for the results")
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != out_dir and not existing.is_dir():
        raise StoreError(f"--output {out_dir} lies under the file {existing}: give a folder for the results")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StoreError(f"--output {out_dir}: {existing} is not writable: give a folder you can write to")


def prepare_output(out_dir: Path, settings: Mapping, overwrite: bool = False) -> None:
    """Create ``out_dir`` and store ``settings`` in ``run.json``; on a resume, refuse other settings.

    ``overwrite`` discards the previous run's files (answers, scores, tool files) first. A ``run.json``
    with no answers next to it protects nothing, so it is replaced by these settings (a corrected command
    is never blocked by the folder a refused one left). A resume records every batch size used
    (:data:`RECORD_ONLY`).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_file = out_dir / RUN_FILE
    if overwrite:
        for p in all_answer_files(out_dir) + [run_file, out_dir / "scores.json"]:
            p.unlink(missing_ok=True)
        shutil.rmtree(out_dir / "mme_tool", ignore_errors=True)
    settings = json.loads(json.dumps(settings))  # normalise tuples etc. as JSON would
    check_resumable(out_dir, settings)
    if run_file.exists() and finished_ids(out_dir):
        stored = read_settings(run_file)
        recorded = _record_only(stored, settings)
        if recorded == {k: stored.get(k) for k in recorded}:
            return
        settings = {**stored, **recorded}
    tmp = run_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, run_file)


def _record_only(stored: Mapping, current: Mapping) -> dict:
    """The :data:`RECORD_ONLY` values of a resumed run: each one's values so far and now, a list once they differ."""
    merged = {}
    for key in RECORD_ONLY:
        if key not in current:
            continue
        before = stored.get(key)
        seen = before if isinstance(before, list) else [] if before is None else [before]
        if current[key] not in seen:
            seen = seen + [current[key]]
        merged[key] = seen[0] if len(seen) == 1 else seen
    return merged


def check_resumable(out_dir: Path, settings: Mapping) -> None:
    """Raise ``StoreError`` when ``out_dir`` holds answers these settings cannot resume (read-only, so every
    process of a sharded run can check it and stop, instead of waiting for the one that failed). A
    ``run.json`` without answers blocks nothing: :func:`prepare_output` replaces it."""
    out_dir = Path(out_dir)
    answered = bool(finished_ids(out_dir))
    if answered and (out_dir / RUN_FILE).exists():
        check_settings(out_dir, settings)
    elif answered:
        raise StoreError(
            f"{out_dir} holds answers but no {RUN_FILE}, so they cannot be checked against this run; "
            "use another --output or pass --overwrite to discard them"
        )


def read_settings(run_file: Path) -> dict:
    """The settings stored in ``run_file`` (``StoreError`` when it is not JSON)."""
    try:
        return json.loads(Path(run_file).read_text(encoding="utf-8"))
    except ValueError as err:
        raise StoreError(f"{run_file} is not valid JSON ({err}); delete it or pass --overwrite") from None


def check_settings(out_dir: Path, settings: Mapping) -> None:
    """Raise ``StoreError`` listing the differences when ``out_dir/run.json`` holds other settings."""
    stored = read_settings(Path(out_dir) / RUN_FILE)
    diff = _differences(stored, json.loads(json.dumps(settings)))
    if diff:
        raise StoreError(
            f"{out_dir} holds a run with different settings, so its answers cannot be resumed:\n  "
            + "\n  ".join(diff)
            + f"\nUse another --output for the new settings, or discard these answers: delete {out_dir}, or pass "
            "--overwrite (it discards the answers of every method in --output)."
        )


def merge_answers(out_dir: Path, order: Sequence[str]) -> Dict[str, dict]:
    """Merge every answers file of ``out_dir`` into ``answers.jsonl`` and return ``{question_id: record}``.

    The first record of a question id wins; records follow ``order`` (question ids), then any others in
    file order. Written atomically; the per-rank files are removed afterwards.
    """
    out_dir = Path(out_dir)
    files = all_answer_files(out_dir)
    merged: Dict[str, dict] = {}
    for path in files:
        for row in read_answers(path):
            merged.setdefault(row["question_id"], row)
    rank = {qid: i for i, qid in enumerate(order)}
    rows = sorted(merged.values(), key=lambda r: rank.get(r["question_id"], len(rank)))
    target = out_dir / ANSWERS_FILE
    tmp = target.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    for path in files:
        if path != target:
            path.unlink()
    return {r["question_id"]: r for r in rows}


def folder_name(text: str) -> str:
    """``text`` as a folder name: letters, digits, ``-``, ``_`` and ``.`` kept, anything else ``-``."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-")


def write_json(path: Path, data) -> None:
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
