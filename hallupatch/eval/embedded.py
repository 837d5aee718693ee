"""The built-in model of ``python -m hallupatch.eval`` (no ``--model``).

The lab (``hallupatch.lab``) is a synthetic world of shape scenes with a planted language-prior
hallucination, and each benchmark task writes the lab's data in its official layout when no ``--data``
is given (``Task.embedded_data``). The built-in model is the lab's trained tiny LLaVA, shipped in
``hallupatch/lab/checkpoint/``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Union

from hallupatch.lab.settings import METHOD_KNOBS


@dataclass(frozen=True)
class EmbeddedModel:
    """The model used without ``--model``, with the run settings it needs.

    ``answer_tokens`` / ``caption_tokens``: generation lengths for yes/no and free-text tasks;
    ``method_knobs``: per method, knobs that replace the published defaults on this model (e.g. MemVR's
    layer window, which the published 5..16 would exceed).
    """

    name: str
    build: Callable[[], object]
    batch_size: int
    answer_tokens: int
    caption_tokens: int
    method_knobs: Dict[str, Dict[str, object]] = field(default_factory=dict)

    def max_new_tokens(self, free_text: bool) -> int:
        return self.caption_tokens if free_text else self.answer_tokens


def lab_backend(path: Optional[Union[str, Path]] = None):
    """A lab checkpoint (default: the shipped one) behind the llava-hf backend: it was trained on
    LLaVA-1.5's prompt. A missing checkpoint is ``load_lab_model``'s ``FileNotFoundError``."""
    from hallupatch.eval.models import RECIPES, LlavaHFBackend, quiet_tokenizer_loading
    from hallupatch.lab import load_lab_model

    with quiet_tokenizer_loading():
        model, processor = load_lab_model(path)
    name = str(Path(path).resolve()) if path else "hallupatch-lab"   # what each run.json records as the model
    return LlavaHFBackend(model, processor, RECIPES["llava-hf"], name=name)


# the lab's knobs (e.g. MemVR's layer window: its decoder has 6 layers) live with the lab
LAB = EmbeddedModel("hallupatch-lab", lab_backend, batch_size=32, answer_tokens=4, caption_tokens=24,
                    method_knobs=METHOD_KNOBS)


def builtin_model() -> EmbeddedModel:
    """The model of the benchmark commands without ``--model``: the shipped lab checkpoint."""
    return LAB
