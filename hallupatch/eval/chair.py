"""CHAIR: object hallucination in image captions (Rohrbach, Hendricks et al., EMNLP 2018).

Offline re-implementation of the metric's word pipeline, scored as the original ``chair.py``
(and the Python-3 copy in OPERA that MemVR-style papers use) scores:

1. lower-case and tokenise the caption (Penn-Treebank style: punctuation and clitics such as
   ``'s`` / ``n't`` become their own tokens, hyphenated words stay whole);
2. singularise every token (the original used ``pattern.en.singularize``, OPERA a WordNet
   lemmatiser; here ``lemminflect``'s noun lemma, which ships its data, so nothing is downloaded);
3. merge two-word terms left to right (``traffic light``, ``hot dog``, ``teddy bear`` ...), with the
   original's special cases: ``baby``/``adult`` + animal -> the animal (so "baby" does not fire
   *person*), ``passenger jet``/``passenger train`` -> the vehicle, ``bow tie`` -> *tie*,
   ``toilet seat`` -> *toilet*, and ``home plate`` / ``train track`` kept as non-objects;
4. if a caption says both ``toilet`` and ``seat``, every ``seat`` is dropped (it is not a chair);
5. every remaining token found in the synonym table is an object mention, mapped to its COCO
   category (the first word of its line in ``data/chair_synonyms.txt``).

Ground truth per image = the categories of its COCO instance annotations plus the objects the same
pipeline finds in its reference captions. Metrics, as in the original:

* CHAIRs = captions with at least one hallucinated mention / captions;
* CHAIRi = hallucinated mentions / all mentions, counting **every** mention (an object named twice
  counts twice; this is what the original does, it does not de-duplicate);
* Recall = sum over captions of distinct ground-truth objects mentioned / sum of ground-truth
  objects (OPERA's addition);
* avg_len = mean number of tokens per caption after two-word merging, punctuation included
  (OPERA's ``Len``).

Deliberate differences from the original, all in its word handling, none in the counting:
words that are already singular are never mangled (``pattern`` turns "bus" into "bu", "glass" into
"glas" and "tennis" into "tenni", so the original misses every "bus"); synonym entries are stripped
of stray spaces (the original's table has "  motor bike" and "  cheesecake", which could never match)
and lower-cased ("iPhone"). The synonym table is the original's, shipped unchanged.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Dict, Hashable, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union

from .data import PathLike


SYNONYMS_PATH = Path(__file__).resolve().parent.parent / "data" / "chair_synonyms.txt"

# Two-word terms treated as one word (the original's list, including OPERA's "train track").
DOUBLE_WORDS = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal",
    "stop light", "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball",
    "baseball bat", "baseball glove", "tennis racket", "wine glass", "hot dog", "cell phone",
    "mobile phone", "teddy bear", "hair drier", "potted plant", "bow tie", "laptop computer",
    "stove top oven", "home plate", "train track",
)
# "baby bird" / "adult bird" is the bird, not a person.
ANIMAL_WORDS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
                "giraffe", "animal", "cub")
# "passenger jet" is the jet, not a person.
VEHICLE_WORDS = ("jet", "train")


def _double_word_map() -> Dict[str, str]:
    mapping = {term: term for term in DOUBLE_WORDS}
    for animal in ANIMAL_WORDS:
        mapping[f"baby {animal}"] = animal
        mapping[f"adult {animal}"] = animal
    for vehicle in VEHICLE_WORDS:
        mapping[f"passenger {vehicle}"] = vehicle
    mapping["bow tie"] = "tie"
    mapping["toilet seat"] = "toilet"
    return mapping


def load_synonyms(path: Optional[PathLike] = None) -> Dict[str, str]:
    """Read the synonym table: ``{word or two-word term: COCO category}``.

    Each line is ``category, synonym, synonym, ...``; the first entry is the category name.
    """
    path = Path(path) if path is not None else SYNONYMS_PATH
    if not path.is_file():
        raise FileNotFoundError(f"CHAIR synonym table not found: {path}")
    table: Dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        entries = [e.strip().lower() for e in line.split(",") if e.strip()]
        if not entries:
            continue
        for entry in entries:
            table[entry] = entries[0]
    return table


# ----------------------------------------------------------------------------------- word pipeline
_CLITIC_RE = re.compile(r"([a-z0-9])('s|'re|'ve|'ll|'d|'m|n't)\b")
_TOKEN_RE = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|[a-z0-9]+(?:[-'][a-z0-9]+)*|[^\sa-z0-9]")


def tokenize(text: str) -> List[str]:
    """Lower-case, Treebank-style word tokens (punctuation and clitics split off)."""
    text = _CLITIC_RE.sub(r"\1 \2", text.lower())
    return _TOKEN_RE.findall(text)


@lru_cache(maxsize=65536)
def _noun_lemma(word: str) -> str:
    from lemminflect import getLemma  # imported lazily: only the CHAIR pipeline needs it

    if not word[0].isalpha():
        return word
    lemmas = getLemma(word, upos="NOUN")
    return lemmas[0] if lemmas else word


class ChairWords:
    """The CHAIR word pipeline: caption -> object mentions ``[(word, category), ...]``.

    ``synonyms``: ``{word or two-word term: object}`` (:func:`load_synonyms`); default COCO's 80 categories.
    """

    @classmethod
    def from_file(cls, path: Optional[PathLike] = None) -> "ChairWords":
        """The pipeline for an object vocabulary file (``object, synonym, ...`` lines); ``None``: COCO's."""
        return cls() if path is None else cls(load_synonyms(path))

    def __init__(self, synonyms: Optional[Mapping[str, str]] = None):
        self.synonyms: Dict[str, str] = dict(synonyms) if synonyms is not None else load_synonyms()
        self.double_words = _double_word_map()
        if synonyms is not None:  # another vocabulary's two-word names are merged as COCO's double words are
            self.double_words.update({term: term for term in self.synonyms if len(term.split()) == 2})
        # Words that are already in the vocabulary are kept as they are (never "bus" -> "bu").
        self._keep = {w for term in list(self.synonyms) + list(self.double_words) for w in term.split()}

    def singularize(self, word: str) -> str:
        """Singular form of one lower-case token (vocabulary words are returned unchanged)."""
        if word in self._keep:
            return word
        return _noun_lemma(word)

    def words(self, caption: str) -> List[str]:
        """Tokens after singularisation and two-word merging (the original's ``double_words``)."""
        tokens = [self.singularize(t) for t in tokenize(caption)]
        merged: List[str] = []
        i = 0
        while i < len(tokens):
            pair = " ".join(tokens[i:i + 2])
            if i + 1 < len(tokens) and pair in self.double_words:
                merged.append(self.double_words[pair])
                i += 2
            else:
                merged.append(tokens[i])
                i += 1
        return merged

    def mentions(self, caption: str) -> Tuple[List[str], List[Tuple[str, str]]]:
        """``(merged tokens, [(word, category) for each object mention in order])``."""
        words = self.words(caption)
        candidates = words
        if "toilet" in words and "seat" in words:
            candidates = [w for w in words if w != "seat"]
        found = [(w, self.synonyms[w]) for w in candidates if w in self.synonyms]
        return words, found

    def objects(self, caption: str) -> List[str]:
        """Categories mentioned in ``caption``, in order, repeats kept."""
        return [cat for _, cat in self.mentions(caption)[1]]


# ----------------------------------------------------------------------------------- ground truth
def _read_json(path: PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {path}")
    from .data import read_json

    return read_json(path)


def coco_ground_truth(
    instances: Sequence[Union[PathLike, dict]] = (),
    captions: Sequence[Union[PathLike, dict]] = (),
    words: Optional[ChairWords] = None,
    image_ids: Optional[Iterable[int]] = None,
) -> Dict[int, Set[str]]:
    """Ground-truth objects per image from COCO instance and caption annotation files.

    ``instances``: ``instances_*2014.json`` files (or their loaded dicts); each annotation's
    category name is mapped through the synonym table. ``captions``: ``captions_*2014.json``;
    every reference caption goes through the same word pipeline as generated captions.
    Every image listed in any file's ``images`` gets an entry (possibly empty).
    ``image_ids`` restricts the result to those images (faster on the full COCO files).
    """
    words = words or ChairWords()
    keep = set(int(i) for i in image_ids) if image_ids is not None else None
    gt: Dict[int, Set[str]] = {}

    def wanted(imid: int) -> bool:
        return keep is None or imid in keep

    def category_objects(data):  # instance annotations name a category: its canonical word
        names = {c["id"]: c["name"] for c in data.get("categories", [])}
        return lambda ann: {words.synonyms.get(names[ann["category_id"]], names[ann["category_id"]])}

    def caption_objects(data):  # caption annotations: the objects the CHAIR pipeline finds in them
        return lambda ann: set(words.objects(ann["caption"]))

    for sources, objects_in in ((instances, category_objects), (captions, caption_objects)):
        for source in sources:
            data = source if isinstance(source, dict) else _read_json(source)
            objects_of = objects_in(data)
            for img in data.get("images", []):
                if wanted(int(img["id"])):
                    gt.setdefault(int(img["id"]), set())
            for ann in data.get("annotations", []):
                imid = int(ann["image_id"])
                if wanted(imid):
                    gt.setdefault(imid, set()).update(objects_of(ann))
    return gt


def find_coco_annotations(annotation_dir: PathLike) -> Tuple[List[Path], List[Path]]:
    """The ``instances_*.json`` and ``captions_*.json`` files of a COCO ``annotations/`` folder.

    Raises ``FileNotFoundError`` naming the folder when either kind is missing.
    """
    folder = Path(annotation_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"COCO annotation folder not found: {folder}")
    instances = sorted(folder.glob("instances_*.json"))
    captions = sorted(folder.glob("captions_*.json"))
    if not instances or not captions:
        missing = "instances_*.json" if not instances else "captions_*.json"
        raise FileNotFoundError(
            f"no {missing} in {folder}: CHAIR needs COCO's instance and caption annotations "
            "(e.g. instances_val2014.json and captions_val2014.json from annotations_trainval2014.zip)"
        )
    return instances, captions


def sample_image_ids(image_ids: Iterable[int], n: Optional[int], seed: int = 0) -> List[int]:
    """A seeded sample of ``n`` image ids (all of them, sorted, when ``n`` is None or too large)."""
    pool = sorted(set(int(i) for i in image_ids))
    if n is None or n >= len(pool):
        return pool
    if n <= 0:
        raise ValueError(f"number of images must be positive, got {n}")
    return random.Random(seed).sample(pool, n)


# ----------------------------------------------------------------------------------- scoring
@dataclass
class CaptionScore:
    """Per-caption CHAIR details."""

    image_id: Hashable
    caption: str
    mentioned: List[Tuple[str, str]]  # (word as written after singularisation, category)
    hallucinated: List[Tuple[str, str]]
    gt_objects: List[str]
    recalled: List[str]  # distinct ground-truth categories the caption mentions
    num_words: int

    @property
    def chair_s(self) -> int:
        return int(bool(self.hallucinated))

    @property
    def chair_i(self) -> float:
        return len(self.hallucinated) / len(self.mentioned) if self.mentioned else 0.0

    def to_dict(self) -> dict:
        return {
            "image_id": self.image_id,
            "caption": self.caption,
            "mentioned": [list(m) for m in self.mentioned],
            "hallucinated": [list(m) for m in self.hallucinated],
            "gt_objects": self.gt_objects,
            "recalled": self.recalled,
            "num_words": self.num_words,
            "CHAIRs": self.chair_s,
            "CHAIRi": self.chair_i,
        }


@dataclass
class ChairResult:
    """Overall CHAIR metrics plus the per-caption details."""

    chair_s: float
    chair_i: Optional[float]  # None when no caption mentions any object
    recall: Optional[float]  # None when no image has a ground-truth object
    avg_len: float
    num_captions: int
    num_mentions: int
    num_hallucinated: int
    captions: List[CaptionScore] = field(default_factory=list)

    def metrics(self) -> dict:
        return {
            "CHAIRs": self.chair_s,
            "CHAIRi": self.chair_i,
            "Recall": self.recall,
            "avg_len": self.avg_len,
            "num_captions": self.num_captions,
            "num_mentions": self.num_mentions,
            "num_hallucinated_mentions": self.num_hallucinated,
        }


def score_captions(
    captions: Iterable[Tuple[Hashable, str]],
    ground_truth: Mapping[Hashable, Set[str]],
    words: Optional[ChairWords] = None,
) -> ChairResult:
    """Score ``(image_id, caption)`` pairs against ``ground_truth`` (``{image_id: categories}``).

    Ids are compared as given (COCO ground truth uses ``int`` ids; region captions use sample ids).

    An image id absent from ``ground_truth`` is a ``KeyError`` naming it (a caption of an image the
    annotations do not know cannot be scored).
    """
    words = words or ChairWords()
    scores: List[CaptionScore] = []
    for image_id, caption in captions:
        if image_id not in ground_truth:
            raise KeyError(f"image_id {image_id} is not in the COCO annotations given for CHAIR")
        gt = set(ground_truth[image_id])
        tokens, mentioned = words.mentions(caption)
        hallucinated = [m for m in mentioned if m[1] not in gt]
        recalled = sorted({cat for _, cat in mentioned if cat in gt})
        scores.append(CaptionScore(image_id, caption, mentioned, hallucinated, sorted(gt), recalled,
                                   len(tokens)))
    if not scores:
        raise ValueError("no captions to score")
    n_mentions = sum(len(s.mentioned) for s in scores)
    n_halluc = sum(len(s.hallucinated) for s in scores)
    n_gt = sum(len(s.gt_objects) for s in scores)
    return ChairResult(
        chair_s=sum(s.chair_s for s in scores) / len(scores),
        chair_i=n_halluc / n_mentions if n_mentions else None,
        recall=sum(len(s.recalled) for s in scores) / n_gt if n_gt else None,
        avg_len=sum(s.num_words for s in scores) / len(scores),
        num_captions=len(scores),
        num_mentions=n_mentions,
        num_hallucinated=n_halluc,
        captions=scores,
    )


# ----------------------------------------------------------------------------------- paired comparison
def caption_stats(caption: CaptionScore) -> Dict[str, float]:
    """One caption's additive CHAIR counts: summed over captions, :func:`chair_from_stats` gives the
    corpus metrics again (what a paired bootstrap resamples)."""
    return {"hallucinating": float(caption.chair_s), "mentions": float(len(caption.mentioned)),
            "hallucinated": float(len(caption.hallucinated)), "gt_objects": float(len(caption.gt_objects)),
            "recalled": float(len(caption.recalled))}


def chair_from_stats(sums: Mapping[str, float], count: int) -> Dict[str, float]:
    """CHAIRs, CHAIRi and Recall in percent (``nan`` where undefined) from summed :func:`caption_stats`."""
    def ratio(a: float, b: float) -> float:
        return 100.0 * a / b if b else float("nan")

    return {"CHAIRs": ratio(sums["hallucinating"], count), "CHAIRi": ratio(sums["hallucinated"], sums["mentions"]),
            "Recall": ratio(sums["recalled"], sums["gt_objects"])}
