"""Region captions (RefCOCOg): describe one box of an image; METEOR / CIDEr / BLEU-4 / ROUGE-L through
``pycocoevalcap`` and CHAIR against the region's reference objects.

Data: a JSON/JSONL file of region records (``id, image, bbox [x,y,w,h], references [...]``) or the
RefCOCOg folder (``refs(umd).p``, ``instances.json``). ``--rank-with`` captions once per candidate layer
of layer contrast and keeps the caption a dual-task scorer ranks best (cycle consistency).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Tuple, Union

from hallupatch.eval.chair import ChairWords, caption_stats, chair_from_stats, score_captions
from hallupatch.eval.data import DataError, PathLike, Question
from hallupatch.eval.ranking import RankingBackend, load_scorer, scored_candidates
from hallupatch.eval.regcap import (
    RegionSample, load_refcocog, load_region_samples, region_ground_truth, region_prompt, score_region_captions,
)
from hallupatch.eval.store import write_json
from hallupatch.eval.tasks import Task, fmt_percent, register_task, two_column_table, with_counts

REGCAP_MAX_NEW_TOKENS = 64  # a short region description
SCORED_CANDIDATES_FILE = "scored_candidates.json"


@dataclass
class RegcapData:
    samples: List[RegionSample]
    questions: List[Question]


def load_regcap(data: PathLike, recipe: Optional[str], image_folder: Optional[PathLike] = None,
                split: str = "val", need_images: bool = True) -> RegcapData:
    """Region samples and their recipe-specific questions.

    ``data``: a JSON/JSONL file of region records (see :func:`load_region_samples`), or the official
    RefCOCOg folder holding ``refs(umd).p`` and ``instances.json``. Images are looked up in
    ``image_folder`` (default: ``images/`` next to the data). ``recipe`` selects the region prompt
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
            prompt = region_prompt(recipe, s.bbox, width, height)
        questions.append(Question(qid=s.sample_id, group="regcap", image_id=s.sample_id,
                                  image_name=Path(s.image).name, question=prompt,
                                  answer=" | ".join(s.references), image=str(path), source=str(path)))
    return RegcapData(samples, questions)


def score_regcap(samples: Sequence[RegionSample], predictions: Mapping[str, str]) -> Tuple[dict, List[dict]]:
    """Region-caption scores of the samples that have a prediction (``answered`` of ``questions``)."""
    answered = [s for s in samples if s.sample_id in predictions]
    if not answered:
        raise DataError(f"none of the {len(samples)} region samples has an answer")
    scores, chair = score_region_captions(answered, predictions)
    scores = with_counts({"benchmark": "regcap", **scores}, answered, samples)
    return scores, [c.to_dict() for c in chair.captions]


def regcap_table(scores: Mapping) -> str:
    rows = [(k, f"{scores[k] * 100:.1f}") for k in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr") if k in scores]
    rows += [("CHAIRs", fmt_percent(scores["CHAIRs"])), ("CHAIRi", fmt_percent(scores["CHAIRi"])),
             ("samples", str(scores["num_samples"]))]
    return two_column_table(rows, scores)


@register_task
class RegionCaptions(Task):
    name = "regcap"
    title = "Region captions"
    summary = "region captions (RefCOCOg): METEOR, CIDEr and CHAIR"
    data_help = ("records id, image, bbox [x,y,w,h], references [..] (JSON/JSONL) with --image-folder; or "
                 "the RefCOCOg folder (refs(umd).p, instances.json)")
    free_text = True
    max_new_tokens = REGCAP_MAX_NEW_TOKENS
    paired_test = "bootstrap"
    details_file = "regcap_captions.json"

    @classmethod
    def add_arguments(cls, group):
        group.add_argument("--image-folder", help="the images of the regions (default: images/ next to the data)")
        group.add_argument("--refcocog-split", default="val", help="with the RefCOCOg folder: split (default val)")
        group.add_argument("--rank-with", metavar="MODULE:FUNCTION",
                           help="with --method dola: caption once per candidate layer and keep the caption this "
                           "scorer ranks best (scorer(sample, caption) -> score or (score, confidence); sample: the "
                           "region record with its image path); writes scored_candidates.json for "
                           "python -m hallupatch.prior")

    def settings(self):
        folder = self.args.image_folder
        return {"image_folder": str(Path(folder).resolve()) if folder else None,
                "refcocog_split": self.args.refcocog_split, "rank_with": self.args.rank_with}

    def load(self, data, recipe, out_dir, answers):
        self.data = load_regcap(data, recipe, self.args.image_folder, self.args.refcocog_split,
                                need_images=answers is None)
        return self.data.questions

    def answering(self, backend):
        if not self.args.rank_with:
            return backend
        by_id = {s.sample_id: s for s in self.data.samples}

        def scorer_sample(q):
            return {**dataclasses.asdict(by_id[q.qid]), "image_path": q.image}

        return RankingBackend(backend, load_scorer(self.args.rank_with), scorer_sample)

    def _answered(self, questions, texts):
        asked = {q.qid for q in questions}
        return [s for s in self.data.samples if s.sample_id in asked]

    def score(self, questions, texts):
        return score_regcap(self._answered(questions, texts), texts)

    def table(self, scores):
        return regcap_table(scores)

    def headline(self, scores):
        heads = {k: scores[k] * 100 for k in ("METEOR", "CIDEr") if k in scores}
        heads.update({k: float("nan") if scores[k] is None else scores[k] * 100 for k in ("CHAIRs", "CHAIRi")})
        return heads

    def item_stats(self, questions, texts):
        samples = [s for s in self._answered(questions, texts) if s.sample_id in texts]
        words = ChairWords()
        result = score_captions([(s.sample_id, texts[s.sample_id]) for s in samples],
                                region_ground_truth(samples, words), words)
        return {str(c.image_id): caption_stats(c) for c in result.captions}

    def metrics_from_stats(self, sums, count):
        metrics = chair_from_stats(sums, count)
        return {"CHAIRs": metrics["CHAIRs"], "CHAIRi": metrics["CHAIRi"]}

    def write_files(self, out_dir, questions, records):
        if not self.args.rank_with:
            return []
        path = Path(out_dir) / SCORED_CANDIDATES_FILE
        write_json(path, scored_candidates(records))
        return [path]
