"""Generation settings of an evaluation run: greedy by default, or the published scripts' sampling,
beams and repetition penalty; recorded in ``run.json`` so that a resume with other settings is refused."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

#: beams a method runs with when the run asks for none (``--num-beams`` 1): OPERA exists only inside
#: beam search, and its published scripts use 5
METHOD_BEAMS: Mapping[str, int] = {"opera": 5}


@dataclass(frozen=True)
class Decoding:
    """How answers are generated. ``None`` leaves a setting to the checkpoint's generation config.

    ``seed``: seeds Python, NumPy and torch before each method answers; when answers draw random
    numbers (sampling, or the layer draws of a layer prior without ``--layer-seed``) each question is
    answered on its own with a seed derived from ``seed`` and its id
    (:func:`hallupatch.eval.harness.seeds_per_question`), so the same seed gives the same answers at any
    batch size, shard count or after a resume.
    """

    do_sample: bool = False
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    # top-k sampling: 0 turns it off (the published VCD and AvisC scripts pass top_k=None, which transformers
    # reads as off); None leaves the checkpoint's generation config (transformers' default 50)
    top_k: Optional[int] = None
    num_beams: int = 1
    repetition_penalty: Optional[float] = None
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be True or False; got {self.do_sample!r}")
        if not self.do_sample:
            given = [f"--{name.replace('_', '-')}" for name in ("temperature", "top_p", "top_k") if getattr(self, name) is not None]
            if given:
                raise ValueError(f"{' and '.join(given)} only apply when sampling: add --do-sample (or drop them)")
        if self.temperature is not None and not (_finite(self.temperature) and self.temperature > 0):
            raise ValueError(f"--temperature must be a number > 0; got {self.temperature!r}")
        if self.top_p is not None and not (_finite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"--top-p must lie in (0, 1]; got {self.top_p!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0):
            raise ValueError(f"--top-k must be an integer >= 0 (0 = no top-k); got {self.top_k!r}")
        if isinstance(self.num_beams, bool) or not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise ValueError(f"--num-beams must be an integer >= 1; got {self.num_beams!r}")
        if self.repetition_penalty is not None and not (_finite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"--repetition-penalty must be a number > 0 (1.0 = none); got {self.repetition_penalty!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2 ** 32):
            raise ValueError(f"--seed must be an integer in [0, 2**32); got {self.seed!r}")

    def generate_kwargs(self) -> Dict[str, Any]:
        """The keyword arguments of ``model.generate`` (unset ones left to the checkpoint)."""
        kwargs: Dict[str, Any] = {"do_sample": self.do_sample, "num_beams": self.num_beams}
        for name in ("temperature", "top_p", "top_k", "repetition_penalty"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        return kwargs

    def for_method(self, method: str) -> "Decoding":
        """The settings ``method`` (e.g. ``"opera"``, ``"none"``) generates with: a method that needs beams
        (:data:`METHOD_BEAMS`) gets its published beam count where the run sets none (``num_beams`` 1)."""
        beams = max((METHOD_BEAMS.get(part, 1) for part in method.split("+")), default=1)
        return dataclasses.replace(self, num_beams=beams) if self.num_beams == 1 and beams > 1 else self

    def settings(self) -> Dict[str, Any]:
        """What ``run.json`` records (keys sorted, as ``run.json`` stores them, so a stored copy is equal)."""
        settings = dataclasses.asdict(self)
        if settings["top_k"] is None:   # runs recorded before --top-k existed stay resumable
            del settings["top_k"]
        return dict(sorted(settings.items()))

    def seed_everything(self) -> None:
        """Seed Python, NumPy and torch with ``seed`` (nothing without one)."""
        if self.seed is not None:
            seed_everything(self.seed)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (transformers' ``set_seed``)."""
    from transformers import set_seed

    set_seed(seed)


GREEDY = Decoding()


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
