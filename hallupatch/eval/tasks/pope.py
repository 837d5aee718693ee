"""POPE (Li et al. 2023): "Is there a <object> in the image?" on COCO images, random / popular /
adversarial splits, scored with the parsing of LLaVA's ``llava/eval/eval_pope.py`` (POPE's own rules).

Answers made elsewhere (``--answers``) need no images. LLaVA's own layout works as it is: the data
folder holds the label files ``coco_pope_<split>.json`` and LLaVA's question file
``llava_pope_test.jsonl`` (global ``question_id``, ``image``, ``text``, ``category`` = the split), and its
answers JSONL names those global ids; each answer is matched to its label by (split, image, question
text), never by position (``eval_pope.py`` zips them in file order, which is the same on LLaVA's files).
"""
from __future__ import annotations

import json
from pathlib import Path
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple, Union

from hallupatch.eval.data import (
    DataError, Question, add_answer, answer_text, json_lines, match_llava_answers, normalized_prompt, yes_no_label,
)
from hallupatch.eval.scoring import POPE_SPLITS, POPERecord, parse_pope_answer, score_pope
from hallupatch.eval.tasks import Task, answered_questions, partial_note, register_task, with_counts

POPE_KEYS = ("question_id", "image", "text", "label")
LLAVA_QUESTION_FILE = "llava_pope_test.jsonl"   # LLaVA's POPE question file (global ids, split as category)
LLAVA_QUESTION_KEYS = ("question_id", "image", "text", "category")


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
    data: Union[str, Path], image_folder: Optional[Union[str, Path]] = None, splits: Optional[Sequence[str]] = None,
    need_images: bool = True,
) -> List[Question]:
    """POPE questions from the split files (JSON lines: ``question_id, image, text, label``) and the
    folder of COCO images they name (``--image-folder``; default ``<data>/images`` or ``<data>/val2014``).

    ``need_images=False`` (scoring answers made elsewhere): no image folder is needed or checked.
    """
    files = pope_question_files(data, splits)
    base = Path(data) if Path(data).is_dir() else Path(data).parent
    if image_folder is None:
        image_folder = next((base / n for n in ("images", "val2014") if (base / n).is_dir()), None)
        if image_folder is None and need_images:
            raise DataError(f"POPE needs the COCO val2014 images: pass --image-folder DIR (no {base}/images or {base}/val2014)")
    if need_images and not Path(image_folder).is_dir():
        raise DataError(f"POPE image folder not found: {image_folder}")
    questions = []
    for split, file in files.items():
        for where, row in json_lines(file):
            if any(k not in row for k in POPE_KEYS):
                raise DataError(f"{where}: a POPE question needs keys {list(POPE_KEYS)}; got {json.dumps(row)[:120]!r}")
            image = Path(image_folder or base) / str(row["image"])
            if need_images and not image.is_file():
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


def read_llava_pope_questions(path: Union[str, Path]) -> Dict[str, Tuple[str, str, str]]:
    """LLaVA's ``llava_pope_test.jsonl``: ``{question_id: (split, image, question text)}``."""
    questions: Dict[str, Tuple[str, str, str]] = {}
    for where, row in json_lines(path):
        if any(k not in row for k in LLAVA_QUESTION_KEYS):
            raise DataError(f"{where}: a line of LLaVA's POPE question file needs keys {list(LLAVA_QUESTION_KEYS)}; "
                            f"got {json.dumps(row)[:120]!r}")
        qid = str(row["question_id"])
        if qid in questions:
            raise DataError(f"{where}: question_id {qid} appears twice")
        questions[qid] = (str(row["category"]), str(row["image"]), str(row["text"]))
    return questions


def match_llava_pope_answers(path: Union[str, Path], questions: Sequence[Question],
                             llava_questions: Dict[str, Tuple[str, str, str]], question_file: str = LLAVA_QUESTION_FILE
                             ) -> Dict[str, str]:
    """``{question id: text}`` for an answers JSONL whose ids are LLaVA's global POPE ids (or ours).

    Each answer's id is looked up in LLaVA's question file, then matched to the loaded label with the
    same (split, image, question text), the question text compared without LLaVA's answer-style suffix.
    """
    by_key: Dict[Tuple[str, str, str], List[Question]] = defaultdict(list)
    for q in questions:
        by_key[(q.group, q.image_name, normalized_prompt(q.question))].append(q)
    own = {q.qid for q in questions}
    texts: Dict[str, str] = {}
    for where, row in json_lines(path):
        if "question_id" not in row or "text" not in row:
            raise DataError(f"{where}: an answer line needs 'question_id' and 'text'")
        qid, text = str(row["question_id"]), answer_text(row["text"], where)
        if qid in own:   # this tool's own answers.jsonl
            add_answer(texts, qid, text, where)
            continue
        if qid not in llava_questions:
            raise DataError(f"{where}: question_id {qid} is not in {question_file}")
        split, image, question = llava_questions[qid]
        if "prompt" in row and normalized_prompt(str(row["prompt"])) != normalized_prompt(question):
            raise DataError(f"{where}: the answer's prompt {str(row['prompt'])[:80]!r} is not question {qid}'s "
                            f"text {question[:80]!r} in {question_file}")
        candidates = [q for q in by_key.get((split, image, normalized_prompt(question)), []) if q.qid not in texts]
        if not candidates:
            loaded = sorted({q.group for q in questions})
            raise DataError(f"{where}: question {qid} (split {split!r}, image {image}, {question[:60]!r}) matches no "
                            f"unanswered question of the loaded POPE labels (splits {loaded})")
        texts[candidates[0].qid] = text
    return texts


@register_task
class POPE(Task):
    name = "pope"
    title = "POPE"
    summary = "POPE object existence (yes/no) per split, scored as LLaVA's eval_pope.py"
    data_help = ("a folder with coco_pope_{random,popular,adversarial}.json (JSON lines: question_id, image, "
                 "text, label) and --image-folder with the COCO val2014 images; with --answers no images, and "
                 f"LLaVA's {LLAVA_QUESTION_FILE} in the folder (or --question-file) maps LLaVA's global ids")
    # on screen: overall accuracy (what McNemar tests), the easy split, and the split where a language
    # prior shows (adversarial: co-occurring absent objects) with its yes-ratio
    screen_columns = {"mean accuracy": "accuracy", "random F1": "random F1", "adversarial F1": "advers. F1",
                      "adversarial yes-ratio": "advers. yes%"}
    lab_options = ()
    lab_data = f"POPE ({', '.join(POPE_SPLITS)})"
    lab_traces = True
    lab_question_files = True

    @classmethod
    def add_arguments(cls, group):
        group.add_argument("--image-folder", help="the COCO val2014 images (default: DATA/images or DATA/val2014)")
        group.add_argument("--splits", nargs="+", choices=list(POPE_SPLITS), help="splits (default: all found)")
        group.add_argument("--question-file", help=f"with --answers: LLaVA's POPE question file (default: DATA/"
                           f"{LLAVA_QUESTION_FILE} when present), whose global ids the answers use")

    def settings(self):
        folder = self.args.image_folder
        return {"image_folder": str(Path(folder).resolve()) if folder else None, "splits": self.args.splits}

    def embedded_data(self, work_dir: Path, split: str = "test"):
        from hallupatch.lab import writers

        return writers.write_pope(writers.data_folder(work_dir, "pope", split), split=split), f"embedded:lab-pope-{split}"

    def load(self, data, recipe, out_dir, answers):
        if getattr(self.args, "question_file", None) and answers is None:
            raise ValueError("--question-file maps the ids of an answers file made elsewhere: use it with --answers")
        self.data = Path(data)
        return load_pope(data, self.args.image_folder, self.args.splits, need_images=answers is None)

    def _llava_question_file(self) -> Optional[Path]:
        given = getattr(self.args, "question_file", None)
        if given:
            if not Path(given).is_file():
                raise DataError(f"--question-file not found: {given}")
            return Path(given)
        default = (self.data if self.data.is_dir() else self.data.parent) / LLAVA_QUESTION_FILE
        return default if default.is_file() else None

    def read_answers(self, path, questions):
        question_file = self._llava_question_file()
        if question_file is None:
            return match_llava_answers(path, questions)
        return match_llava_pope_answers(path, questions, read_llava_pope_questions(question_file), str(question_file))

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

    def lab_panel(self, ax, comparison, folders):
        """Accuracy per split and setting, with 95% Wilson intervals, from each setting's answers."""
        from hallupatch.eval.stats import wilson_interval
        from hallupatch.eval.store import read_answers

        labels = list(comparison["methods"])
        answers = {label: read_answers(Path(folders[label]) / "answers.jsonl") for label in labels}
        width = 0.8 / len(POPE_SPLITS)
        for k, split in enumerate(POPE_SPLITS):
            values, errors = [], [[], []]
            for label in labels:
                rows = [r for r in answers[label] if r["group"] == split]
                right = sum(parse_pope_answer(r["text"]) == r["answer"] for r in rows)
                low, high = wilson_interval(right, len(rows))
                acc = right / len(rows) if rows else float("nan")
                values.append(100 * acc)
                errors[0].append(100 * (acc - low))
                errors[1].append(100 * (high - acc))
            ax.bar([i + k * width for i in range(len(labels))], values, width, yerr=errors, capsize=2, label=split)
        ax.set_xticks([i + width for i in range(len(labels))], labels, rotation=35, ha="right", fontsize=8)
        ax.set_ylim(0, 118)   # room for the legend above the bars
        ax.set_ylabel("POPE accuracy (%), 95% Wilson interval")
        ax.set_title("POPE on the lab (test split)")
        ax.legend(fontsize=8, loc="upper center", ncol=len(POPE_SPLITS))
