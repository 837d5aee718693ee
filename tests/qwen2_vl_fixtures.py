"""Helpers for the Qwen2-VL / Qwen2.5-VL tests: a tiny hub checkpoint (tests/tiny_qwen2_vl.py) with
hallupatch's drop-in files installed, loaded under transformers 4.40 with ``trust_remote_code``, and the
recordings of transformers 4.51.3 (tests/published/record_qwen2_vl.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytest
import torch
from transformers import AutoModelForVision2Seq, AutoProcessor

import tiny_qwen2_vl as tiny
from hallupatch import modeling
from tiny_remote import forget_remote_modules

DATA = Path(__file__).resolve().parent / "data"
NO_METHOD = {"method": "none"}


def installed_checkpoint(folder: Path, family: str, tied: bool = False, block: Optional[dict] = None) -> Path:
    """A tiny hub-layout checkpoint with hallupatch's drop-in files installed (by default with no method)."""
    path = tiny.build_checkpoint(folder, family, tied=tied)
    modeling.install(path, NO_METHOD if block is None else block)
    return path


def load_model(path: Path, auto=AutoModelForVision2Seq, **kwargs):
    """The model through an Auto class with ``trust_remote_code``, freshly imported, in eval mode."""
    forget_remote_modules()
    loaded = auto.from_pretrained(path, trust_remote_code=True, **kwargs)
    if isinstance(loaded, tuple):
        return loaded[0].eval(), loaded[1]
    return loaded.eval()


def load_processor(path: Path, **kwargs):
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True, **kwargs)
    processor.tokenizer.padding_side = "left"
    return processor


def recording(family: str) -> dict:
    return torch.load(DATA / f"qwen2_vl_transformers_4_51_3_{family}.pt", weights_only=False)


def case_inputs(processor, case_name: str):
    """The processor's chat texts and model inputs for one recorded case (left-padded batch)."""
    rows = tiny.CASES[case_name]["rows"]
    texts = [processor.apply_chat_template(tiny.case_messages(row), tokenize=False, add_generation_prompt=True)
             for row in rows]
    images = [image for row in rows for image in tiny.case_images(row)]
    videos = [video for row in rows for video in tiny.case_videos(row)]
    return texts, processor(text=texts, images=images or None, videos=videos or None, padding=True,
                            return_tensors="pt")


@pytest.fixture(scope="module", params=tiny.FAMILIES)
def loaded(request, tmp_path_factory):
    """``(model, processor)`` of a tiny installed checkpoint, once per family (import it into a test module)."""
    path = installed_checkpoint(tmp_path_factory.mktemp(request.param) / request.param, request.param)
    return load_model(path), load_processor(path)


def render(processor, rows, with_image=True):
    """The chat texts of ``rows`` (each a list of image specs and one text, tests/tiny_qwen2_vl.py);
    ``with_image=False`` renders the same conversations without their images."""
    texts = []
    for row in rows:
        kept = row if with_image else [item for item in row if not isinstance(item, tuple)]
        texts.append(processor.apply_chat_template(tiny.case_messages(kept), tokenize=False, add_generation_prompt=True))
    return texts


def encode_rows(processor, rows):
    """``(texts, inputs)``: the rows' chat texts and the processor's left-padded batch with their images."""
    texts = render(processor, rows)
    images = [image for row in rows for image in tiny.case_images(row)]
    return texts, processor(text=texts, images=images, padding=True, return_tensors="pt")
