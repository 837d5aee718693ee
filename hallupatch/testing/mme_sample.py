"""A small synthetic MME-format sample, drawn deterministically: test data for the MME loaders, the
harness and the throughput benchmark (the built-in evaluation data is the lab's, ``hallupatch.lab``).

``write_mme_sample(root)`` writes synthetic images (coloured shapes on a background) with two yes/no
questions each (one true, one false, as MME pairs them), in the released folder layout: most
subtasks hold ``<stem>.png`` + ``<stem>.txt`` side by side, ``scene`` uses ``images/`` +
``questions_answers_YN/``. Same code, same bytes, every time.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Tuple, Union

COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
BACKGROUNDS = {"white": (250, 250, 250), "black": (15, 15, 15)}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five"]
IMAGES_PER_SUBTASK = 3
SAMPLE_VERSION = 1


def _picture(index: int):
    """Image ``index``: ``count`` shapes of one colour on a background, left or right half."""
    from PIL import Image, ImageDraw

    color = list(COLORS)[index % len(COLORS)]
    background = list(BACKGROUNDS)[(index // 2) % len(BACKGROUNDS)]
    shape = "circle" if index % 3 else "square"
    count = 1 + index % 3
    side = "left" if index % 2 == 0 else "right"
    img = Image.new("RGB", (72, 48), BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    x0 = 4 if side == "left" else 40
    for k in range(count):
        box = (x0 + (k % 2) * 14, 6 + (k // 2) * 18, x0 + (k % 2) * 14 + 12, 18 + (k // 2) * 18)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color])
    facts = dict(color=color, background=background, shape=shape, count=count, side=side)
    return img, facts


def _other(options, value):
    return next(o for o in options if o != value)


SUFFIX = " Please answer yes or no."
# subtask -> facts -> [(question, answer)], one true and one false statement per image
QUESTIONS: Dict[str, Callable[[dict], List[Tuple[str, str]]]] = {
    "existence": lambda f: [
        (f"Is there a {f['shape']} in the image?", "Yes"),
        (f"Is there a {_other(['circle', 'square'], f['shape'])} in the image?", "No"),
    ],
    "count": lambda f: [
        (f"Are there {NUMBER_WORDS[f['count']]} {f['shape']}s in the image?", "Yes"),
        (f"Are there {NUMBER_WORDS[f['count'] + 1]} {f['shape']}s in the image?", "No"),
    ],
    "position": lambda f: [
        (f"Is the {f['shape']} on the {f['side']} of the image?", "Yes"),
        (f"Is the {f['shape']} on the {_other(['left', 'right'], f['side'])} of the image?", "No"),
    ],
    "color": lambda f: [
        (f"Is the {f['shape']} {f['color']}?", "Yes"),
        (f"Is the {f['shape']} {_other(list(COLORS), f['color'])}?", "No"),
    ],
    "scene": lambda f: [
        (f"Is the background {f['background']}?", "Yes"),
        (f"Is the background {_other(list(BACKGROUNDS), f['background'])}?", "No"),
    ],
    "commonsense_reasoning": lambda f: [
        (f"Could the {f['shape']}s in this picture roll on a table?", "Yes" if f["shape"] == "circle" else "No"),
        (f"Do the {f['shape']}s in this picture have corners?", "Yes" if f["shape"] == "square" else "No"),
    ],
    "numerical_calculation": lambda f: [
        (f"Is the number of shapes plus one equal to {NUMBER_WORDS[f['count'] + 1]}?", "Yes"),
        (f"Is the number of shapes plus two equal to {NUMBER_WORDS[f['count'] + 1]}?", "No"),
    ],
}
NESTED_LAYOUT = ("scene",)  # subtasks written as images/ + questions_answers_YN/, as released for scene


def write_mme_sample(root: Union[str, Path]) -> Path:
    """Write the sample to ``root`` unless it is already there; returns ``root``.

    Written to a temporary sibling folder and renamed into place, so processes started together
    (``accelerate launch``) never read a half-written sample.
    """
    root = Path(root)
    if (root / f".hallupatch_sample_v{SAMPLE_VERSION}").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        _write_sample(tmp)
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / f".hallupatch_sample_v{SAMPLE_VERSION}").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _write_sample(root: Path) -> None:
    index = 0
    for subtask, make in QUESTIONS.items():
        sub = root / subtask
        image_dir = sub / "images" if subtask in NESTED_LAYOUT else sub
        qa_dir = sub / "questions_answers_YN" if subtask in NESTED_LAYOUT else sub
        image_dir.mkdir(parents=True, exist_ok=True)
        qa_dir.mkdir(parents=True, exist_ok=True)
        for i in range(IMAGES_PER_SUBTASK):
            img, facts = _picture(index)
            index += 1
            stem = f"{subtask[:4]}_{i:03d}"
            img.save(image_dir / f"{stem}.png")
            lines = [f"{q}{SUFFIX}\t{a}" for q, a in make(facts)]
            (qa_dir / f"{stem}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / f".hallupatch_sample_v{SAMPLE_VERSION}").write_text(
        "synthetic MME-format sample written by hallupatch.eval\n", encoding="utf-8"
    )
