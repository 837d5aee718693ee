"""Benchmark data: questions loaded from the official layouts or a ``datasets`` dataset.

A benchmark task here is a list of :class:`Question` (data loading) plus a prompt recipe
(``models.py``) plus a scorer (``scoring.py``), in the shape of lmms-eval's tasks. Loading checks
every file and line up front: a missing image or a malformed line raises :class:`DataError` naming
the path and line, before any answer is generated.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from hallupatch.eval.scoring import MME_SUBTASKS, POPE_SPLITS

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
MME_RELEASE_FOLDER = "MME_Benchmark_release_version"
MME_COLUMNS = ("question_id", "image", "question", "answer", "category")
POPE_KEYS = ("question_id", "image", "text", "label")


class DataError(ValueError):
    """Benchmark data that cannot be used as it is; the message names the file (and line)."""


@dataclass
class Question:
    """One benchmark question.

    ``qid`` is unique within a benchmark (MME: ``<subtask>/<image>#<k>``, POPE: ``<split>/<question_id>``);
    ``image_id`` is LLaVA's question id for the image (MME: ``<subtask>/<image>``, POPE: the image file);
    ``group`` is the MME subtask or the POPE split; ``answer`` the ground truth as written in the data.
    """

    qid: str
    group: str
    image_id: str
    image_name: str
    question: str
    answer: str
    image: Union[str, Callable[[], "object"]] = field(repr=False)
    source: str = ""

    def load_image(self):
        """The image as an RGB ``PIL.Image``."""
        from PIL import Image

        if callable(self.image):
            img = self.image()
        else:
            try:
                img = Image.open(self.image)
                img.load()
            except OSError as err:
                raise DataError(f"cannot read image {self.image} (question {self.source}): {err}") from err
        return img.convert("RGB")


def read_json(path: Union[str, Path]):
    """A JSON file's content; invalid JSON or text is a :class:`DataError` naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None


def json_lines(path: Union[str, Path]) -> Iterator[Tuple[str, dict]]:
    """``(where, record)`` for every non-blank line of a JSON-lines file, ``where`` = ``path:line``.

    A line that is not a JSON object is a :class:`DataError` naming the path and line number.
    """
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg}): {line.strip()[:120]!r}") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object; got {line.strip()[:120]!r}")
            yield where, row


def _yes_no(value: str, where: str, line: str) -> str:
    if str(value).strip().lower() not in ("yes", "no"):
        raise DataError(f"{where}: the answer must be Yes or No, got {value!r} in line {line!r}")
    return str(value).strip()


def _subtask_order(name: str):
    return (MME_SUBTASKS.index(name), "") if name in MME_SUBTASKS else (len(MME_SUBTASKS), name)


# --------------------------------------------------------------------------- MME, released folder layout
def _mme_subtask_dirs(root: Path) -> List[Path]:
    found = []
    for d in root.iterdir():
        if d.is_dir() and ((d / "questions_answers_YN").is_dir() or any(d.glob("*.txt"))):
            found.append(d)
    return sorted(found, key=lambda d: _subtask_order(d.name))


def load_mme_folder(root: Union[str, Path]) -> List[Question]:
    """MME from the released folder (``MME_Benchmark_release_version`` or its parent).

    Two layouts per subtask, as released: ``<subtask>/images/<img>`` with
    ``<subtask>/questions_answers_YN/<stem>.txt``, or image and ``<stem>.txt`` side by side in
    ``<subtask>/``. Each txt line is ``question<TAB>Yes|No`` (two lines per image).
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
            if not image_dir.is_dir():
                raise DataError(f"{sub}: has questions_answers_YN/ but no images/ folder")
        else:
            qa_dir = image_dir = sub
        images = {p.stem: p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS}
        for txt in sorted(qa_dir.glob("*.txt")):
            image = images.get(txt.stem)
            if image is None:
                raise DataError(f"{txt}: image not found: no {txt.stem}.<jpg|png|...> in {image_dir}")
            k = 0
            with open(txt, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    where = f"{txt}:{number}"
                    parts = line.strip().split("\t")
                    if len(parts) != 2:
                        raise DataError(f"{where}: expected 'question<TAB>Yes|No', got {line.rstrip()!r}")
                    answer = _yes_no(parts[1], where, line.rstrip())
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


def load_mme_dataset(path: Union[str, Path]) -> List[Question]:
    """MME from a ``datasets`` dataset with the ``lmms-lab/MME`` columns
    (``question_id, image, question, answer, category``): a ``save_to_disk`` folder, parquet/arrow
    files (e.g. the hub repository's ``data/`` folder) or a hub name resolved through the local cache.
    ``question_id`` names the image (``<subtask>/<file>``), shared by its two questions."""
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
        raw = row["image"]
        if raw is None or (isinstance(raw, dict) and raw.get("bytes") is None and not raw.get("path")):
            raise DataError(f"{where}: no image")
        if isinstance(raw, dict) and raw.get("bytes") is None and not Path(raw["path"]).exists():
            raise DataError(f"{where}: image not found: {raw['path']}")
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
                answer=_yes_no(row["answer"], where, repr(row["question"])),
                image=_DatasetImage(ds, row_index),
                source=where,
            )
        )
    order = {name: i for i, name in enumerate(sorted({q.group for q in questions}, key=_subtask_order))}
    return sorted(questions, key=lambda q: order[q.group])  # stable: keeps the dataset's order within a subtask


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


def load_mme(path: Union[str, Path]) -> List[Question]:
    """MME from the released folder layout, or else from a ``datasets`` dataset (see both loaders)."""
    p = Path(path)
    if p.is_dir() and ((p / MME_RELEASE_FOLDER).is_dir() or _mme_subtask_dirs(p)):
        return load_mme_folder(p)
    return load_mme_dataset(path)


# --------------------------------------------------------------------------- POPE
def _pope_split_of(file: Path) -> str:
    stem = file.name.split(".")[0]
    for split in POPE_SPLITS:
        if stem == split or stem.endswith("_" + split):
            return split
    return stem


def pope_question_files(data: Union[str, Path], splits: Optional[Sequence[str]] = None) -> Dict[str, Path]:
    """``{split: question file}``: a folder with ``coco_pope_<split>.json`` (JSON lines) or
    ``<split>.jsonl`` files, or one such file."""
    data = Path(data)
    if data.is_file():
        files = {_pope_split_of(data): data}
    elif data.is_dir():
        files = {}
        for f in sorted(data.iterdir()):
            if f.is_file() and f.suffix in (".json", ".jsonl") and _pope_split_of(f) in POPE_SPLITS:
                split = _pope_split_of(f)
                if split in files:
                    raise DataError(f"two question files for POPE split {split!r}: {files[split]} and {f}")
                files[split] = f
        if not files:
            raise DataError(
                f"no POPE question files in {data}: expected coco_pope_random.json, coco_pope_popular.json, "
                "coco_pope_adversarial.json (JSON lines with question_id, image, text, label)"
            )
    else:
        raise DataError(f"POPE data not found: {data}")
    if splits:
        absent = [s for s in splits if s not in files]
        if absent:
            raise DataError(f"POPE split(s) {absent} not found in {data}; found {sorted(files)}")
        files = {s: files[s] for s in splits}
    return dict(sorted(files.items(), key=lambda kv: (POPE_SPLITS.index(kv[0]) if kv[0] in POPE_SPLITS else 9, kv[0])))


def load_pope(
    data: Union[str, Path], image_folder: Optional[Union[str, Path]] = None, splits: Optional[Sequence[str]] = None
) -> List[Question]:
    """POPE questions from the split files (JSON lines: ``question_id, image, text, label``) and the
    folder of COCO images they name (``--image-folder``; default ``<data>/images`` or ``<data>/val2014``)."""
    files = pope_question_files(data, splits)
    base = Path(data) if Path(data).is_dir() else Path(data).parent
    if image_folder is None:
        image_folder = next((base / n for n in ("images", "val2014") if (base / n).is_dir()), None)
        if image_folder is None:
            raise DataError(f"POPE needs the COCO val2014 images: pass --image-folder DIR (no {base}/images or {base}/val2014)")
    image_folder = Path(image_folder)
    if not image_folder.is_dir():
        raise DataError(f"POPE image folder not found: {image_folder}")
    questions = []
    for split, file in files.items():
        for where, row in json_lines(file):
            if any(k not in row for k in POPE_KEYS):
                raise DataError(f"{where}: a POPE question needs keys {list(POPE_KEYS)}; got {json.dumps(row)[:120]!r}")
            image = image_folder / str(row["image"])
            if not image.is_file():
                raise DataError(f"{where}: image not found: {image}")
            questions.append(
                Question(
                    qid=f"{split}/{row['question_id']}",
                    group=split,
                    image_id=str(row["image"]),
                    image_name=str(row["image"]),
                    question=str(row["text"]),
                    answer=_yes_no(row["label"], where, json.dumps(row)[:120]).lower(),
                    image=str(image),
                    source=where,
                )
            )
    return questions
