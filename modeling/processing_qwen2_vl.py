"""Qwen2-VL / Qwen2.5-VL processor for ``trust_remote_code`` loading under transformers 4.40, written for
hallupatch from transformers 4.51.3's ``Qwen2VLProcessor`` and checked against it.

``processor(text=, images=, padding=True, return_tensors="pt")`` expands each ``<|image_pad|>`` of the text to
the image's token count (its patch grid over 2x2 merge windows) and tokenizes; ``apply_chat_template`` renders
the hub's ``chat_template.json`` (transformers 4.40's processors know no chat templates, so this class loads it).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional, Union

from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

CHAT_TEMPLATE_FILE = "chat_template.json"
TOKENIZER_ARGUMENTS = {"padding", "truncation", "max_length", "pad_to_multiple_of", "return_attention_mask",
                       "return_token_type_ids", "add_special_tokens"}
IMAGE_ARGUMENTS = {"min_pixels", "max_pixels", "size", "resample"}
VIDEO_ARGUMENTS = {"fps"}   # Qwen2.5-VL: frames per second of the sampled video frames (default 2.0)


class Qwen2VLProcessor(ProcessorMixin):
    attributes = ["image_processor", "tokenizer"]
    image_processor_class = "AutoImageProcessor"
    tokenizer_class = ("Qwen2Tokenizer", "Qwen2TokenizerFast")

    def __init__(self, image_processor=None, tokenizer=None, chat_template: Optional[str] = None, **kwargs):
        super().__init__(image_processor, tokenizer)
        self.image_token = getattr(tokenizer, "image_token", "<|image_pad|>")
        self.video_token = getattr(tokenizer, "video_token", "<|video_pad|>")
        self.chat_template = chat_template

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Also reads ``chat_template.json``; ``min_pixels`` / ``max_pixels`` override the image processor's."""
        limits = {key: kwargs.pop(key) for key in ("min_pixels", "max_pixels") if key in kwargs}
        chat_template = kwargs.pop("chat_template", None)
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        for key, value in limits.items():
            setattr(processor.image_processor, key, value)
            edge = "shortest_edge" if key == "min_pixels" else "longest_edge"
            processor.image_processor.size = {**processor.image_processor.size, edge: value}
        if chat_template is None:
            path = Path(pretrained_model_name_or_path) / CHAT_TEMPLATE_FILE
            if path.is_file():
                chat_template = json.loads(path.read_text(encoding="utf-8"))["chat_template"]
        processor.chat_template = chat_template
        return processor

    def save_pretrained(self, save_directory, **kwargs):
        os.makedirs(save_directory, exist_ok=True)
        chat_template, self.chat_template = self.chat_template, None
        try:
            saved = super().save_pretrained(save_directory, **kwargs)
        finally:
            self.chat_template = chat_template
        if chat_template is not None:
            Path(save_directory, CHAT_TEMPLATE_FILE).write_text(
                json.dumps({"chat_template": chat_template}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return saved

    def apply_chat_template(self, conversation, chat_template: Optional[str] = None, tokenize: bool = False,
                            add_generation_prompt: bool = False, **kwargs):
        """Render ``conversation`` (a list of ``{"role", "content"}`` messages, content a string or a list of
        ``{"type": "image"}`` / ``{"type": "text", "text": ...}`` items) with the checkpoint's chat template."""
        template = chat_template if chat_template is not None else self.chat_template
        if template is None:
            raise ValueError(f"this processor has no chat template: put the hub's {CHAT_TEMPLATE_FILE} in the "
                             "checkpoint folder or pass chat_template=")
        return self.tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=tokenize,
                                                  add_generation_prompt=add_generation_prompt, **kwargs)

    def expand_placeholders(self, texts: List[str], token: str, grids, merge_length: int) -> List[str]:
        """Replace the ``k``-th ``token`` over all texts by ``grid[k].prod() / merge_length`` copies of it."""
        index = 0
        expanded = []
        for text in texts:
            pieces = text.split(token)
            out = pieces[0]
            for piece in pieces[1:]:
                if index >= len(grids):
                    raise ValueError(f"the text has more {token} placeholders than there are images/videos")
                out += token * int(grids[index].prod() // merge_length) + piece
                index += 1
            expanded.append(out)
        return expanded

    def __call__(self, images=None, text: Union[str, List[str], None] = None, videos=None, **kwargs) -> BatchFeature:
        return_tensors = kwargs.pop("return_tensors", None)
        image_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key in IMAGE_ARGUMENTS}
        text_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key in TOKENIZER_ARGUMENTS}
        video_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key in self.video_arguments}
        if kwargs:
            raise TypeError(f"{type(self).__name__} got unexpected arguments {sorted(kwargs)}; tokenizer arguments are "
                            f"{sorted(TOKENIZER_ARGUMENTS)}, image arguments {sorted(IMAGE_ARGUMENTS)}, video "
                            f"arguments {sorted(self.video_arguments)}")
        image_inputs, video_inputs = {}, {}
        merge_length = self.image_processor.merge_size ** 2
        texts = list(text) if isinstance(text, (list, tuple)) else [text]
        if images is not None:
            image_inputs = self.image_processor(images=images, videos=None, return_tensors=return_tensors, **image_kwargs)
            texts = self.expand_placeholders(texts, self.image_token, image_inputs["image_grid_thw"], merge_length)
        if videos is not None:
            video_inputs = self.image_processor(images=None, videos=videos, return_tensors=return_tensors, **image_kwargs)
            video_inputs.update(self.video_timing(video_inputs["video_grid_thw"], **video_kwargs))
            texts = self.expand_placeholders(texts, self.video_token, video_inputs["video_grid_thw"], merge_length)
        text_inputs = self.tokenizer(texts, return_tensors=return_tensors, **text_kwargs)
        return BatchFeature(data={**text_inputs, **image_inputs, **video_inputs})

    video_arguments: set = set()

    def video_timing(self, grids) -> dict:
        """Extra per-video inputs of the model (Qwen2-VL: none)."""
        return {}

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self):
        return list(dict.fromkeys(self.tokenizer.model_input_names + self.image_processor.model_input_names))


class Qwen2_5_VLProcessor(Qwen2VLProcessor):
    """Qwen2.5-VL's processor: as Qwen2-VL's, and each video also gets ``second_per_grid_ts`` (seconds per
    temporal patch: ``temporal_patch_size / fps``), which spaces its time positions."""

    video_arguments = VIDEO_ARGUMENTS

    def video_timing(self, grids, fps=2.0) -> dict:
        count = len(grids)
        if isinstance(fps, (int, float)):
            rates = [fps] * count
        elif hasattr(fps, "__len__") and len(fps) == count:
            rates = list(fps)
        else:
            raise ValueError(f"fps must be one number or one per video ({count}); got {fps!r}")
        return {"second_per_grid_ts": [self.image_processor.temporal_patch_size / rate for rate in rates]}
