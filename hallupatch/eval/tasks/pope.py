"""POPE (Li et al. 2023): "Is there a <object> in the image?" on COCO images, random / popular /
adversarial splits, scored with the parsing of LLaVA's ``llava/eval/eval_pope.py`` (POPE's own rules).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from hallupatch.eval.data import DataError, Question, json_lines, match_llava_answers, yes_no_label
from hallupatch.eval.scoring import POPE_SPLITS, POPERecord, parse_pope_answer, score_pope
from hallupatch.eval.tasks import Task, answered_questions, partial_note, register_task, with_counts

POPE_KEYS = ("question_id", "image", "text", "label")


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
                    answer=yes_no_label(row["label"], where, json.dumps(row)[:120]).lower(),
                    image=str(image),
                    source=where,
                )
            )
    return questions


@register_task
class POPE(Task):
    name = "pope"
    title = "POPE"
    summary = "POPE object existence (yes/no) per split, scored as LLaVA's eval_pope.py"
    data_help = ("a folder with coco_pope_{random,popular,adversarial}.json (JSON lines: question_id, image, "
                 "text, label) and --image-folder with the COCO val2014 images")

    @classmethod
    def add_arguments(cls, group):
        group.add_argument("--image-folder", help="the COCO val2014 images (default: DATA/images or DATA/val2014)")
        group.add_argument("--splits", nargs="+", choices=list(POPE_SPLITS), help="splits (default: all found)")

    def settings(self):
        folder = self.args.image_folder
        return {"image_folder": str(Path(folder).resolve()) if folder else None, "splits": self.args.splits}

    def load(self, data, recipe, out_dir, answers):
        return load_pope(data, self.args.image_folder, self.args.splits)

    def read_answers(self, path, questions):
        return match_llava_answers(path, questions)

    def score(self, questions, texts):
        answered = answered_questions(questions, texts)
        scores = score_pope(POPERecord(q.group, q.answer, texts[q.qid]) for q in answered)
        return with_counts(scores, answered, questions), None

    def table(self, scores):
        out = [f"{'split':<14}{'accuracy':>10}{'precision':>11}{'recall':>9}{'F1':>8}{'yes-ratio':>11}"]
        for name, s in scores["splits"].items():
            out.append(
                f"{name:<14}{s['accuracy'] * 100:>10.2f}{s['precision'] * 100:>11.2f}{s['recall'] * 100:>9.2f}"
                f"{s['f1'] * 100:>8.2f}{s['yes_ratio'] * 100:>11.2f}"
            )
        out.append("-" * 63)
        out.append(f"{'mean':<14}{scores['mean_accuracy'] * 100:>10.2f}{'':>20}{scores['mean_f1'] * 100:>8.2f}")
        return "\n".join(out + partial_note(scores))

    def headline(self, scores):
        heads = {"mean accuracy": scores["mean_accuracy"] * 100, "mean F1": scores["mean_f1"] * 100}
        for split, s in scores["splits"].items():
            heads[f"{split} F1"] = s["f1"] * 100
            heads[f"{split} yes-ratio"] = s["yes_ratio"] * 100
        return heads

    def item_correct(self, question, text):
        return parse_pope_answer(text) == question.answer
