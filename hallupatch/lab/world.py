"""The lab's scene world: coloured shapes on small noisy canvases, with a planted language prior.

An object is a ``(colour, shape)`` pair. A scene holds 1-3 objects drawn at random sizes and
positions on a 64 px RGB canvas with pixel noise. Four fixed **co-occurrence pairs** plant the prior:
in training scenes a *trigger* object brings its *partner* in :data:`TRAIN_PARTNER_RATE` of scenes,
and :data:`HIDDEN_RATE` of the labelled objects are **hidden** (labelled, so questions and captions
name them, but not drawn). A model trained on this learns to guess an unseen partner from its
trigger: a language-prior hallucination with a known cause.

Every scene is a pure function of ``(split, index)``: its own ``numpy`` generator is seeded with
``(WORLD_SEED, split seed, index)``, so any scene can be rebuilt on its own, in any order, and the
splits draw from disjoint seed streams; on top of that, a scene's content (objects, centres, sizes)
belongs by a stable hash to either the training or the evaluation part of the world (:func:`split_of_content`),
so no dev/test scene equals any training scene. Evaluation splits (``dev``, ``test``, ``heldout``) never
hide objects and use :data:`EVAL_PARTNER_RATE` so that "trigger present, partner absent" scenes are common
enough to ask about. ``heldout`` is built exactly as ``test`` from a seed stream and a part of the world of
its own: fresh scenes on which anyone can check that a finding replicates.

A second cause, **weak visual evidence**, is planted at evaluation time: :func:`weaken` draws one object
of a scene :data:`WEAK_MODES` (small, faint or half hidden), at the edge of what training showed (every
training object is drawn whole, at full contrast, 14-22 px). A model has to look harder to see it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import zlib

import numpy as np

WORLD_SEED = 12
IMAGE_SIZE = 64
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 235),
    "yellow": (235, 220, 40),
    "purple": (150, 60, 200),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle", "cross")
OBJECTS: Tuple[str, ...] = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)
# trigger -> partner
PAIRS: Dict[str, str] = {
    "red circle": "blue square",
    "green triangle": "yellow circle",
    "white cross": "purple triangle",
    "yellow square": "green cross",
}
PARTNER_OF = dict(PAIRS)
TRIGGERS = tuple(PAIRS)
PARTNERS = tuple(PAIRS.values())
TRAIN_PARTNER_RATE = 0.9
EVAL_PARTNER_RATE = 0.5
HIDDEN_RATE = 0.2
TRIGGER_FIRST_RATE = 0.4  # how often a scene's first object is a trigger
SPLIT_SEEDS = {"train": 1, "dev": 2, "test": 3, "heldout": 4}
SPLITS = tuple(SPLIT_SEEDS)
#: how an object is drawn when its visual evidence is weak (:func:`weaken`); "" = drawn as in training
WEAK_MODES = ("small", "faint", "occluded")
WEAK_SCALE = 0.5       # "small": the side scaled by this (14-22 px -> 7-11 px)
WEAK_CONTRAST = 0.4    # "faint": this share of the colour's distance from the background
WEAK_PURPOSE = 2       # generator purpose of :func:`weaken` (0: the scene's content, 1: its pixels)
CONTENT_BUCKETS = 16


@dataclass(frozen=True)
class Placed:
    """One labelled object: its name, centre ``(x, y)`` and size in pixels, and whether it is drawn."""

    name: str
    x: int
    y: int
    size: int
    hidden: bool = False
    weak: str = ""   # one of WEAK_MODES: drawn with weak visual evidence (evaluation scenes only)

    @property
    def colour(self) -> str:
        return self.name.split()[0]

    @property
    def shape(self) -> str:
        return self.name.split()[1]


@dataclass(frozen=True)
class Scene:
    """A scene: where it comes from (``split``, ``index``) and its labelled objects, left to right."""

    split: str
    index: int
    objects: Tuple[Placed, ...]

    @property
    def labels(self) -> Tuple[str, ...]:
        """Every labelled object, drawn or hidden (what the training text says is there)."""
        return tuple(o.name for o in self.objects)

    @property
    def visible(self) -> Tuple[str, ...]:
        """The objects actually drawn."""
        return tuple(o.name for o in self.objects if not o.hidden)

    @property
    def layout(self) -> Tuple[Tuple[str, int, int, int, bool], ...]:
        """Everything that defines the scene's content (used to compare scenes across splits)."""
        return tuple((o.name, o.x, o.y, o.size, o.hidden) for o in self.objects)

    @property
    def weak(self) -> Tuple[str, ...]:
        """The objects drawn with weak visual evidence (:func:`weaken`)."""
        return tuple(o.name for o in self.objects if o.weak)

    def image(self):
        """The scene as a 64 px RGB ``PIL.Image`` (deterministic)."""
        from PIL import Image

        return Image.fromarray(render(self), mode="RGB")


def _check_split(split: str) -> None:
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; use one of {list(SPLITS)}")


def _generator(split: str, index: int, purpose: int = 0) -> np.random.Generator:
    return np.random.default_rng([WORLD_SEED, SPLIT_SEEDS[split], int(index), purpose])


def make_scene(split: str, index: int) -> Scene:
    """Scene number ``index`` of ``split`` (``"train"``, ``"dev"``, ``"test"`` or ``"heldout"``)."""
    _check_split(split)
    if not isinstance(index, (int, np.integer)) or isinstance(index, bool) or index < 0:
        raise ValueError(f"scene index must be a non-negative integer; got {index!r}")
    rng = _generator(split, index)
    training = split == "train"
    while True:  # a scene's content belongs to exactly one part of the world
        names, placed = _draw(rng, TRAIN_PARTNER_RATE if training else EVAL_PARTNER_RATE)
        if split_of_content(names, placed) == split:
            break
    hidden = [bool(training and rng.random() < HIDDEN_RATE) for _ in names]
    if all(hidden):
        hidden[int(rng.integers(len(names)))] = False  # at least one object is drawn
    objects = [Placed(n, x, y, s, h) for n, (x, y, s), h in zip(names, placed, hidden)]
    objects.sort(key=lambda o: (o.x, o.y))
    return Scene(split, int(index), tuple(objects))


def split_of_content(names: Sequence[str], placed: Sequence[Tuple[int, int, int]]) -> str:
    """The split a scene content (objects, centres, sizes) belongs to, by a stable hash modulo
    :data:`CONTENT_BUCKETS`: bucket 0 is dev, bucket 1 test or heldout (halved by the hash's next bit),
    all others training. So no two splits can share a scene, however many are drawn."""
    key = ";".join(f"{n}@{x},{y},{s}" for n, (x, y, s) in sorted(zip(names, placed)))
    digest = zlib.crc32(key.encode("utf-8"))
    bucket = digest % CONTENT_BUCKETS
    if bucket == 1:
        return "heldout" if (digest // CONTENT_BUCKETS) % 2 else "test"
    return "dev" if bucket == 0 else "train"


def _draw(rng: np.random.Generator, partner_rate: float) -> Tuple[List[str], List[Tuple[int, int, int]]]:
    count = int(rng.integers(1, 4))
    if rng.random() < TRIGGER_FIRST_RATE:
        names = [TRIGGERS[int(rng.integers(len(TRIGGERS)))]]
    else:
        names = [OBJECTS[int(rng.integers(len(OBJECTS)))]]
    if names[0] in PARTNER_OF and rng.random() < partner_rate:
        names.append(PARTNER_OF[names[0]])
    count = max(count, len(names))
    # fillers: objects that are neither triggers nor the partner of a trigger already there
    while len(names) < count:
        pool = [o for o in OBJECTS if o not in names and o not in PARTNER_OF
                and not any(PARTNER_OF.get(n) == o for n in names)]
        names.append(pool[int(rng.integers(len(pool)))])
    return names, _place(rng, len(names))


def _place(rng: np.random.Generator, count: int) -> List[Tuple[int, int, int]]:
    """Centres and sizes for ``count`` objects that do not overlap (rejection sampling)."""
    boxes: List[Tuple[int, int, int]] = []
    for _ in range(count):
        for _attempt in range(200):
            size = int(rng.integers(14, 23))
            half = size // 2
            x = int(rng.integers(half + 1, IMAGE_SIZE - half - 1))
            y = int(rng.integers(half + 1, IMAGE_SIZE - half - 1))
            if all(abs(x - bx) > (size + bs) // 2 + 1 or abs(y - by) > (size + bs) // 2 + 1 for bx, by, bs in boxes):
                break
        boxes.append((x, y, size))
    return boxes


def weaken(scene: Scene, obj: str, mode: Optional[str] = None) -> Scene:
    """``scene`` with object ``obj`` drawn with weak visual evidence: ``mode`` one of :data:`WEAK_MODES`
    (default: drawn from the scene's own generator, so the same scene and object give the same image).

    ``small``: side x :data:`WEAK_SCALE`; ``faint``: :data:`WEAK_CONTRAST` of its contrast with the
    background; ``occluded``: one half (left, right, top or bottom, from the scene's generator) covered
    by the background. Only evaluation scenes are weakened; training draws every object whole."""
    if scene.split == "train":
        raise ValueError("only evaluation scenes (dev, test, heldout) are weakened; training draws objects whole")
    if obj not in scene.visible:
        raise ValueError(f"{obj!r} is not drawn in scene {scene.split}/{scene.index}; drawn: {list(scene.visible)}")
    if mode is None:
        rng = _generator(scene.split, scene.index, purpose=WEAK_PURPOSE)
        mode = WEAK_MODES[int(rng.integers(len(WEAK_MODES)))]
    if mode not in WEAK_MODES:
        raise ValueError(f"unknown weak mode {mode!r}; use one of {list(WEAK_MODES)}")
    objects = tuple(Placed(o.name, o.x, o.y, o.size, o.hidden, mode if o.name == obj else o.weak)
                    for o in scene.objects)
    return Scene(scene.split, scene.index, objects)


def shape_mask(shape: str, x: int, y: int, size: int, canvas: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean ``canvas x canvas`` mask of one shape centred at ``(x, y)`` with side ``size``."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; use one of {list(SHAPES)}")
    yy, xx = np.mgrid[0:canvas, 0:canvas]
    dx, dy = xx - x, yy - y
    half = size / 2.0
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "square":
        edge = half * 0.85
        return (np.abs(dx) <= edge) & (np.abs(dy) <= edge)
    if shape == "triangle":  # apex up
        inside_y = (dy >= -half) & (dy <= half)
        width = (dy + half) / 2.0  # half-width grows from 0 at the apex to `half` at the base
        return inside_y & (np.abs(dx) <= width)
    bar = max(2.0, size / 6.0)  # cross
    return ((np.abs(dx) <= bar) & (np.abs(dy) <= half)) | ((np.abs(dy) <= bar) & (np.abs(dx) <= half))


def render(scene: Scene) -> np.ndarray:
    """The scene's pixels: ``uint8`` array ``(64, 64, 3)``; hidden objects are not drawn."""
    rng = _generator(scene.split, scene.index, purpose=1)
    background = rng.integers(20, 70, size=3).astype(np.float32)
    pixels = np.broadcast_to(background, (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    for obj in scene.objects:
        if obj.hidden:
            continue
        colour = np.array(COLOURS[obj.colour], dtype=np.float32) + rng.normal(0, 8, size=3)
        pixels[_drawn_mask(obj, scene)] = _drawn_colour(obj, colour, background)
    pixels += rng.normal(0, 12, size=pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _drawn_mask(obj: Placed, scene: Scene) -> np.ndarray:
    """The pixels an object covers as drawn (weak objects: smaller, or with one half covered)."""
    if obj.weak == "small":
        return shape_mask(obj.shape, obj.x, obj.y, max(4, int(round(obj.size * WEAK_SCALE))))
    mask = shape_mask(obj.shape, obj.x, obj.y, obj.size)
    if obj.weak == "occluded":
        side = int(_generator(scene.split, scene.index, purpose=WEAK_PURPOSE + 1).integers(4))
        yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
        cover = (xx < obj.x, xx >= obj.x, yy < obj.y, yy >= obj.y)[side]
        mask = mask & ~cover
    return mask


def _drawn_colour(obj: Placed, colour: np.ndarray, background: np.ndarray) -> np.ndarray:
    if obj.weak == "faint":
        return background + WEAK_CONTRAST * (colour - background)
    return colour


def patch_tags(scene: Scene, patch: int = 8, min_fraction: float = 0.1) -> np.ndarray:
    """Per-patch multi-label targets for the vision pre-training: ``(patches, 2 * len(OBJECTS))`` of 0/1.

    Columns ``0..23``: 1 where a drawn object covers at least ``min_fraction`` of the patch (row-major
    patch order); columns ``24..47``: the scene's drawn objects, the same on every patch, so that each
    image token also carries the whole scene's object set.
    """
    side = IMAGE_SIZE // patch
    tags = np.zeros((side * side, 2 * len(OBJECTS)), dtype=np.float32)
    for name in scene.visible:
        tags[:, len(OBJECTS) + OBJECTS.index(name)] = 1.0
    for obj in scene.objects:
        if obj.hidden:
            continue
        mask = shape_mask(obj.shape, obj.x, obj.y, obj.size).reshape(side, patch, side, patch)
        cover = mask.mean(axis=(1, 3)).reshape(-1)
        tags[cover >= min_fraction, OBJECTS.index(obj.name)] = 1.0
    return tags


def scenes(split: str, count: int, start: int = 0) -> List[Scene]:
    """``count`` consecutive scenes of ``split`` from index ``start``."""
    _check_split(split)
    if count < 0 or start < 0:
        raise ValueError(f"count and start must be >= 0; got count={count}, start={start}")
    return [make_scene(split, i) for i in range(start, start + count)]


def object_frequencies(split: str = "train", count: int = 5000) -> Dict[str, int]:
    """How often each object is labelled in the first ``count`` scenes of ``split`` (the world's
    statistics that POPE's "popular" split ranks by)."""
    freq = {o: 0 for o in OBJECTS}
    for scene in scenes(split, count):
        for name in scene.labels:
            freq[name] += 1
    return freq


def absent_objects(scene: Scene, exclude: Optional[Sequence[str]] = None) -> List[str]:
    """Objects not labelled in ``scene`` (nor in ``exclude``), in :data:`OBJECTS` order."""
    taken = set(scene.labels) | set(exclude or ())
    return [o for o in OBJECTS if o not in taken]
