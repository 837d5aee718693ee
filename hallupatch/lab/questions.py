"""Evaluation questions from the lab world's dev/test scenes, built the way each benchmark builds its own.

Everything here is deterministic: the scenes of a split are taken in index order and every random
choice comes from a generator seeded with the split, the purpose and the scene index.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from hallupatch.lab import world

EVAL_SPLITS = ("dev", "test", "heldout")
POPE_KINDS = ("random", "popular", "adversarial")
_PURPOSE = {"random": 11, "popular": 12, "adversarial": 13, "mme": 14, "control": 15, "weak": 16}


@dataclass(frozen=True)
class YesNo:
    """One yes/no question about one scene: the object asked for and the true answer."""

    scene: world.Scene
    obj: str
    label: str  # "yes" or "no"
    kind: str = ""

    @property
    def pope_text(self) -> str:
        """POPE's wording: ``"Is there a red circle in the image?"``."""
        return f"Is there a {self.obj} in the image?"

    @property
    def mme_text(self) -> str:
        """MME's wording: ``"Is there a red circle in this image? Please answer yes or no."``."""
        return f"Is there a {self.obj} in this image? Please answer yes or no."


def _check_eval_split(split: str) -> None:
    if split not in EVAL_SPLITS:
        raise ValueError(f"evaluation split must be one of {list(EVAL_SPLITS)}; got {split!r}")


def _check_count(count: int) -> None:
    if not isinstance(count, int) or isinstance(count, bool) or count < 2 or count % 2:
        raise ValueError(f"the number of questions must be an even integer >= 2; got {count!r}")


def _rng(split: str, purpose: str, index: int) -> np.random.Generator:
    return np.random.default_rng([world.WORLD_SEED, world.SPLIT_SEEDS[split], _PURPOSE[purpose], index])


def _scene_stream(split: str) -> Iterator[world.Scene]:
    index = 0
    while True:
        yield world.make_scene(split, index)
        index += 1


@lru_cache(maxsize=1)
def popularity() -> Tuple[str, ...]:
    """Objects from the most to the least frequent in the world's training statistics (ties: name)."""
    freq = world.object_frequencies("train", 5000)
    return tuple(sorted(world.OBJECTS, key=lambda o: (-freq[o], o)))


def _missing_partner(scene: world.Scene) -> Optional[Tuple[str, str]]:
    for name in scene.labels:
        partner = world.PARTNER_OF.get(name)
        if partner is not None and partner not in scene.labels:
            return name, partner
    return None


def pope_questions(split: str, kind: str, count: int) -> List[YesNo]:
    """``count`` POPE questions (half yes, half no), one yes and one no per scene.

    ``random``: the no-question asks for a uniformly drawn absent object; ``popular``: the absent object
    most frequent in the world's statistics; ``adversarial``: the absent partner of a present trigger
    (only scenes that have one; the yes-question asks for the trigger). The yes-question of random and
    popular asks for a uniformly drawn present object.
    """
    _check_eval_split(split)
    if kind not in POPE_KINDS:
        raise ValueError(f"POPE split must be one of {list(POPE_KINDS)}; got {kind!r}")
    _check_count(count)
    out: List[YesNo] = []
    ranking = popularity()
    for scene in _scene_stream(split):
        if len(out) >= count:
            break
        rng = _rng(split, kind, scene.index)
        if kind == "adversarial":
            pair = _missing_partner(scene)
            if pair is None:
                continue
            positive, negative = pair
        else:
            positive = scene.labels[int(rng.integers(len(scene.labels)))]
            absent = world.absent_objects(scene)
            if kind == "random":
                negative = absent[int(rng.integers(len(absent)))]
            else:
                negative = next(o for o in ranking if o in absent)
        out += [YesNo(scene, positive, "yes", kind), YesNo(scene, negative, "no", kind)]
    return out


def control_questions(adversarial: List[YesNo]) -> List[YesNo]:
    """The paired control of adversarial "no" questions: for each, the same absent partner asked about
    the next scene of the split (after the adversarial ones) with the same number of objects that has
    neither the trigger nor the partner. A higher false-yes rate on the adversarial questions than here
    is the trigger's doing."""
    negatives = [q for q in adversarial if q.label == "no"]
    if not negatives:
        return []
    split = negatives[0].scene.split
    start = max(q.scene.index for q in adversarial) + 1
    used = set()
    out = []
    built: Dict[int, world.Scene] = {}   # each scene is built once (the search below revisits them)
    for q in negatives:
        trigger = next(t for t, p in world.PAIRS.items() if p == q.obj and t in q.scene.labels)
        index = start
        while True:
            if index not in built:
                built[index] = world.make_scene(split, index)
            scene = built[index]
            if (index not in used and len(scene.objects) == len(q.scene.objects)
                    and trigger not in scene.labels and q.obj not in scene.labels):
                used.add(index)
                out.append(YesNo(scene, q.obj, "no", "control"))
                break
            index += 1
    return out


def weak_questions(split: str, count: int) -> List[YesNo]:
    """``count`` questions on the second planted cause, weak visual evidence (half yes, half no), two per scene.

    In each scene one drawn object is weakened (:func:`hallupatch.lab.world.weaken`: small, faint or half
    hidden); the yes-question asks for it, the no-question for its look-alike: the same shape in a colour
    absent from the scene. Neither is the partner of a trigger in the scene, so the first cause (the
    co-occurrence prior) plays no part: seeing the object, and seeing it well enough to tell its colour, is
    what answers both."""
    _check_eval_split(split)
    _check_count(count)
    out: List[YesNo] = []
    for scene in _scene_stream(split):
        if len(out) >= count:
            break
        prompted = {world.PARTNER_OF[t] for t in scene.labels if t in world.PARTNER_OF}
        targets = [o for o in scene.visible if o not in prompted]
        if not targets:
            continue
        rng = _rng(split, "weak", scene.index)
        target = targets[int(rng.integers(len(targets)))]
        shape = target.split()[1]
        alikes = [o for o in world.absent_objects(scene) if o.split()[1] == shape and o not in prompted]
        if not alikes:
            continue
        weak = world.weaken(scene, target)
        out += [YesNo(weak, target, "yes", "weak"), YesNo(weak, alikes[int(rng.integers(len(alikes)))], "no", "weak")]
    return out


def full_evidence(questions: List[YesNo]) -> List[YesNo]:
    """The paired control of :func:`weak_questions`: the same questions on the same scenes drawn whole.
    More errors on the weak questions than here is the weak evidence's doing."""
    return [YesNo(world.make_scene(q.scene.split, q.scene.index), q.obj, q.label, "full") for q in questions]


def mme_questions(split: str, images: int) -> List[YesNo]:
    """MME existence: per scene two questions, a present object ("Yes") then an absent one ("No")."""
    _check_eval_split(split)
    if not isinstance(images, int) or images < 1:
        raise ValueError(f"images must be a positive integer; got {images!r}")
    out = []
    for scene in world.scenes(split, images):
        rng = _rng(split, "mme", scene.index)
        absent = world.absent_objects(scene)
        out += [YesNo(scene, scene.labels[int(rng.integers(len(scene.labels)))], "yes", "existence"),
                YesNo(scene, absent[int(rng.integers(len(absent)))], "no", "existence")]
    return out


def caption_pairs(split: str, count: int) -> List[Tuple[world.Scene, world.Scene, str]]:
    """``count`` triples ``(trigger scene, control scene, partner)`` for the caption test: a scene with a
    trigger whose partner is absent, and its paired control (same object count, neither object)."""
    _check_eval_split(split)
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive integer; got {count!r}")
    adversarial = pope_questions(split, "adversarial", 2 * count)
    negatives = [q for q in adversarial if q.label == "no"]
    return [(q.scene, c.scene, q.obj) for q, c in zip(negatives, control_questions(adversarial))]


def scene_file_name(scene: world.Scene) -> str:
    """The image file name of a scene in every written layout: ``lab_test_000012.png``, and
    ``lab_test_000012_weak.png`` for the scene with an object weakened (one weakened variant per scene)."""
    return f"lab_{scene.split}_{scene.index:06d}{'_weak' if scene.weak else ''}.png"


def scene_image_id(scene: world.Scene) -> int:
    """A COCO-style integer image id: split seed x 10^6 + index (unique across splits)."""
    return world.SPLIT_SEEDS[scene.split] * 1_000_000 + scene.index


def pope_stats(questions: List[YesNo]) -> Dict[str, int]:
    """Counts of yes and no labels (a quick balance check)."""
    return {"yes": sum(q.label == "yes" for q in questions), "no": sum(q.label == "no" for q in questions)}
