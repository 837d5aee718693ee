"""Per-layer candidates, cycle-consistency ranking and the mask-IoU helper (DESIGN §4d).

    cands = hallupatch.generate_candidates(model, inputs, layers=[8, 12, 16], tokenizer=processor, max_new_tokens=30)
    ranked = hallupatch.rank_candidates(cands, scorer, samples=[...])   # scorer(sample, caption) -> float
    ranked[0].best.text, ranked[0].scores

Layer indices are hidden-state indices (0 = embedding output, DESIGN §4a).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

ScorerResult = Union[float, Tuple[float, float]]
Scorer = Callable[[Any, str], ScorerResult]


@dataclass
class Candidate:
    """One sample's caption decoded with layer contrast against one fixed premature ``layer``.

    ``tokens``: the generated token ids (prompt excluded; up to the first end-of-sequence token, or
    without trailing padding);
    ``text``: their decoding when a tokenizer was given, else ``None``.
    """

    layer: int
    tokens: List[int]
    text: Optional[str] = None

    @property
    def caption(self) -> str:
        if self.text is None:
            raise ValueError("this candidate was generated without a tokenizer; pass tokenizer= to generate_candidates")
        return self.text


@dataclass
class RankedSample:
    """The ranking of one sample's candidates: the best one and every candidate's score.

    ``confidences[i]`` is the scorer's confidence for candidate ``i`` (``None`` when it gave a bare score);
    ``best`` maximises ``scores[i] * confidences[i]`` (a bare score counts with confidence 1).
    """

    index: int
    best: Candidate
    best_index: int
    candidates: List[Candidate]
    scores: List[float]
    confidences: List[Optional[float]]

    def to_scored(self) -> dict:
        """This sample in the input format of :func:`hallupatch.estimate_layer_prior` (score as IoU)."""
        return {
            "id": self.index,
            "candidates": [
                {"layer": c.layer, "iou": s, **({} if conf is None else {"confidence": conf})}
                for c, s, conf in zip(self.candidates, self.scores, self.confidences)
            ],
        }


def _trim(tokens: torch.Tensor, pad_token_id: Optional[int], eos_token_ids: Sequence[int]) -> List[int]:
    """Generated ids up to and including the first end-of-sequence token; else without trailing padding.

    generate() keeps a finished row going with padding while other rows of the batch continue, so this
    makes a batched row equal to the same sample generated alone.
    """
    ids = tokens.tolist()
    for position, token in enumerate(ids):
        if token in eos_token_ids:
            return ids[: position + 1]
    end = len(ids)
    while pad_token_id is not None and end > 0 and ids[end - 1] == pad_token_id:
        end -= 1
    return ids[:end]


def generate_candidates(
    model: nn.Module,
    inputs: Any,
    layers: Sequence[int],
    tokenizer: Any = None,
    early_exit_norm: Optional[bool] = None,
    **generate_kwargs: Any,
) -> List[List[Candidate]]:
    """One candidate per sample and per layer: generate with layer contrast against each fixed layer.

    Args:
        model: a supported model, patched or not. Its current patch (e.g. MemVR) stays active while the
            candidates are generated and is restored afterwards; a ``"dola"`` configuration is replaced
            for the duration.
        inputs: the batch, as given to ``model.generate(**inputs)`` (e.g. a processor's output).
        layers: hidden-state indices of the premature layers, each ``< num_layers``.
        tokenizer: a tokenizer or processor with ``decode``; when given each candidate has ``text``.
        early_exit_norm: final norm on the premature layers; ``None`` keeps the model's current layer
            contrast setting, or ``False`` (as published).
        **generate_kwargs: forwarded to ``generate`` (``max_new_tokens``, ``do_sample``, ...).

    Returns ``[sample][i]`` -> :class:`Candidate` for ``layers[i]``. Each sample is decided alone, so a
    batch gives the same candidates as its samples one by one.
    """
    from hallupatch.api import apply, restore_patch
    from hallupatch.engine import get_patch
    from hallupatch.methods.dola import DoLaConfig

    layers = list(layers)
    if not layers:
        raise ValueError("layers must list at least one hidden-state index")
    num_layers = _num_layers(model)
    bad = [layer for layer in layers if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers]
    if bad:
        raise ValueError(f"layers must be hidden-state indices in [0, {num_layers - 1}] for this model; got {bad}")

    previous = get_patch(model)
    previous_configs = dict(previous.configs) if previous is not None else {}
    dola = previous_configs.pop("dola", None)
    norm = early_exit_norm if early_exit_norm is not None else (dola.early_exit_norm if dola is not None else False)
    contrast_config = DoLaConfig(candidate_layers=layers, early_exit_norm=norm)
    methods = list(previous_configs) + ["dola"]
    apply(model, method="+".join(methods), config=list(previous_configs.values()) + [contrast_config])
    try:
        contrast = get_patch(model).methods["dola"]
        input_ids = _input_ids(inputs)
        pad = generate_kwargs.get("pad_token_id", _config_value(model, "pad_token_id"))
        eos = generate_kwargs.get("eos_token_id", _config_value(model, "eos_token_id"))
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        per_layer = []
        for position in range(len(layers)):
            contrast.forced = position
            output = model.generate(**_as_kwargs(inputs), **generate_kwargs)
            sequences = output.sequences if hasattr(output, "sequences") else output
            per_layer.append(sequences[:, input_ids.shape[1]:] if input_ids is not None else sequences)
    finally:
        restore_patch(model, previous)
    batch = per_layer[0].shape[0]
    result: List[List[Candidate]] = []
    for b in range(batch):
        row = []
        for layer, generated in zip(layers, per_layer):
            tokens = _trim(generated[b], pad, eos_ids)
            text = tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else None
            row.append(Candidate(layer=layer, tokens=tokens, text=text))
        result.append(row)
    return result


def _num_layers(model: nn.Module) -> int:
    from hallupatch.early_exit import parts_of

    return parts_of(model).num_layers


def _as_kwargs(inputs: Any) -> dict:
    if isinstance(inputs, torch.Tensor):
        return {"input_ids": inputs}
    return dict(inputs)


def _input_ids(inputs: Any) -> Optional[torch.Tensor]:
    return inputs if isinstance(inputs, torch.Tensor) else dict(inputs).get("input_ids")


def _config_value(model: nn.Module, name: str):
    value = getattr(getattr(model, "generation_config", None), name, None)
    return value if value is not None else getattr(model.config, name, None)


def _score_of(result: ScorerResult, index: int, position: int) -> Tuple[float, Optional[float]]:
    if isinstance(result, (tuple, list)):
        if len(result) != 2:
            raise ValueError(f"a scorer returns a score or (score, confidence); got {result!r} for sample {index}")
        score, confidence = float(result[0]), float(result[1])
    else:
        score, confidence = float(result), None
    if not math.isfinite(score) or (confidence is not None and not math.isfinite(confidence)):
        raise ValueError(f"scorer returned a non-finite value (NaN or infinite) for sample {index}, candidate {position}: {result!r}")
    return score, confidence


def rank_candidates(
    candidates: Sequence[Sequence[Candidate]],
    scorer: Scorer,
    samples: Optional[Sequence[Any]] = None,
) -> List[RankedSample]:
    """Score every candidate and keep, per sample, the one with the largest score x confidence.

    As the region-caption paper ranks a region's captions by IoU x mask score (its ``regular_score``;
    it normalises the IoUs per region first, which does not change the order). A bare score counts with
    confidence 1; ties go to the first candidate in order.

    Args:
        candidates: ``[sample][i]`` candidates, e.g. from :func:`generate_candidates`.
        scorer: ``scorer(sample, caption) -> score`` or ``-> (score, confidence)``; higher is better
            (e.g. the IoU of a referring-segmentation model's mask for the caption with the ground truth,
            see :func:`mask_iou`). The confidence is kept for :func:`hallupatch.estimate_layer_prior`.
        samples: what the scorer receives per sample (e.g. image and ground-truth mask); by default the
            sample's index.
    """
    if samples is not None and len(samples) != len(candidates):
        raise ValueError(f"samples has {len(samples)} entries but candidates has {len(candidates)} samples")
    ranked = []
    for index, row in enumerate(candidates):
        if not row:
            raise ValueError(f"sample {index} has no candidates to rank")
        sample = samples[index] if samples is not None else index
        scored = [_score_of(scorer(sample, c.caption), index, i) for i, c in enumerate(row)]
        scores = [s for s, _ in scored]
        ranking = [s * (1.0 if c is None else c) for s, c in scored]
        best = max(range(len(row)), key=lambda i: (ranking[i], -i))
        ranked.append(
            RankedSample(
                index=index,
                best=row[best],
                best_index=best,
                candidates=list(row),
                scores=scores,
                confidences=[c for _, c in scored],
            )
        )
    return ranked


def mask_iou(pred: Any, gt: Any) -> float:
    """Intersection over union of two boolean masks of the same shape (torch or numpy).

    Empty masks: both empty -> ``1.0`` (the prediction agrees exactly with a target that has no
    pixels); exactly one empty -> ``0.0``.
    """
    pred_t, gt_t = torch.as_tensor(pred), torch.as_tensor(gt)
    for name, mask in (("pred", pred_t), ("gt", gt_t)):
        if mask.dtype != torch.bool:
            raise ValueError(f"mask_iou needs boolean masks; {name} has dtype {mask.dtype} (threshold it first, e.g. mask > 0.5)")
    if pred_t.shape != gt_t.shape:
        raise ValueError(f"mask_iou needs masks of the same shape; got {tuple(pred_t.shape)} and {tuple(gt_t.shape)}")
    union = (pred_t | gt_t).sum().item()
    if union == 0:
        return 1.0
    return (pred_t & gt_t).sum().item() / union
