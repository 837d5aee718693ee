"""MME (Fu et al. 2023): yes/no questions, two per image, scored as the official ``eval_tool/calculation.py``.

Data: the released folder (``MME_Benchmark_release_version``: one folder per subtask) or a ``datasets``
copy with the ``lmms-lab/MME`` columns. Writes the official tool's input files (``mme_tool/``).
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from hallupatch.eval.data import IMAGE_EXTENSIONS, DataError, Question, match_llava_answers, yes_no_label
from hallupatch.eval.scoring import MME_SUBTASKS, MMERecord, mme_tool_lines, parse_mme_answer, score_mme
from hallupatch.eval.tasks import Task, answered_questions, partial_note, register_task, with_counts

MME_RELEASE_FOLDER = "MME_Benchmark_release_version"
MME_COLUMNS = ("question_id", "image", "question", "answer", "category")
TOOL_FOLDER = "mme_tool"


def _subtask_order(name: str):
    return (MME_SUBTASKS.index(name), "") if name in MME_SUBTASKS else (len(MME_SUBTASKS), name)


# --------------------------------------------------------------------------- MME, released folder layout
def _mme_subtask_dirs(root: Path) -> List[Path]:
    found = []
    for d in root.iterdir():
        if d.is_dir() and ((d / "questions_answers_YN").is_dir() or any(d.glob("*.txt"))):
            found.append(d)
    return sorted(found, key=lambda d: _subtask_order(d.name))


def load_mme_folder(root: Union[str, Path], need_images: bool = True) -> List[Question]:
    """MME from the released folder (``MME_Benchmark_release_version`` or its parent).

    Two layouts per subtask, as released: ``<subtask>/images/<img>`` with
    ``<subtask>/questions_answers_YN/<stem>.txt``, or image and ``<stem>.txt`` side by side in
    ``<subtask>/``. Each txt line is ``question<TAB>Yes|No`` (two lines per image).
    ``need_images=False`` (scoring answers made elsewhere): images may be absent; an absent image is
    named by its question file's stem.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"MME data folder not found: {root}")
    if (root / MME_RELEASE_FOLDER).is_dir():
        root = root / MME_RELEASE_FOLDER
    subtasks = _mme_subtask_dirs(root)
    if not subtasks:
        raise DataError(
            f"no MME subtask folders in {root}: expected <subtask>/images/ with <subtask>/questions_answers_YN/*.txt, "
            "or <subtask>/*.txt next to their images (the released MME_Benchmark_release_version layout)"
        )
    questions: List[Question] = []
    for sub in subtasks:
        if (sub / "questions_answers_YN").is_dir():
            qa_dir, image_dir = sub / "questions_answers_YN", sub / "images"
            if not image_dir.is_dir() and need_images:
                raise DataError(f"{sub}: has questions_answers_YN/ but no images/ folder")
        else:
            qa_dir = image_dir = sub
        images = {p.stem: p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS} if image_dir.is_dir() else {}
        for txt in sorted(qa_dir.glob("*.txt")):
            image = images.get(txt.stem)
            if image is None and need_images:
                raise DataError(f"{txt}: image not found: no {txt.stem}.<jpg|png|...> in {image_dir}")
            image = image or image_dir / txt.stem
            k = 0
            with open(txt, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    where = f"{txt}:{number}"
                    parts = line.strip().split("\t")
                    if len(parts) != 2:
                        raise DataError(f"{where}: expected 'question<TAB>Yes|No', got {line.rstrip()!r}")
                    answer = yes_no_label(parts[1], where, line.rstrip())
                    questions.append(
                        Question(
                            qid=f"{sub.name}/{image.name}#{k}",
                            group=sub.name,
                            image_id=f"{sub.name}/{image.name}",
                            image_name=image.name,
                            question=parts[0].strip(),
                            answer=answer,
                            image=str(image),
                            source=where,
                        )
                    )
                    k += 1
    return questions


# --------------------------------------------------------------------------- MME, `datasets` layout
def _open_dataset(path: str):
    import datasets

    p = Path(path)
    if p.is_dir() and ((p / "dataset_dict.json").exists() or (p / "state.json").exists()):
        ds = datasets.load_from_disk(str(p))
    elif p.exists():
        files = [p] if p.is_file() else sorted(p.rglob("*.parquet")) or sorted(p.rglob("*.arrow"))
        if not files:
            raise DataError(f"{p}: not a saved dataset (save_to_disk) and holds no .parquet or .arrow files")
        kind = "arrow" if files[0].suffix == ".arrow" else "parquet"
        ds = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train")
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        print(f"hallupatch.eval: loading dataset {path!r} with datasets.load_dataset (uses the local cache if present)")
        ds = datasets.load_dataset(path, split="test")
    else:
        raise DataError(f"MME data not found: {path}")
    if isinstance(ds, datasets.DatasetDict):
        if "test" in ds:
            ds = ds["test"]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise DataError(f"{path}: dataset has splits {list(ds)}; expected a 'test' split")
    return ds


def load_mme_dataset(path: Union[str, Path], need_images: bool = True) -> List[Question]:
    """MME from a ``datasets`` dataset with the ``lmms-lab/MME`` columns
    (``question_id, image, question, answer, category``): a ``save_to_disk`` folder, parquet/arrow
    files (e.g. the hub repository's ``data/`` folder) or a hub name resolved through the local cache.
    ``question_id`` names the image (``<subtask>/<file>``), shared by its two questions.
    ``need_images=False``: rows without a usable image are kept (scoring answers made elsewhere)."""
    import datasets

    path = str(path)
    ds = _open_dataset(path)
    missing = [c for c in MME_COLUMNS if c not in ds.column_names]
    if missing:
        raise DataError(f"{path}: dataset lacks column(s) {missing}; lmms-lab/MME has columns {list(MME_COLUMNS)}")
    meta = ds.remove_columns([c for c in ds.column_names if c not in MME_COLUMNS])
    if isinstance(meta.features["image"], datasets.Image):
        meta = meta.cast_column("image", datasets.Image(decode=False))
    seen: Dict[str, int] = defaultdict(int)
    questions = []
    for row_index, row in enumerate(meta):
        where = f"{path} row {row_index}"
        if need_images:
            _check_dataset_image(row["image"], where)
        image_id = str(row["question_id"])
        k = seen[image_id]
        seen[image_id] += 1
        questions.append(
            Question(
                qid=f"{image_id}#{k}",
                group=str(row["category"]),
                image_id=image_id,
                image_name=image_id.split("/")[-1],
                question=str(row["question"]).strip(),
                answer=yes_no_label(row["answer"], where, repr(row["question"])),
                image=_DatasetImage(ds, row_index),
                source=where,
            )
        )
    order = {name: i for i, name in enumerate(sorted({q.group for q in questions}, key=_subtask_order))}
    return sorted(questions, key=lambda q: order[q.group])  # stable: keeps the dataset's order within a subtask


def _check_dataset_image(raw, where: str) -> None:
    if raw is None or (isinstance(raw, dict) and raw.get("bytes") is None and not raw.get("path")):
        raise DataError(f"{where}: no image")
    if isinstance(raw, dict) and raw.get("bytes") is None and not Path(raw["path"]).exists():
        raise DataError(f"{where}: image not found: {raw['path']}")


class _DatasetImage:
    """Decodes one row's image on demand (keeps the dataset out of memory until needed)."""

    def __init__(self, ds, index: int):
        self.ds, self.index = ds, index

    def __call__(self):
        from PIL import Image

        img = self.ds[self.index]["image"]
        if isinstance(img, dict):
            import io

            img = Image.open(io.BytesIO(img["bytes"])) if img.get("bytes") else Image.open(img["path"])
        return img


def load_mme(path: Union[str, Path], need_images: bool = True) -> List[Question]:
    """MME from the released folder layout, or else from a ``datasets`` dataset (see both loaders)."""
    p = Path(path)
    if p.is_dir() and ((p / MME_RELEASE_FOLDER).is_dir() or _mme_subtask_dirs(p)):
        return load_mme_folder(p, need_images)
    return load_mme_dataset(path, need_images)


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


@register_task
class MME(Task):
    name = "mme"
    title = "MME"
    summary = "MME perception and cognition (yes/no), scored as the official calculation.py"
    data_help = ("the released folder (MME_Benchmark_release_version) or a `datasets` dataset (save_to_disk "
                 "folder, parquet/arrow files, or a cached hub name such as lmms-lab/MME)")

    def embedded_data(self, work_dir: Path, split: str = "test"):
        from hallupatch.lab import writers

        return writers.write_mme(writers.data_folder(work_dir, "mme", split), split=split), f"embedded:lab-mme-{split}"

    def load(self, data, recipe, out_dir, answers):
        return load_mme(data, need_images=answers is None)

    def read_answers(self, path, questions):
        return match_llava_answers(path, questions)

    def score(self, questions, texts):
        answered = answered_questions(questions, texts)
        scores = score_mme(MMERecord(q.group, q.image_id, q.answer, texts[q.qid]) for q in answered)
        return with_counts(scores, answered, questions), None

    def table(self, scores):
        out = [f"{'subtask':<24}{'category':<12}{'acc':>8}{'acc+':>8}{'score':>9}{'other':>7}"]
        for name, s in scores["subtasks"].items():
            out.append(
                f"{name:<24}{s['category']:<12}{s['acc'] * 100:>8.2f}{s['acc_plus'] * 100:>8.2f}"
                f"{s['score']:>9.2f}{s['other_answers']:>7d}"
            )
        out.append("-" * 68)
        out.append(f"{'perception':<44}{scores['perception']:>9.2f}")
        out.append(f"{'cognition':<44}{scores['cognition']:>9.2f}")
        return "\n".join(out + partial_note(scores))

    def headline(self, scores):
        return {"perception": scores["perception"], "cognition": scores["cognition"]}

    def item_correct(self, question, text):
        return parse_mme_answer(text) == question.answer.strip().lower()

    def write_files(self, out_dir, questions, records):
        texts = {qid: r["text"] for qid, r in records.items()}
        return write_mme_tool_files(Path(out_dir) / TOOL_FOLDER, questions, texts)

    def result_note(self, out_dir):
        return f", official-tool files: {out_dir / TOOL_FOLDER}"
