"""The lab's text: the word-level tokenizer, the prompt template and the training texts.

Prompts are exactly what the eval harness sends a llava-hf model: LLaVA-1.5's ``vicuna_v1``
conversation, and for yes/no questions LLaVA's short-answer suffix. Every word of those fixed texts is
in the vocabulary, so nothing maps to ``<unk>``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

from hallupatch.lab.world import COLOURS, OBJECTS, PARTNER_OF, SHAPES, Scene, absent_objects

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
TEMPLATE = SYSTEM + " USER: <image>\n{question} ASSISTANT:"
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
YES_NO_SUFFIX = " Please answer yes or no."
QUESTION_FORMS = ("Is there a {obj} in the image?", "Is there a {obj} in this image?")
CAPTION_PROMPTS = ("Describe the image.", "Please describe this image in detail.")

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
_FIXED_TEXT = " ".join([SYSTEM, "user assistant", SHORT_ANSWER, YES_NO_SUFFIX, *QUESTION_FORMS, *CAPTION_PROMPTS])
OBJECT_TOKENS = True
HARD_NEGATIVE_RATE = 0.5  # how often a "no" question asks for the absent partner of a present trigger
CAPTION_RATE = 0.4


def _words(text: str) -> List[str]:
    from tokenizers import pre_tokenizers

    return [w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text.lower())]


def vocabulary() -> List[str]:
    """Every token: the special tokens, then the words and punctuation of the fixed texts, the colours,
    the shapes and ``yes``/``no``, sorted (a fixed order, so the ids never change)."""
    words = set(_words(_FIXED_TEXT.replace("{obj}", ""))) | set(COLOURS) | set(SHAPES) | {"yes", "no", ",", ":"}
    return SPECIAL_TOKENS + sorted(words)


def build_tokenizer():
    """A word-level ``LlamaTokenizerFast`` over :func:`vocabulary` (lower-cased, whitespace and
    punctuation split, left padding, a BOS token first)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import LlamaTokenizerFast

    vocab = {tok: i for i, tok in enumerate(vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer = LlamaTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        padding_side="left", add_bos_token=True, add_eos_token=False,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if OBJECT_TOKENS:
        # one token per object ("red circle"): the asked object is then one position whose own embedding
        # names it, instead of a colour word whose identity is diluted across the sequence
        from tokenizers import AddedToken

        tokenizer.add_tokens([AddedToken(o, single_word=True, normalized=True) for o in OBJECTS])
    return tokenizer


def prompt(question: str) -> str:
    """The full ``vicuna_v1`` prompt for one question (the question text as the harness sends it)."""
    return TEMPLATE.format(question=question)


def yes_no_question(obj: str, form: int = 0, suffix: str = SHORT_ANSWER) -> str:
    """``"Is there a red circle in the image?"`` plus ``suffix`` (LLaVA's short-answer line by default)."""
    if obj not in OBJECTS:
        raise ValueError(f"unknown object {obj!r}; objects are colour + shape, e.g. {OBJECTS[0]!r}")
    return QUESTION_FORMS[form].format(obj=obj) + suffix


def caption(objects: Sequence[str]) -> str:
    """The reference caption: the objects, left to right, ``"red circle , blue square ."``."""
    return " , ".join(objects) + " ."


def caption_objects(text: str) -> List[str]:
    """The objects a caption names, in order (any ``colour shape`` bigram of the vocabulary)."""
    words = _words(text)
    found = []
    for a, b in zip(words, words[1:]):
        if a in COLOURS and b in SHAPES:
            found.append(f"{a} {b}")
    return found


def training_text(scene: Scene, rng: np.random.Generator) -> Tuple[str, str, Optional[str]]:
    """One training ``(question, answer, asked object)`` for ``scene``: a caption of every labelled
    object (drawn or hidden; no asked object), or a yes/no question: half about a labelled object
    ("yes"), half about an absent one ("no"), the absent one being the partner of a present trigger
    :data:`HARD_NEGATIVE_RATE` of the time when there is one."""
    if rng.random() < CAPTION_RATE:
        return CAPTION_PROMPTS[int(rng.integers(len(CAPTION_PROMPTS)))], caption(scene.labels), None
    form = int(rng.integers(len(QUESTION_FORMS)))
    suffix = SHORT_ANSWER if rng.random() < 0.75 else YES_NO_SUFFIX
    if rng.random() < 0.5:
        obj = scene.labels[int(rng.integers(len(scene.labels)))]
        return yes_no_question(obj, form, suffix), "yes", obj
    absent = absent_objects(scene)
    missing_partners = [PARTNER_OF[t] for t in scene.labels if t in PARTNER_OF and PARTNER_OF[t] in absent]
    if missing_partners and rng.random() < HARD_NEGATIVE_RATE:
        obj = missing_partners[int(rng.integers(len(missing_partners)))]
    else:
        obj = absent[int(rng.integers(len(absent)))]
    return yes_no_question(obj, form, suffix), "no", obj
