"""Cycle-consistency ranking inside an evaluation run (DESIGN §4d).

With ``--method dola --candidate-layers 8,12,16 --rank-with mypkg.scorers:refseg_iou``, every question
gets one caption per candidate layer (layer contrast against that fixed layer), the scorer ranks them
and the best one is the answer. The scores of all candidates are kept with the answer and written as
``scored_candidates.json``, the input of ``python -m hallupatch.prior``.
"""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from hallupatch.candidates import Candidate, Scorer, rank_candidates
from hallupatch.eval.data import Question


def load_scorer(spec: str) -> Scorer:
    """``"package.module:function"`` or ``"path/to/file.py:function"`` -> the scorer callable."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--rank-with takes MODULE:FUNCTION or FILE.py:FUNCTION; got {spec!r}")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise FileNotFoundError(f"scorer file not found: {path}")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    scorer = getattr(module, attr, None)
    if not callable(scorer):
        raise ValueError(f"{spec!r}: {attr!r} is not a callable in {module_name}")
    return scorer


class RankingBackend:
    """A backend whose answer is the best of one caption per candidate layer, as ranked by ``scorer``.

    The wrapped backend's model must be patched with ``"dola"`` (alone or with MemVR): its candidate
    layers are the layers tried. ``sample_of(question)`` is what the scorer receives with each caption.
    """

    def __init__(self, backend, scorer: Scorer, sample_of: Callable[[Question], Any]):
        self.backend = backend
        self.scorer = scorer
        self.sample_of = sample_of

    def __getattr__(self, name: str):
        return getattr(self.backend, name)

    def generate(self, questions: Sequence[Question], max_new_tokens: Optional[int]) -> List[Dict[str, Any]]:
        from hallupatch.engine import get_patch

        patch = get_patch(self.backend.model)
        contrast = patch.methods.get("dola") if patch is not None else None
        if contrast is None:
            raise ValueError("ranking candidates needs layer contrast: use --method dola (or memvr+dola) "
                             "with --candidate-layers")
        per_layer = []
        try:
            for position in range(len(contrast.candidates)):
                contrast.forced = position  # contrast every step against this one layer
                per_layer.append(self.backend.generate(questions, max_new_tokens))
        finally:
            contrast.forced = None
        candidates = [[Candidate(layer=layer, tokens=[], text=answers[i]["text"])
                       for layer, answers in zip(contrast.candidates, per_layer)] for i in range(len(questions))]
        ranked = rank_candidates(candidates, self.scorer, samples=[self.sample_of(q) for q in questions])
        results = []
        for i, r in enumerate(ranked):
            scored = r.to_scored()["candidates"]
            for entry, candidate in zip(scored, r.candidates):
                entry["text"] = candidate.text
            results.append({**per_layer[r.best_index][i], "layer": r.best.layer, "candidates": scored})
        return results


def scored_candidates(answers: Mapping[str, Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """The answers' candidate scores in the input format of :func:`hallupatch.estimate_layer_prior`."""
    return [{"id": qid, "candidates": [{k: v for k, v in c.items() if k != "text"} for c in record["candidates"]]}
            for qid, record in answers.items() if record.get("candidates")]
