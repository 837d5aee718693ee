"""PhD: a ChatGPT-prompted visual hallucination evaluation dataset (Liu et al., arXiv 2403.11116).

Data: the released ``data.json`` (a JSON list). COCO-based items have ``image_id`` (COCO id as a
string), ``task``, ``yes_question``, ``no_question``, ``hitem``, ``gt``, ``subject`` and
``context = {"iac": inaccurate context, "icc": incorrect context}``; counter-common-sense items are
marked by ``ccs_description`` and point at ``images/CCS_images/<image_id>.png`` (or carry an
``image_path``). Each item gives two yes/no questions (answer yes / answer no) in each mode:

* ``base``: the question as it is;
* ``iac`` / ``icc``: ``context[mode] + CONTEXT_INSTRUCTION + question``, exactly the concatenation of
  the benchmark's loading code;
* ``ccs``: the question on the counter-common-sense image.

Images, as the benchmark lays them out: ``images/train2014/COCO_train2014_<12-digit id>.jpg``, else
``images/val2014/COCO_val2014_<id>.jpg``, and ``images/CCS_images/<id>.png``.

Score: answers parsed as for POPE (LLaVA's parsing); per group, yes-recall = yes-questions answered
yes / yes-questions and no-recall = no-questions answered no / no-questions; the PhD index is their
harmonic mean. Reported per mode x task, per mode (its tasks pooled) and overall (everything pooled).
"""
from __future__ import annotations

from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from .data import PathLike
from .scoring import parse_pope_answer


PHD_MODES = ("base", "iac", "icc", "ccs")
CONTEXT_INSTRUCTION = (" In case there is an inconsistency between the context and the image content, "
                       "you should follow the image. ")


@dataclass
class PhDQuestion:
    """One yes/no question of one mode. ``qid`` = ``<mode>/<item index in data.json>/<yes|no>``."""

    qid: str
    mode: str
    task: str
    image_id: str
    image: str  # path relative to the data root (COCO items: the train2014 candidate, see resolve_image)
    question: str
    label: str  # "yes" or "no"

    def resolve_image(self, root: PathLike) -> Path:
        """The image file under ``root``; COCO items fall back from train2014 to val2014 as the
        benchmark's loader does. ``FileNotFoundError`` names every path tried."""
        root = Path(root)
        tried = [root / self.image]
        if "/train2014/" in self.image:
            tried.append(root / self.image.replace("train2014", "val2014"))
        for p in tried:
            if p.is_file():
                return p
        raise FileNotFoundError(f"PhD image for {self.qid} not found: tried {', '.join(map(str, tried))}")


def _coco_image(image_id: str) -> str:
    return f"images/train2014/COCO_train2014_{str(image_id).zfill(12)}.jpg"


def phd_questions(data: Sequence[dict], modes: Sequence[str] = PHD_MODES, source: str = "data.json"
                  ) -> List[PhDQuestion]:
    """Expand the released item list into the yes/no questions of ``modes`` (in that order)."""
    bad = [m for m in modes if m not in PHD_MODES]
    if bad:
        raise ValueError(f"unknown PhD mode(s) {bad}; valid: {list(PHD_MODES)}")
    out: List[PhDQuestion] = []
    for mode in modes:
        for index, item in enumerate(data):
            is_ccs = "ccs_description" in item
            if (mode == "ccs") != is_ccs:
                continue
            where = f"{source} item {index}"
            missing = [k for k in ("yes_question", "no_question") if not item.get(k)]
            if missing:
                raise ValueError(f"{where}: lacks {', '.join(missing)}")
            if is_ccs:
                image = item.get("image_path") or f"images/CCS_images/{item['image_id']}.png"
                image_id = str(item.get("image_id", Path(image).stem))
            else:
                if "image_id" not in item:
                    raise ValueError(f"{where}: lacks image_id")
                image_id, image = str(item["image_id"]), _coco_image(item["image_id"])
            prefix = ""
            if mode in ("iac", "icc"):
                context = (item.get("context") or {}).get(mode)
                if not context:
                    raise ValueError(f"{where}: lacks context[{mode!r}] needed by PhD-{mode}")
                prefix = context + CONTEXT_INSTRUCTION
            task = str(item.get("task") or "unspecified")
            for label in ("yes", "no"):
                out.append(PhDQuestion(f"{mode}/{index}/{label}", mode, task, image_id, image,
                                       prefix + item[f"{label}_question"], label))
    return out


def load_phd(path: PathLike, modes: Sequence[str] = PHD_MODES) -> List[PhDQuestion]:
    """Questions of ``modes`` from the released ``data.json`` (``FileNotFoundError`` names a missing file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"PhD data file not found: {path} (the benchmark's data.json)")
    from .data import read_json

    data = read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of items, as released")
    return phd_questions(data, modes, source=str(path))


def phd_index(yes_recall: Optional[float], no_recall: Optional[float]) -> Optional[float]:
    """Harmonic mean of yes- and no-recall (0 when both are 0; None when either is undefined)."""
    if yes_recall is None or no_recall is None:
        return None
    if yes_recall + no_recall == 0:
        return 0.0
    return 2 * yes_recall * no_recall / (yes_recall + no_recall)


def _group_scores(pairs: List[Tuple[str, str]]) -> dict:
    yes = [pred for label, pred in pairs if label == "yes"]
    no = [pred for label, pred in pairs if label == "no"]
    yes_recall = sum(p == "yes" for p in yes) / len(yes) if yes else None
    no_recall = sum(p == "no" for p in no) / len(no) if no else None
    return {
        "questions": len(pairs),
        "yes_questions": len(yes),
        "no_questions": len(no),
        "yes_recall": yes_recall,
        "no_recall": no_recall,
        "phd_index": phd_index(yes_recall, no_recall),
        "yes_ratio": sum(p == "yes" for _, p in pairs) / len(pairs),
    }


def score_phd(records: Iterable[Tuple[str, str, str, str]]) -> dict:
    """Score ``(mode, task, label, prediction_text)`` records.

    Returns ``{"benchmark": "phd", "groups": {"<mode>/<task>": ...}, "modes": {mode: ...},
    "overall": ...}``, each with yes/no recall, PhD index, question counts and yes ratio.
    """
    groups: Dict[Tuple[str, str], List[Tuple[str, str]]] = defaultdict(list)
    for mode, task, label, prediction in records:
        label = str(label).strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(f"PhD label must be yes or no, got {label!r} ({mode}/{task})")
        groups[(mode, task)].append((label, parse_pope_answer(prediction)))
    if not groups:
        raise ValueError("no PhD answers to score")
    order = sorted(groups, key=lambda k: (PHD_MODES.index(k[0]) if k[0] in PHD_MODES else len(PHD_MODES), k))
    by_mode: Dict[str, List[Tuple[str, str]]] = OrderedDict()
    for key in order:
        by_mode.setdefault(key[0], []).extend(groups[key])
    return {
        "benchmark": "phd",
        "groups": OrderedDict((f"{m}/{t}", _group_scores(groups[(m, t)])) for m, t in order),
        "modes": OrderedDict((m, _group_scores(v)) for m, v in by_mode.items()),
        "overall": _group_scores([p for v in groups.values() for p in v]),
    }
