"""Asking the lab model questions with the eval harness's llava-hf prompt, in left-padded batches."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from hallupatch.lab import text as lab_text
from hallupatch.lab.questions import YesNo

CAPTION_PROMPT = "Please describe this image in detail."  # the CHAIR prompt of the eval harness


def short_answer(question: str) -> str:
    """LLaVA-1.5's rewrite of a yes/no question: drop ``Please answer yes or no.``, add the short-answer line."""
    stripped = question.strip()
    if stripped.endswith(lab_text.YES_NO_SUFFIX.strip()):
        stripped = stripped[: -len(lab_text.YES_NO_SUFFIX.strip())].rstrip()
    return stripped + lab_text.SHORT_ANSWER


def generate(model, processor, images: Sequence, questions: Sequence[str], max_new_tokens: int = 4,
             batch_size: int = 50) -> List[str]:
    """Greedy answers, one per ``(image, question)``, each question wrapped in the ``vicuna_v1`` prompt."""
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images for {len(questions)} questions")
    answers: List[str] = []
    with torch.no_grad():
        for start in range(0, len(questions), batch_size):
            chunk_q = [lab_text.prompt(q) for q in questions[start:start + batch_size]]
            chunk_i = list(images[start:start + batch_size])
            inputs = processor(text=chunk_q, images=chunk_i, return_tensors="pt", padding=True)
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new = out[:, inputs["input_ids"].shape[1]:]
            answers += [a.strip() for a in processor.batch_decode(new, skip_special_tokens=True)]
    return answers


def answer_yes_no(model, processor, questions: Sequence[YesNo], images: Optional[Sequence] = None,
                  batch_size: int = 50) -> List[str]:
    """The model's answers to POPE-worded questions (``images`` overrides each scene's own image,
    e.g. to shuffle images across questions)."""
    images = list(images) if images is not None else [q.scene.image() for q in questions]
    texts = [q.pope_text + lab_text.SHORT_ANSWER for q in questions]
    return generate(model, processor, images, texts, max_new_tokens=3, batch_size=batch_size)


def describe(model, processor, scenes: Sequence, batch_size: int = 50, max_new_tokens: int = 16) -> List[str]:
    """Captions with the CHAIR prompt."""
    return generate(model, processor, [s.image() for s in scenes], [CAPTION_PROMPT] * len(scenes),
                    max_new_tokens=max_new_tokens, batch_size=batch_size)


def is_yes(answer: str) -> bool:
    """POPE's official parsing (LLaVA's ``eval_pope.py``, via the eval scorer): True for a yes."""
    from hallupatch.eval.scoring import parse_pope_answer

    return parse_pope_answer(answer) == "yes"
