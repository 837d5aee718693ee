"""Region captioning (RefCOCOg style): data, per-recipe region prompts, and scoring.

Scores, as the COCO caption evaluation toolkit computes them (``pycocoevalcap``): both references and
predictions go through its PTB tokenizer, then BLEU-4, METEOR (1.5 jar), ROUGE-L and CIDEr (CIDEr-D as
the toolkit implements it, document frequencies from the evaluated references). SPICE is left out: its
jar downloads Stanford CoreNLP models at first use, which cannot be done offline. The tokenizer and
METEOR run on Java, so a Java runtime must be installed (Debian: ``apt-get install default-jre-headless``).

Hallucination: CHAIRs / CHAIRi of each predicted description against the objects that the CHAIR word
pipeline finds in that region's reference expressions (plus the region's COCO category when the data
gives one).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Hashable, List, Mapping, Optional, Sequence, Tuple, Union

from .data import PathLike, read_json
from .chair import ChairResult, ChairWords, score_captions


CAPTION_METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
JAVA_HINT = ("pycocoevalcap's PTB tokenizer and METEOR need a Java runtime and none was found on PATH; "
             "install one (Debian/Ubuntu: apt-get install default-jre-headless)")


# ----------------------------------------------------------------------------------- data
@dataclass
class RegionSample:
    """One region to describe: an image, a COCO ``[x, y, w, h]`` pixel box, reference expressions."""

    sample_id: str
    image: str  # file name under the image folder (or an absolute path)
    bbox: Tuple[float, float, float, float]
    references: List[str]
    image_id: Optional[int] = None
    category: Optional[str] = None
    extra: dict = field(default_factory=dict)


def load_region_samples(path: PathLike) -> List[RegionSample]:
    """Read region samples from a JSON list or JSONL file.

    Each record: ``id`` (unique), ``image`` (file name), ``bbox`` ``[x, y, w, h]`` in pixels,
    ``references`` (list of expressions; ``sentences`` or a single ``caption`` also accepted), and
    optionally ``image_id`` and ``category`` (a COCO category name).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"region caption data file not found: {path}")
    from .data import DataError, json_lines, read_json

    if path.suffix == ".jsonl":
        records = list(json_lines(path))
    else:
        listed = read_json(path)
        if not isinstance(listed, list):
            raise DataError(f"{path}: expected a JSON list of region records (or a .jsonl file)")
        records = [(f"{path}: record {i}", rec) for i, rec in enumerate(listed)]
    samples = []
    seen = set()
    for i, (where, rec) in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object; got {rec!r:.80}")
        refs = rec.get("references", rec.get("sentences", rec.get("caption")))
        if isinstance(refs, str):
            refs = [refs]
        missing = [k for k, v in (("image", rec.get("image")), ("bbox", rec.get("bbox")), ("references", refs))
                   if not v]
        if missing:
            raise DataError(f"{where}: the region record lacks {', '.join(missing)}")
        sid = str(rec.get("id", i))
        if sid in seen:
            raise DataError(f"{where}: duplicate id {sid!r}")
        seen.add(sid)
        try:
            x, y, w, h = (float(v) for v in rec["bbox"])
        except (TypeError, ValueError):
            raise DataError(f"{where}: bbox must be [x, y, w, h] numbers in pixels; got {rec['bbox']!r}") from None
        samples.append(RegionSample(sid, rec["image"], (x, y, w, h), [str(r) for r in refs],
                                    rec.get("image_id"), rec.get("category")))
    return samples


def load_refcocog(refs_path: PathLike, instances_path: PathLike, split: str = "val") -> List[RegionSample]:
    """Region samples from the official RefCOCOg release (``refs(umd).p`` + its ``instances.json``).

    One sample per referred object of ``split``: its annotation box, its image's file name, all its
    expressions as references, and its category. ``refs(umd).p`` is a pickle: load only the
    released file (pickles can run code).
    """
    refs_path, instances_path = Path(refs_path), Path(instances_path)
    for p in (refs_path, instances_path):
        if not p.is_file():
            raise FileNotFoundError(f"RefCOCOg file not found: {p}")
    with open(refs_path, "rb") as f:
        refs = pickle.load(f)
    inst = read_json(instances_path)
    anns = {a["id"]: a for a in inst["annotations"]}
    images = {im["id"]: im for im in inst["images"]}
    cats = {c["id"]: c["name"] for c in inst["categories"]}
    samples = []
    for ref in refs:
        if ref.get("split") != split:
            continue
        ann = anns[ref["ann_id"]]
        image = images[ref["image_id"]]
        samples.append(RegionSample(
            sample_id=str(ref["ref_id"]), image=image["file_name"], bbox=tuple(float(v) for v in ann["bbox"]),
            references=[s["sent"] for s in ref["sentences"]], image_id=int(ref["image_id"]),
            category=cats.get(ref.get("category_id", ann["category_id"]))))
    if not samples:
        raise ValueError(f"no RefCOCOg refs with split {split!r} in {refs_path}")
    return samples


def load_paper_references(path: PathLike) -> Dict[str, str]:
    """The region-caption paper's references: ``{region id: its one ground-truth caption}`` from a
    ``captions_refcocog_gt.json``-style file (``{"images": [...], "annotations": [{"image_id", "caption"}]}``,
    ``image_id`` = the region's id)."""
    from .data import DataError, read_json

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"references file not found: {path}")
    data = read_json(path)
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list):
        raise DataError(f"{path}: expected {{'annotations': [{{'image_id', 'caption'}}, ...]}} "
                        "(the layout of the paper's captions_refcocog_gt.json)")
    references: Dict[str, str] = {}
    for index, ann in enumerate(annotations):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise DataError(f"{path}: annotation {index} needs 'image_id' and a 'caption' string")
        key = str(ann["image_id"])
        if key in references:
            raise DataError(f"{path}: region {key} has two captions; the paper's file has one per region")
        references[key] = ann["caption"]
    return references


def with_paper_references(samples: Sequence[RegionSample], references: Mapping[str, str], source: str = "references"
                          ) -> List[RegionSample]:
    """``samples`` scored as the paper scores them: each region's one caption from ``references`` is its
    only reference, and its CHAIR ground truth is that caption's objects only (no category)."""
    from .data import DataError

    missing = [s.sample_id for s in samples if s.sample_id not in references]
    if missing:
        raise DataError(f"{source} has no caption for region(s) {missing[:5]} ({len(missing)} of {len(samples)})")
    return [dataclasses.replace(s, references=[references[s.sample_id]], category=None) for s in samples]


# ----------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class RegionPrompt:
    """How an evaluation recipe asks about a region.

    ``template`` gets ``x1, y1, x2, y2`` (box corners, already scaled and rounded as strings).
    Coordinates are divided by the image side (or by the padded square's side when
    ``pad_to_square``, as LLaVA-1.5's preprocessing pads), multiplied by ``scale``, and printed
    with ``decimals`` digits (0 = integers). ``absolute``: integer pixel coordinates of the image instead
    (Qwen2.5-VL grounds in absolute coordinates; ``scale`` and ``decimals`` are then unused).
    """

    template: str
    scale: float
    decimals: int
    pad_to_square: bool = False
    absolute: bool = False

    def format(self, bbox: Sequence[float], width: int, height: int) -> str:
        x, y, w, h = bbox
        if width <= 0 or height <= 0:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        if self.absolute:
            def pixel(v, size):
                return str(int(round(min(max(v, 0.0), float(size)))))
            return self.template.format(x1=pixel(x, width), y1=pixel(y, height), x2=pixel(x + w, width),
                                        y2=pixel(y + h, height))
        ox = oy = 0.0
        sx, sy = float(width), float(height)
        if self.pad_to_square:
            side = float(max(width, height))
            ox, oy, sx, sy = (side - width) // 2, (side - height) // 2, side, side
        def scaled(v, off, size, upper):
            val = min(max((v + off) / size, 0.0), 1.0) * self.scale
            if self.decimals == 0:
                return str(min(int(val + 1e-9), upper))
            return f"{val:.{self.decimals}f}"
        top = int(self.scale) - 1 if self.decimals == 0 else None
        return self.template.format(
            x1=scaled(x, ox, sx, top), y1=scaled(y, oy, sy, top),
            x2=scaled(x + w, ox, sx, top), y2=scaled(y + h, oy, sy, top))


# LLaVA-1.5: its RefCOCO region-caption instruction, box normalised to [0, 1] on the padded square, 2 decimals.
# Qwen-VL: its grounding tags, integer coordinates in [0, 1000) (instruction wording ours).
# GLM-4V: box in the question, integer coordinates in [0, 1000), the [[x1,y1,x2,y2]] form (wording ours).
# Qwen2-VL: its grounding tokens <|object_ref_start|>...<|box_start|>(x1,y1),(x2,y2)<|box_end|>, integers in
# [0, 1000) (wording ours). Qwen2.5-VL grounds in absolute pixel coordinates, in its JSON form (wording ours).
_LLAVA_REGION = RegionPrompt("Please provide a short description for this region: [{x1}, {y1}, {x2}, {y2}]",
                             scale=1.0, decimals=2, pad_to_square=True)
# Keyed by the harness's recipe families (hallupatch.eval.models.RECIPES).
REGION_PROMPTS: Dict[str, RegionPrompt] = {
    "llava-hf": _LLAVA_REGION,
    "llava": _LLAVA_REGION,
    "qwen-vl": RegionPrompt("<ref>the region</ref><box>({x1},{y1}),({x2},{y2})</box> "
                            "Please provide a short description for this region.",
                            scale=1000.0, decimals=0),
    "glm-4v": RegionPrompt("Please provide a short description for the region [[{x1},{y1},{x2},{y2}]].",
                           scale=1000.0, decimals=0),
    "qwen2-vl": RegionPrompt("<|object_ref_start|>the region<|object_ref_end|><|box_start|>({x1},{y1}),({x2},{y2})"
                             "<|box_end|> Please provide a short description for this region.",
                             scale=1000.0, decimals=0),
    "qwen2.5-vl": RegionPrompt('Please provide a short description for the region {{"bbox_2d": [{x1}, {y1}, {x2}, {y2}]}}.',
                               scale=1.0, decimals=0, absolute=True),
}


def region_prompt(recipe: str, bbox: Sequence[float], width: int, height: int) -> str:
    """The region question for the evaluation ``recipe`` (one of :data:`REGION_PROMPTS`)."""
    if recipe not in REGION_PROMPTS:
        raise ValueError(f"no region prompt for recipe {recipe!r}; known: {sorted(REGION_PROMPTS)}")
    return REGION_PROMPTS[recipe].format(bbox, width, height)


# ----------------------------------------------------------------------------------- scoring
def java_available() -> bool:
    """Whether a ``java`` executable is on PATH (pycocoevalcap needs one)."""
    return shutil.which("java") is not None


def caption_metrics(references: Mapping[Hashable, Sequence[str]], predictions: Mapping[Hashable, str]
                    ) -> Dict[str, float]:
    """BLEU-4, METEOR, ROUGE-L and CIDEr over ``predictions`` (one string per key) against ``references``.

    Keys must match exactly. Uses pycocoevalcap's PTB tokenizer and scorers (Java required).
    """
    if set(references) != set(predictions):
        missing = sorted(map(str, set(references) ^ set(predictions)))[:5]
        raise ValueError(f"references and predictions must have the same keys; differing: {missing}")
    if not references:
        raise ValueError("no predictions to score")
    if not java_available():
        raise RuntimeError(JAVA_HINT)
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # Keys become strings (the toolkit sorts and compares them). References and predictions are tokenised in
    # one call (one Java start instead of two); the tokenizer works sentence by sentence, so this is the same.
    keys = {k: str(i) for i, k in enumerate(references)}
    batch = {("ref", keys[k]): [{"caption": r} for r in refs] for k, refs in references.items()}
    batch.update({("pred", keys[k]): [{"caption": predictions[k]}] for k in references})
    tokens = PTBTokenizer().tokenize(batch)
    gts = {key: tokens[("ref", key)] for key in keys.values()}
    res = {key: tokens[("pred", key)] for key in keys.values()}
    out: Dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its internal counts
        bleu, _ = Bleu(4).compute_score(gts, res)
    out["BLEU-4"] = float(bleu[3])
    meteor = Meteor()
    try:
        out["METEOR"] = float(meteor.compute_score(gts, res)[0])
    finally:
        _close_meteor(meteor)
    out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return out


def _close_meteor(meteor) -> None:
    proc = getattr(meteor, "meteor_p", None)
    if proc is not None and proc.poll() is None:
        with meteor.lock:
            proc.stdin.close()
            proc.kill()
            proc.wait()


def region_ground_truth(samples: Sequence[RegionSample], words: Optional[ChairWords] = None
                        ) -> Dict[str, set]:
    """Objects per sample: those CHAIR's pipeline finds in its references, plus its category."""
    words = words or ChairWords()
    gt = {}
    for s in samples:
        objs = {o for ref in s.references for o in words.objects(ref)}
        if s.category:
            objs.add(words.synonyms.get(s.category.lower(), s.category.lower()))
        gt[s.sample_id] = objs
    return gt


def score_region_captions(samples: Sequence[RegionSample], predictions: Mapping[str, str],
                          with_caption_metrics: bool = True) -> Tuple[dict, ChairResult]:
    """All region-caption scores: ``({metric: value}, CHAIR details)``.

    ``predictions`` maps ``sample_id`` to the generated description; every sample needs one.
    """
    missing = [s.sample_id for s in samples if s.sample_id not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} samples have no prediction (first: {missing[:5]})")
    words = ChairWords()
    chair = score_captions([(s.sample_id, predictions[s.sample_id]) for s in samples],
                           region_ground_truth(samples, words), words)
    scores: dict = {}
    if with_caption_metrics:
        scores.update(caption_metrics({s.sample_id: s.references for s in samples},
                                      {s.sample_id: predictions[s.sample_id] for s in samples}))
    scores.update({"CHAIRs": chair.chair_s, "CHAIRi": chair.chair_i, "num_samples": len(samples)})
    return scores, chair
