"""Scorers that reproduce the official benchmark tools' numbers.

MME follows the MME authors' ``eval_tool/calculation.py``; POPE follows the parsing of LLaVA's
``llava/eval/eval_pope.py`` (the same rules as POPE's own ``evaluate.py``). Each scorer takes plain
records, so answers produced by any tool can be scored the same way.
"""
from __future__ import annotations

from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Sequence

# Subtask names exactly as the official MME tool spells them, in its order.
MME_PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MME_SUBTASKS = MME_PERCEPTION + MME_COGNITION

POPE_SPLITS = ("random", "popular", "adversarial")


def parse_mme_answer(prediction: str) -> str:
    """The official MME parsing: ``"yes"``, ``"no"`` or ``"other"``.

    Lower-cased, not stripped: the tool reads the prediction as the last field of a text line, so only
    trailing white space (its newline) is there, and that cannot change the result; leading spaces stay
    and count (``"  yes"`` is ``other``, as in the tool). An exact ``yes``/``no`` wins; otherwise the
    first four characters are searched for ``yes``, then ``no``.
    """
    text = prediction.lower().rstrip()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def normalize_gt(answer: str, where: str = "") -> str:
    """A ground-truth label lower-cased; raises ``ValueError`` unless it is yes or no."""
    label = str(answer).strip().lower()
    if label not in ("yes", "no"):
        raise ValueError(f"ground-truth answer must be Yes or No{' (' + where + ')' if where else ''}; got {answer!r}")
    return label


@dataclass
class MMERecord:
    """One answered MME question: its subtask, the image it asks about, ground truth and prediction."""

    subtask: str
    image: str
    answer: str
    prediction: str


def mme_category(subtask: str) -> str:
    """``"perception"``, ``"cognition"`` or ``"other"`` (a subtask outside the official 14)."""
    if subtask in MME_PERCEPTION:
        return "perception"
    if subtask in MME_COGNITION:
        return "cognition"
    return "other"


def score_mme(records: Iterable[MMERecord]) -> Dict:
    """Scores as the official tool computes them.

    Per subtask: ``acc`` = correct questions / questions ("other" counts as wrong), ``acc_plus`` =
    images whose questions are all correct / images, ``score = acc*100 + acc_plus*100``; ``perception``
    and ``cognition`` are the sums of their subtasks' scores (over the subtasks present). The official
    tool pairs consecutive lines (two per image); here questions are grouped by image, which is the same
    on MME's data; ``images_not_paired`` counts images that do not have exactly two questions.
    """
    by_subtask: Dict[str, Dict[str, List[bool]]] = defaultdict(lambda: defaultdict(list))
    others: Dict[str, int] = defaultdict(int)
    for r in records:
        pred = parse_mme_answer(r.prediction)
        gt = normalize_gt(r.answer, f"{r.subtask}/{r.image}")
        by_subtask[r.subtask][r.image].append(pred == gt)
        others[r.subtask] += pred == "other"
    order = [s for s in MME_SUBTASKS if s in by_subtask] + sorted(s for s in by_subtask if s not in MME_SUBTASKS)
    subtasks = OrderedDict()
    for name in order:
        images = by_subtask[name]
        results = [ok for per_image in images.values() for ok in per_image]
        acc = sum(results) / len(results)
        acc_plus = sum(all(v) for v in images.values()) / len(images)
        subtasks[name] = {
            "category": mme_category(name),
            "questions": len(results),
            "images": len(images),
            "acc": acc,
            "acc_plus": acc_plus,
            "score": acc * 100 + acc_plus * 100,
            "other_answers": others[name],
            "images_not_paired": sum(len(v) != 2 for v in images.values()),
        }
    totals = {
        cat: sum(s["score"] for s in subtasks.values() if s["category"] == cat) for cat in ("perception", "cognition")
    }
    return {"benchmark": "mme", "subtasks": subtasks, **totals}


def parse_pope_answer(prediction: str) -> str:
    """LLaVA's POPE parsing (case-sensitive, as published): keep the text before the first ``.``,
    drop commas, split on single spaces; ``"no"`` when a word is exactly ``No``, ``not`` or ``no``,
    else ``"yes"`` (so ``"NO"`` or ``"Not"`` count as yes, and an empty answer as yes)."""
    text = prediction
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


@dataclass
class POPERecord:
    """One answered POPE question: its split (random/popular/adversarial), label and prediction."""

    split: str
    answer: str
    prediction: str


def pope_metrics(labels: Sequence[str], predictions: Sequence[str]) -> Dict[str, float]:
    """Accuracy, precision, recall, F1 and yes-ratio with ``yes`` as the positive class.

    ``labels``: ground truth (anything but ``"no"`` is positive, as in the published code);
    ``predictions``: raw model answers, parsed with :func:`parse_pope_answer`. Where the published code
    would divide by zero (no predicted or no true positive), the value is 0.0.
    """
    if len(labels) != len(predictions) or not labels:
        raise ValueError(f"need as many labels as predictions, at least one; got {len(labels)} and {len(predictions)}")
    gold = [label != "no" for label in labels]
    pred = [parse_pope_answer(p) == "yes" for p in predictions]
    tp = sum(g and p for g, p in zip(gold, pred))
    fp = sum(p and not g for g, p in zip(gold, pred))
    tn = sum(not g and not p for g, p in zip(gold, pred))
    fn = sum(g and not p for g, p in zip(gold, pred))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "questions": len(gold),
        "TP": tp, "FP": fp, "TN": tn, "FN": fn,
        "accuracy": (tp + tn) / len(gold),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(pred) / len(pred),
    }


def score_pope(records: Iterable[POPERecord]) -> Dict:
    """POPE metrics per split (official split order first), plus their mean F1 and accuracy."""
    grouped: Dict[str, List[POPERecord]] = defaultdict(list)
    for r in records:
        grouped[r.split].append(r)
    order = [s for s in POPE_SPLITS if s in grouped] + sorted(s for s in grouped if s not in POPE_SPLITS)
    splits = OrderedDict(
        (s, pope_metrics([r.answer for r in grouped[s]], [r.prediction for r in grouped[s]]))
        for s in order
    )
    mean = {
        f"mean_{k}": (sum(m[k] for m in splits.values()) / len(splits) if splits else 0.0) for k in ("accuracy", "f1")
    }
    return {"benchmark": "pope", "splits": splits, **mean}


def mme_tool_lines(rows: Sequence[Mapping[str, str]]) -> List[str]:
    """Lines of the official tool's ``<subtask>.txt``: ``image\\tquestion\\tgt\\tprediction``.

    Tabs and line breaks inside a field would break the tool's line format, so they become spaces (and
    a prediction loses trailing white space, which the tool's parsing ignores anyway).
    """
    def field(text) -> str:
        return " ".join(str(text).replace("\t", " ").splitlines())

    return ["\t".join([field(row["image"]), field(row["question"]), field(row["answer"]),
                       field(row["prediction"]).rstrip()]) for row in rows]
