"""The lab's data written in each benchmark's official layout, so the harness's loaders and scorers run
on it unchanged.

* :func:`write_mme`: an MME folder, ``existence/<stem>.png`` with ``existence/<stem>.txt`` beside it
  (two lines ``question\\tYes|No`` per image, the Yes question first, as MME pairs them). Only the
  existence subtask: the model is trained on existence questions and nothing else MME asks.
* :func:`write_pope`: ``coco_pope_{random,popular,adversarial}.json`` (JSON lines ``question_id, image,
  text, label``) and an ``images/`` folder.
* :func:`write_weak`: the second planted cause in POPE's question-file format, ``weak.jsonl`` (one object
  drawn small, faint or half hidden) and ``full.jsonl`` (the same questions on the scenes drawn whole), with
  ``images/``; the harness reads either file as one POPE split (``--data DIR/weak.jsonl``).
* :func:`write_coco`: ``annotations/instances_val2014.json`` and ``annotations/captions_val2014.json``
  (COCO format) with the images in ``val2014/``, and ``lab_chair_objects.txt``: the CHAIR object
  vocabulary (``object, synonym, ...`` lines, the first entry the canonical name).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Union

from hallupatch.lab import questions as lab_questions
from hallupatch.lab import world

PathLike = Union[str, Path]
MME_SUBTASKS = ("existence",)
CHAIR_VOCABULARY_FILE = "lab_chair_objects.txt"
DEFAULT_MME_IMAGES = 100
DEFAULT_POPE_QUESTIONS = 200
DEFAULT_COCO_IMAGES = 200


def data_folder(work_dir: PathLike, layout: str, split: str) -> Path:
    """Where the harness writes the lab's built-in data in a layout (``pope``, ``mme``, ``coco``) for a
    split: ``<work_dir>/lab_data/pope`` for test (as before held-out scenes existed), else ``pope-<split>``."""
    return Path(work_dir) / "lab_data" / (layout if split == "test" else f"{layout}-{split}")


def _save_images(folder: Path, scenes: Iterable[world.Scene]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for scene in scenes:
        target = folder / lab_questions.scene_file_name(scene)
        if not target.is_file():
            scene.image().save(target)


def _unique_scenes(scenes: Iterable[world.Scene]) -> List[world.Scene]:
    seen: Dict[str, world.Scene] = {}
    for scene in scenes:
        seen.setdefault(lab_questions.scene_file_name(scene), scene)
    return list(seen.values())


def write_mme(root: PathLike, split: str = "test", images: int = DEFAULT_MME_IMAGES) -> Path:
    """Write the lab's MME folder (subtask ``existence``) under ``root``; returns ``root``."""
    root = Path(root)
    folder = root / "existence"
    qs = lab_questions.mme_questions(split, images)
    folder.mkdir(parents=True, exist_ok=True)
    for yes, no in zip(qs[0::2], qs[1::2]):
        stem = lab_questions.scene_file_name(yes.scene)[:-4]
        (folder / f"{stem}.txt").write_text(
            f"{yes.mme_text}\tYes\n{no.mme_text}\tNo\n", encoding="utf-8")
    _save_images(folder, _unique_scenes(q.scene for q in qs))
    return root


def pope_rows(split: str, kind: str, count: int) -> List[dict]:
    """The JSON-lines rows of one POPE file (``question_id`` from 1, as POPE's files)."""
    return question_rows(lab_questions.pope_questions(split, kind, count))


def question_rows(questions: Sequence[lab_questions.YesNo]) -> List[dict]:
    """Yes/no questions as POPE's JSON-lines rows (``question_id`` from 1)."""
    return [{"question_id": i, "image": lab_questions.scene_file_name(q.scene), "text": q.pope_text, "label": q.label}
            for i, q in enumerate(questions, 1)]


def write_question_file(root: PathLike, name: str, questions: Sequence[lab_questions.YesNo]) -> Path:
    """Write ``<root>/<name>.jsonl`` (POPE's format) and the images it names into ``<root>/images``;
    returns the file."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{name}.jsonl"
    target.write_text("".join(json.dumps(r) + "\n" for r in question_rows(questions)), encoding="utf-8")
    _save_images(root / "images", _unique_scenes(q.scene for q in questions))
    return target


def write_weak(root: PathLike, split: str = "test", questions: int = DEFAULT_POPE_QUESTIONS) -> Path:
    """Write ``weak.jsonl`` and its control ``full.jsonl`` (POPE's format) with ``images/`` under ``root``."""
    weak = lab_questions.weak_questions(split, questions)
    write_question_file(root, "weak", weak)
    write_question_file(root, "full", lab_questions.full_evidence(weak))
    return Path(root)


def write_pope(root: PathLike, split: str = "test", questions: int = DEFAULT_POPE_QUESTIONS) -> Path:
    """Write ``coco_pope_{random,popular,adversarial}.json`` and ``images/`` under ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    scenes = []
    for kind in lab_questions.POPE_KINDS:
        rows = lab_questions.pope_questions(split, kind, questions)
        scenes += [q.scene for q in rows]
        lines = [json.dumps(r) for r in pope_rows(split, kind, questions)]
        (root / f"coco_pope_{kind}.json").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _save_images(root / "images", _unique_scenes(scenes))
    return root


def chair_vocabulary_lines() -> List[str]:
    """The lab's CHAIR object vocabulary: ``red circle, red circles`` (canonical name first)."""
    return [f"{name}, {name}s" for name in world.OBJECTS]


def coco_caption(scene: world.Scene) -> str:
    """A reference caption in plain English: ``"A red circle and a blue square."``."""
    names = [f"a {n}" for n in scene.labels]
    body = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return body[0].upper() + body[1:] + "."


def write_coco(root: PathLike, split: str = "test", images: int = DEFAULT_COCO_IMAGES) -> Path:
    """Write COCO-format ``annotations/instances_val2014.json``, ``annotations/captions_val2014.json``,
    the images in ``val2014/`` (scenes 0.. of ``split``) and the CHAIR vocabulary file under ``root``."""
    if split not in lab_questions.EVAL_SPLITS:
        raise ValueError(f"split must be one of {list(lab_questions.EVAL_SPLITS)}; got {split!r}")
    if not isinstance(images, int) or images < 1:
        raise ValueError(f"images must be a positive integer; got {images!r}")
    root = Path(root)
    scenes = world.scenes(split, images)
    categories = [{"id": i, "name": name, "supercategory": name.split()[1]} for i, name in enumerate(world.OBJECTS, 1)]
    category_id = {c["name"]: c["id"] for c in categories}
    image_rows, instances, captions = [], [], []
    for scene in scenes:
        image_id = lab_questions.scene_image_id(scene)
        image_rows.append({"id": image_id, "file_name": lab_questions.scene_file_name(scene),
                           "width": world.IMAGE_SIZE, "height": world.IMAGE_SIZE})
        for obj in scene.objects:
            half = obj.size / 2
            instances.append({"id": len(instances) + 1, "image_id": image_id, "category_id": category_id[obj.name],
                              "bbox": [obj.x - half, obj.y - half, float(obj.size), float(obj.size)],
                              "area": float(obj.size * obj.size), "iscrowd": 0})
        captions.append({"id": len(captions) + 1, "image_id": image_id, "caption": coco_caption(scene)})
    info = {"description": f"hallupatch lab world, {split} split", "version": "1.0"}
    annotations = root / "annotations"
    annotations.mkdir(parents=True, exist_ok=True)
    (annotations / "instances_val2014.json").write_text(json.dumps(
        {"info": info, "images": image_rows, "annotations": instances, "categories": categories}), encoding="utf-8")
    (annotations / "captions_val2014.json").write_text(json.dumps(
        {"info": info, "images": image_rows, "annotations": captions}), encoding="utf-8")
    (root / CHAIR_VOCABULARY_FILE).write_text("\n".join(chair_vocabulary_lines()) + "\n", encoding="utf-8")
    _save_images(root / "val2014", scenes)
    return root
