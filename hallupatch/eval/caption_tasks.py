"""CHAIR, region-caption and PhD benchmarks as harness tasks: data -> questions, answers -> scores.

Each task turns its benchmark's data into :class:`~hallupatch.eval.tasks.Question` objects for the
generation loop, turns stored answer records back into its scorer's input, and prints a table.
Answer records are the harness's (``question_id``, ``text``, ...); ``--answers`` files written by
other tools are read in each benchmark's usual format (CHAIR: JSONL ``image_id`` + ``caption``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .chair import ChairWords, coco_ground_truth, find_coco_annotations, sample_image_ids, score_captions
from .phd import PHD_MODES, load_phd, score_phd
from .regcap import RegionSample, load_refcocog, load_region_samples, region_prompt, score_region_captions
from .tasks import DataError, Question, json_lines, read_json

PathLike = Union[str, Path]

CHAIR_PROMPT = "Please describe this image in detail."
# OPERA's chair_eval.py generates with max_new_tokens=512; MemVR's released CHAIR scripts pass 1024.
CHAIR_MAX_NEW_TOKENS = 512
CHAIR_NUM_IMAGES = 500  # OPERA and MemVR caption 500 random val2014 images
REGCAP_MAX_NEW_TOKENS = 64  # a short region description
IMAGE_IDS_FILE = "chair_image_ids.json"


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value * 100:.1f}"


def _partial(scores: Mapping) -> List[str]:
    if scores.get("answered", 0) < scores.get("questions", 0):
        return [f"(scored {scores['answered']} of {scores['questions']})"]
    return []


# ----------------------------------------------------------------------------------- CHAIR
@dataclass
class ChairData:
    """The images to caption (seeded sample) and the ground-truth objects of each."""

    questions: List[Question]
    ground_truth: Dict[int, set]
    image_ids: List[int]


def _annotation_images(instance_files: Sequence[Path]) -> Dict[int, Tuple[str, str]]:
    """``{image_id: (split folder, file name)}`` from the instance files' ``images`` lists."""
    images: Dict[int, Tuple[str, str]] = {}
    for path in instance_files:
        split = path.stem.split("_", 1)[1] if "_" in path.stem else ""
        data = read_json(path)
        for im in data.get("images", []):
            images[int(im["id"])] = (split, im["file_name"])
    return images


def load_chair(data: PathLike, num_images: Optional[int] = CHAIR_NUM_IMAGES, seed: int = 0,
               image_ids: Optional[Sequence[int]] = None, annotations: Optional[PathLike] = None,
               need_images: bool = True) -> ChairData:
    """CHAIR data from a COCO folder: ``<data>/annotations/{instances,captions}_<split>.json`` and the
    images in ``<data>/<split>/`` (e.g. ``val2014/``).

    ``image_ids`` (a saved sample) wins over drawing ``num_images`` with ``seed`` from the images that
    the instance files list. Missing files raise ``FileNotFoundError`` / ``DataError`` naming the path.
    """
    root = Path(data)
    if not root.is_dir():
        raise DataError(f"CHAIR data folder not found: {root} (expected annotations/ and val2014/ in it)")
    inst_files, cap_files = find_coco_annotations(Path(annotations) if annotations else root / "annotations")
    listed = _annotation_images(inst_files)
    if image_ids is None:
        # the sample comes from the val images (as OPERA's chair_eval.py, which MemVR uses, draws from
        # val2014); every instance file still feeds the ground truth
        val = {i: where for i, where in listed.items() if where[0].startswith("val")}
        image_ids = sample_image_ids(val or listed, num_images, seed)
    unknown = [i for i in image_ids if i not in listed]
    if unknown:
        raise DataError(f"image ids {unknown[:5]} are not listed in {', '.join(map(str, inst_files))}")
    questions = []
    for imid in image_ids:
        split, name = listed[imid]
        path = root / split / name
        if need_images and not path.is_file():
            raise DataError(f"CHAIR image not found: {path}")
        questions.append(Question(qid=str(imid), group="chair", image_id=str(imid), image_name=name,
                                  question=CHAIR_PROMPT, answer="", image=str(path), source=str(path)))
    gt = coco_ground_truth(inst_files, cap_files, image_ids=image_ids)
    return ChairData(questions, gt, list(image_ids))


def answer_records(path: Path) -> List[dict]:
    """The records of an answers file: a JSON list, or JSON lines (bad lines named with their number)."""
    if not path.is_file():
        raise FileNotFoundError(f"answers file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return read_json(path)
    return [row for _, row in json_lines(path)]


def read_chair_answers(path: PathLike) -> List[Tuple[int, str]]:
    """``(image_id, caption)`` pairs from a JSON list or JSONL file of ``{"image_id", "caption"}``
    records (OPERA / MemVR output; ``text`` is accepted for ``caption``)."""
    path = Path(path)
    rows = answer_records(path)
    pairs = []
    for i, row in enumerate(rows, 1):
        caption = row.get("caption", row.get("text"))
        if "image_id" not in row or caption is None:
            raise DataError(f"{path}: record {i} needs image_id and caption; got keys {sorted(row)}")
        pairs.append((int(row["image_id"]), str(caption)))
    return pairs


def score_chair_pairs(pairs: Sequence[Tuple[int, str]], ground_truth: Mapping[int, set]) -> Tuple[dict, List[dict]]:
    """``(scores, per-caption details)`` for ``(image_id, caption)`` pairs."""
    result = score_captions(pairs, ground_truth, ChairWords())
    return {"benchmark": "chair", **result.metrics()}, [c.to_dict() for c in result.captions]


def chair_table(scores: Mapping) -> str:
    rows = [("CHAIRs", _fmt(scores["CHAIRs"])), ("CHAIRi", _fmt(scores["CHAIRi"])),
            ("Recall", _fmt(scores["Recall"])), ("avg_len", f"{scores['avg_len']:.1f}"),
            ("captions", str(scores["num_captions"]))]
    return "\n".join([f"{k:<10}{v:>8}" for k, v in rows] + _partial(scores))


# ----------------------------------------------------------------------------------- region captions
@dataclass
class RegcapData:
    samples: List[RegionSample]
    questions: List[Question]


def load_regcap(data: PathLike, family: Optional[str], image_folder: Optional[PathLike] = None,
                split: str = "val", need_images: bool = True) -> RegcapData:
    """Region samples and their family-specific questions.

    ``data``: a JSON/JSONL file of region records (see :func:`load_region_samples`), or the official
    RefCOCOg folder holding ``refs(umd).p`` and ``instances.json``. Images are looked up in
    ``image_folder`` (default: ``images/`` next to the data). ``family`` selects the region prompt
    (``None`` only for ``--answers`` scoring, when no question is asked).
    """
    data = Path(data)
    if data.is_dir() and (data / "refs(umd).p").exists():
        samples = load_refcocog(data / "refs(umd).p", data / "instances.json", split)
        base = data
    elif data.is_file() or data.suffix in (".json", ".jsonl"):
        samples = load_region_samples(data)
        base = data.parent
    else:
        raise DataError(f"region caption data not found: {data} (a .json/.jsonl file or a RefCOCOg folder "
                        "with refs(umd).p and instances.json)")
    folder = Path(image_folder) if image_folder else base / "images"
    questions = []
    for s in samples:
        path = Path(s.image) if Path(s.image).is_absolute() else folder / s.image
        prompt = ""  # scoring answers made elsewhere asks nothing
        if need_images:
            if not path.is_file():
                raise DataError(f"region caption image not found: {path} (sample {s.sample_id})")
            from PIL import Image

            with Image.open(path) as im:
                width, height = im.size
            prompt = region_prompt(family, s.bbox, width, height)
        questions.append(Question(qid=s.sample_id, group="regcap", image_id=s.sample_id,
                                  image_name=Path(s.image).name, question=prompt,
                                  answer=" | ".join(s.references), image=str(path), source=str(path)))
    return RegcapData(samples, questions)


def read_id_text_answers(path: PathLike, id_key: str = "question_id", text_keys=("text", "caption")) -> Dict[str, str]:
    """``{id: text}`` from a JSONL (or JSON list) of answer records (LLaVA's ``question_id`` + ``text``)."""
    path = Path(path)
    rows = answer_records(path)
    out = {}
    for i, row in enumerate(rows, 1):
        value = next((row[k] for k in text_keys if k in row), None)
        if id_key not in row or value is None:
            raise DataError(f"{path}: record {i} needs {id_key} and one of {list(text_keys)}; got keys {sorted(row)}")
        out[str(row[id_key])] = str(value)
    return out


def score_regcap(samples: Sequence[RegionSample], predictions: Mapping[str, str]) -> Tuple[dict, List[dict]]:
    """Region-caption scores of the samples that have a prediction (``answered`` of ``questions``)."""
    answered = [s for s in samples if s.sample_id in predictions]
    if not answered:
        raise DataError(f"none of the {len(samples)} region samples has an answer")
    scores, chair = score_region_captions(answered, predictions)
    scores = {"benchmark": "regcap", **scores, "answered": len(answered), "questions": len(samples)}
    return scores, [c.to_dict() for c in chair.captions]


def regcap_table(scores: Mapping) -> str:
    rows = [(k, f"{scores[k] * 100:.1f}") for k in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr") if k in scores]
    rows += [("CHAIRs", _fmt(scores["CHAIRs"])), ("CHAIRi", _fmt(scores["CHAIRi"])),
             ("samples", str(scores["num_samples"]))]
    return "\n".join([f"{k:<10}{v:>8}" for k, v in rows] + _partial(scores))


# ----------------------------------------------------------------------------------- PhD
def load_phd_questions(data: PathLike, modes: Sequence[str] = PHD_MODES, need_images: bool = True
                       ) -> Tuple[List[Question], Dict[str, Tuple[str, str]]]:
    """PhD questions from ``<data>/data.json`` (or the file itself) with images under ``<data>/images/``.

    Returns the questions and ``{qid: (mode, task)}``.
    """
    data = Path(data)
    file = data / "data.json" if data.is_dir() else data
    root = file.parent
    items = load_phd(file, modes)
    questions, meta = [], {}
    for q in items:
        image = str(q.resolve_image(root)) if need_images else str(root / q.image)
        questions.append(Question(qid=q.qid, group=f"{q.mode}/{q.task}", image_id=q.image_id,
                                  image_name=Path(image).name, question=q.question, answer=q.label,
                                  image=image, source=f"{file} {q.qid}"))
        meta[q.qid] = (q.mode, q.task)
    return questions, meta


def score_phd_answers(questions: Sequence[Question], meta: Mapping[str, Tuple[str, str]],
                      answers: Mapping[str, str]) -> dict:
    """PhD scores of the questions that have an answer in ``answers`` (``{qid: text}``); ``answered`` and
    ``questions`` say how many of the loaded questions that is."""
    answered = [q for q in questions if q.qid in answers]
    if not answered:
        raise DataError(f"none of the {len(questions)} PhD questions has an answer")
    scores = score_phd((*meta[q.qid], q.answer, answers[q.qid]) for q in answered)
    return {**scores, "answered": len(answered), "questions": len(questions)}


def phd_table(scores: Mapping) -> str:
    lines = [f"{'group':<22}{'yes-rec':>8}{'no-rec':>8}{'PhD':>8}{'n':>7}"]
    sections = list(scores["groups"].items()) + [(f"{m} (all tasks)", v) for m, v in scores["modes"].items()]
    sections.append(("overall", scores["overall"]))
    for name, s in sections:
        lines.append(f"{name:<22}{_fmt(s['yes_recall']):>8}{_fmt(s['no_recall']):>8}{_fmt(s['phd_index']):>8}"
                     f"{s['questions']:>7}")
    return "\n".join(lines + _partial(scores))
