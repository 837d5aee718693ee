"""CHAIR (Rohrbach et al. 2018): object hallucination in image captions, with OPERA's / MemVR's protocol
(500 seeded val2014 images, "Please describe this image in detail.").

Data: a COCO folder with ``annotations/{instances,captions}_<split>.json`` and ``<split>/*.jpg``.
``--answers``: a JSON list or JSONL of ``{"image_id", "caption"}`` (OPERA / MemVR output).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from hallupatch.eval.chair import (
    ChairWords, caption_stats, chair_from_stats, coco_ground_truth, find_coco_annotations, sample_image_ids,
    score_captions,
)
from hallupatch.eval.data import DataError, PathLike, Question, add_answer, answer_records, answer_text, read_json
from hallupatch.eval.store import write_json
from hallupatch.eval.tasks import Task, fmt_percent, register_task, two_column_table, with_counts

CHAIR_PROMPT = "Please describe this image in detail."
# OPERA's chair_eval.py generates with max_new_tokens=512; MemVR's released CHAIR scripts pass 1024.
CHAIR_MAX_NEW_TOKENS = 512
CHAIR_NUM_IMAGES = 500  # OPERA and MemVR caption 500 random val2014 images
LAB_NUM_IMAGES = 100    # lab images captioned per setting by the lab suite (python -m hallupatch.eval lab)
IMAGE_IDS_FILE = "chair_image_ids.json"


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
               need_images: bool = True, words: Optional[ChairWords] = None) -> ChairData:
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
    gt = coco_ground_truth(inst_files, cap_files, words=words, image_ids=image_ids)
    return ChairData(questions, gt, list(image_ids))


def read_chair_answers(path: PathLike) -> List[Tuple[int, str]]:
    """``(image_id, caption)`` pairs from a JSON list or JSONL file of ``{"image_id", "caption"}``
    records (OPERA / MemVR output; ``text`` is accepted for ``caption``)."""
    path = Path(path)
    rows = answer_records(path)
    captions: Dict[int, str] = {}
    for i, row in enumerate(rows, 1):
        key = "caption" if "caption" in row else "text" if "text" in row else None
        if "image_id" not in row or key is None:
            raise DataError(f"{path}: record {i} needs image_id and caption; got keys {sorted(row)}")
        where = f"{path}: record {i}"
        try:
            image_id = int(row["image_id"])
        except (TypeError, ValueError):
            raise DataError(f"{where}: image_id must be an integer (a COCO image id); got {row['image_id']!r}") from None
        add_answer(captions, image_id, answer_text(row[key], where, key), where)
    return list(captions.items())


def score_chair_pairs(pairs: Sequence[Tuple[int, str]], ground_truth: Mapping[int, set],
                      words: Optional[ChairWords] = None) -> Tuple[dict, List[dict]]:
    """``(scores, per-caption details)`` for ``(image_id, caption)`` pairs (``words``: default COCO's)."""
    result = score_captions(pairs, ground_truth, words or ChairWords())
    return {"benchmark": "chair", **result.metrics()}, [c.to_dict() for c in result.captions]


def chair_table(scores: Mapping) -> str:
    rows = [("CHAIRs", fmt_percent(scores["CHAIRs"])), ("CHAIRi", fmt_percent(scores["CHAIRi"])),
            ("Recall", fmt_percent(scores["Recall"])), ("avg_len", f"{scores['avg_len']:.1f}"),
            ("captions", str(scores["num_captions"]))]
    return two_column_table(rows, scores)


@register_task
class CHAIR(Task):
    name = "chair"
    title = "CHAIR"
    summary = "CHAIR object hallucination in image captions (COCO)"
    data_help = ("COCO/annotations/{instances,captions}_val2014.json and COCO/val2014/*.jpg; --answers: JSONL "
                 "of image_id, caption")
    free_text = True
    max_new_tokens = CHAIR_MAX_NEW_TOKENS
    paired_test = "bootstrap"
    details_file = "chair_captions.json"
    lab_options = ("--num-images", str(LAB_NUM_IMAGES))
    lab_data = "CHAIR captions"

    @classmethod
    def add_arguments(cls, group):
        group.add_argument("--num-images", type=int, default=CHAIR_NUM_IMAGES,
                           help=f"images drawn from the annotations (default {CHAIR_NUM_IMAGES}; 0 = all)")
        group.add_argument("--annotations", help="COCO annotations folder (default DATA/annotations)")
        group.add_argument("--objects", help="the object vocabulary: a file of 'object, synonym, synonym...' lines "
                           "(first entry = the object's name), as the shipped COCO table (the default)")

    @property
    def sample_seed(self) -> int:
        """The run's ``--seed`` also draws the image sample (0 when unset)."""
        return self.args.seed if self.args.seed is not None else 0

    def settings(self):
        args = self.args
        return {"num_images": args.num_images, "seed": self.sample_seed, "prompt": CHAIR_PROMPT,
                "annotations": str(Path(args.annotations).resolve()) if args.annotations else None,
                "objects": str(Path(args.objects).resolve()) if args.objects else None}

    def embedded_data(self, work_dir: Path, split: str = "test"):
        """The lab's COCO-format scenes; their object vocabulary comes with them (unless --objects is given)."""
        from hallupatch.lab import writers

        root = writers.write_coco(writers.data_folder(work_dir, "coco", split), split=split)
        if self.args.objects is None:
            self.args.objects = str(root / writers.CHAIR_VOCABULARY_FILE)
        return root, f"embedded:lab-coco-{split}"

    def load(self, data, recipe, out_dir, answers):
        args = self.args
        if args.num_images is not None and args.num_images < 0:
            raise ValueError(f"--num-images must be >= 0 (0 = all); got {args.num_images}")
        self.pairs = read_chair_answers(answers) if answers else None
        saved = Path(out_dir) / IMAGE_IDS_FILE
        if self.pairs:
            ids = sorted({i for i, _ in self.pairs})
        elif saved.exists() and not args.overwrite:  # a resumed run captions the images it sampled before
            ids = [int(i) for i in json.loads(saved.read_text(encoding="utf-8"))]
        else:
            ids = None
        self.words = ChairWords.from_file(args.objects)
        self.data = load_chair(data, num_images=args.num_images or None, seed=self.sample_seed, image_ids=ids,
                               annotations=args.annotations, need_images=answers is None, words=self.words)
        return self.data.questions

    def prepare_output(self, out_dir):
        """Save the image sample, so that a resumed run captions the same images."""
        if self.pairs is None and (self.args.overwrite or not (Path(out_dir) / IMAGE_IDS_FILE).exists()):
            write_json(Path(out_dir) / IMAGE_IDS_FILE, self.data.image_ids)

    def read_answers(self, path, questions):
        return {}  # the (image_id, caption) pairs were read by load() and are scored as they are

    def _pairs(self, questions, texts):
        return self.pairs or [(int(q.image_id), texts[q.qid]) for q in questions if q.qid in texts]

    def score(self, questions, texts):
        chosen = self._pairs(questions, texts)
        scores, details = score_chair_pairs(chosen, self.data.ground_truth, self.words)
        return with_counts(scores, chosen, self.pairs or questions), details

    def table(self, scores):
        return chair_table(scores)

    def headline(self, scores):
        return {k: (float("nan") if scores[k] is None else scores[k] * 100) for k in ("CHAIRs", "CHAIRi", "Recall")}

    def item_stats(self, questions, texts):
        result = score_captions(self._pairs(questions, texts), self.data.ground_truth, self.words)
        return {str(c.image_id): caption_stats(c) for c in result.captions}

    def metrics_from_stats(self, sums, count):
        return chair_from_stats(sums, count)

    def lab_panel(self, ax, comparison, folders):
        """CHAIRs and CHAIRi of each setting minus the baseline's, with the 95% paired bootstrap interval."""
        baseline = comparison["baseline"]
        others = [label for label in comparison["methods"] if label != baseline]
        metrics = ("CHAIRs", "CHAIRi")
        for k, metric in enumerate(metrics):
            changes, errors = [], [[], []]
            for label in others:
                entry = comparison["methods"][label]
                change = entry["difference"][metric]
                low, high = entry["test"][metric]["ci95"] if metric in entry.get("test", {}) else (change, change)
                changes.append(change)
                errors[0].append(0.0 if math.isnan(low) else max(0.0, change - low))
                errors[1].append(0.0 if math.isnan(high) else max(0.0, high - change))
            ax.bar([i + k * 0.4 for i in range(len(others))], changes, 0.4, yerr=errors, capsize=2, label=metric)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks([i + 0.2 for i in range(len(others))], others, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(f"change against {baseline} (points)")
        ax.set_title(f"CHAIR on the lab captions: method minus {baseline},\n95% paired bootstrap interval "
                     "(lower is fewer hallucinated objects)", fontsize=10)
        ax.legend(fontsize=8)
