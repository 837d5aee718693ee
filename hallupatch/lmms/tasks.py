"""The lab's MME and POPE as local lmms-eval tasks, offline: ``python -m hallupatch.lmms tasks DIR``.

``DIR`` gets the task files (``--include_path DIR``) and ``DIR/data/``:

* ``data/mme``: the lab's MME as a ``datasets`` folder (``save_to_disk``) with the ``lmms-lab/MME`` columns
  (``question_id`` = the image, shared by its two questions; ``image, question, answer, category``); also
  readable by ``python -m hallupatch.eval mme --data DIR/data/mme``;
* ``data/pope``: the lab's POPE as a ``datasets`` folder with the ``lmms-lab/POPE`` columns, one split per
  setting (random, popular, adversarial); ``data/pope_files``: the same questions in POPE's own layout
  (``python -m hallupatch.eval pope --data DIR/data/pope_files``).

Tasks: ``hallupatch_lab_mme`` (lmms-eval's MME prompt and scores), ``hallupatch_lab_mme_choice`` (the
same questions as Yes/No multiple choice, by loglikelihood), ``hallupatch_lab_pope_<split>`` and the
group ``hallupatch_lab_pope`` (lmms-eval's POPE prompt and scores).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Dict, List, Sequence, Union

from hallupatch.eval.data import Question

TEMPLATES = Path(__file__).parent / "lab_tasks"
POPE_SPLITS = ("random", "popular", "adversarial")
POPE_GROUP = "hallupatch_lab_pope"
TASKS = ("hallupatch_lab_mme", "hallupatch_lab_mme_choice", POPE_GROUP)


def _png(path: Union[str, Path]) -> Dict[str, object]:
    """An image file as a ``datasets.Image`` value holding its bytes (the folder is self-contained)."""
    from PIL import Image

    buffer = io.BytesIO()
    with Image.open(path) as image:
        image.convert("RGB").save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": Path(path).name}


def _dataset(rows: List[Dict[str, object]], columns: Sequence[str]):
    import datasets

    features = datasets.Features({c: datasets.Image() if c == "image" else datasets.Value("string") for c in columns})
    return datasets.Dataset.from_dict({c: [r[c] for r in rows] for c in columns}, features=features)


def mme_dataset(questions: Sequence[Question]):
    """MME questions as a ``datasets.DatasetDict`` (split ``test``) with the ``lmms-lab/MME`` columns."""
    import datasets

    rows = [{"question_id": q.image_id, "image": _png(q.image), "question": q.question, "answer": q.answer,
             "category": q.group} for q in questions]
    return datasets.DatasetDict({"test": _dataset(rows, ("question_id", "image", "question", "answer", "category"))})


def pope_dataset(questions: Sequence[Question]):
    """POPE questions as a ``datasets.DatasetDict`` with the ``lmms-lab/POPE`` columns, one split per
    setting (``question_id`` = hallupatch's ``<split>/<id>``)."""
    import datasets

    splits = {}
    for split in POPE_SPLITS:
        rows = [{"id": str(i), "question_id": q.qid, "question": q.question, "answer": q.answer,
                 "image_source": q.image_id, "image": _png(q.image), "category": split}
                for i, q in enumerate(q for q in questions if q.group == split)]
        splits[split] = _dataset(rows, ("id", "question_id", "question", "answer", "image_source", "image", "category"))
    return datasets.DatasetDict(splits)


def write_lab_tasks(folder: Union[str, Path], mme_images: int = 100, pope_questions: int = 200) -> Path:
    """Write the lab's tasks and data (test split: ``mme_images`` images, two questions each;
    ``pope_questions`` per POPE setting) under ``folder``; returns ``folder``."""
    from hallupatch.eval.tasks.mme import load_mme_folder
    from hallupatch.eval.tasks.pope import load_pope
    from hallupatch.lab import writers

    if mme_images < 1 or pope_questions < 1:
        raise ValueError(f"mme_images and pope_questions must be >= 1; got {mme_images} and {pope_questions}")
    folder = Path(folder).resolve()
    data = folder / "data"
    mme_folder = writers.write_mme(data / "mme_folder", split="test", images=mme_images)
    mme_dataset(load_mme_folder(mme_folder)).save_to_disk(str(data / "mme"))
    pope_files = writers.write_pope(data / "pope_files", split="test", questions=pope_questions)
    pope_dataset(load_pope(pope_files)).save_to_disk(str(data / "pope"))

    def write(template: str, target: str, **fields: str) -> None:
        text = (TEMPLATES / template).read_text(encoding="utf-8")
        for key, value in {"DATA": data.as_posix(), **fields}.items():
            text = text.replace(f"@{key}@", value)
        (folder / target).write_text(text, encoding="utf-8")

    write("hallupatch_lab_mme.yaml.in", "hallupatch_lab_mme.yaml")
    write("hallupatch_lab_mme_choice.yaml.in", "hallupatch_lab_mme_choice.yaml")
    for split in POPE_SPLITS:
        write("hallupatch_lab_pope.yaml.in", f"hallupatch_lab_pope_{split}.yaml", SPLIT=split)
    members = "".join(f"  - hallupatch_lab_pope_{s}\n" for s in POPE_SPLITS)
    (folder / f"{POPE_GROUP}.yaml").write_text(f"group: {POPE_GROUP}\ntask:\n{members}", encoding="utf-8")
    (folder / "utils.py").write_text((TEMPLATES / "utils.py").read_text(encoding="utf-8"), encoding="utf-8")
    return folder
