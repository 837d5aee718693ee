"""Layer-importance prior from scored candidates (DESIGN §4d): reading the scored layouts, estimating, loading.

Estimation, per sample (one image region, one question...): normalise the candidates' scores (IoUs, or
any non-negative score) to sum to 1, multiply each by the scorer's confidence, keep the candidate with
the largest product (the first in order on ties) with its layer and product; a layer's prior is its
summed kept products over the sum for all layers. This is the region-caption paper's
``calculate_prob.py``; the scale of the scores is irrelevant (its IoUs run into the thousands).

Scored inputs (:func:`scored_samples` reads each):

* hallupatch's own: a list (or ``{"samples": [...]}``) of
  ``{"id": ..., "confidence": c?, "candidates": [{"layer": 16, "iou": 0.62, "confidence": 0.9?}, ...]}``
  (a candidate's ``confidence`` defaults to the sample's, else 1);
* the paper's ``sampled_captions.json``: a flat list of ``{"image_id", "caption", "layer", "sam_score",
  "iou", ...}`` whose consecutive entries with one ``image_id`` are one region's candidates
  (``sam_score`` = the confidence);
* the paper's ``scores_*.json``: a list of candidate lists, each candidate as in the flat list.

Priors (:func:`load_layer_prior` reads each): hallupatch's ``{"layers": [...], "prior": [...]}`` (what
``python -m hallupatch.prior`` writes) and the paper's ``layer_prob.json`` ``{"0": p0, "1": p1, ...}``.
Either becomes ``{layer: weight}``; non-finite weights (``NaN``, ``Infinity``, ``1e400``) are refused.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

PUBLISHED_CONFIDENCE = "sam_score"   # the paper's key for the scorer's (SAM mask) confidence


@dataclass(frozen=True)
class ScoredSample:
    """One sample's scored candidates, in input order: ``layers[i]``, ``scores[i]``, ``confidences[i]``."""

    where: str                  # how error messages name the sample
    layers: List[int]
    scores: List[float]
    confidences: List[float]


def _number(value: Any, what: str, where: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{where}: {what} must be a number; got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {what} must be a number; got {value!r}") from None
    except OverflowError:   # an integer beyond float's range
        raise ValueError(f"{where}: {what} must be finite; got an integer of {len(str(value))} digits") from None
    if not math.isfinite(number):
        raise ValueError(f"{where}: {what} must be finite; got {value!r}")
    return number


def _layer(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}: each candidate needs an integer 'layer' >= 0; got {value!r}")
    return value


def _sample(where: str, candidates: Sequence[Any], confidence_key: str, default_confidence: Optional[float]) -> ScoredSample:
    if not candidates:
        raise ValueError(f"{where} has no candidates; every sample needs at least one scored candidate")
    layers: List[int] = []
    scores: List[float] = []
    confidences: List[float] = []
    for candidate in candidates:
        if not isinstance(candidate, Mapping):
            raise ValueError(f"{where}: each candidate must be an object with 'layer' and 'iou'; got {candidate!r}")
        layer = _layer(candidate.get("layer"), where)
        if layer in layers:
            raise ValueError(f"{where}: layer {layer} appears twice (one candidate per layer and sample)")
        score = _number(candidate.get("iou"), "iou", where)
        if score < 0:
            raise ValueError(f"{where}: iou must be >= 0; got {score} for layer {layer}")
        if confidence_key not in candidate and default_confidence is None:
            raise ValueError(f"{where}: candidate of layer {layer} has no {confidence_key!r}")
        confidence = _number(candidate.get(confidence_key, default_confidence), confidence_key, where)
        if confidence < 0:
            raise ValueError(f"{where}: {confidence_key} must be >= 0; got {confidence} for layer {layer}")
        layers.append(layer)
        scores.append(score)
        confidences.append(confidence)
    return ScoredSample(where, layers, scores, confidences)


def _is_published_entry(entry: Any) -> bool:
    return isinstance(entry, Mapping) and "image_id" in entry and "candidates" not in entry


def scored_samples(scored: Any, group_size: Optional[int] = None) -> List[ScoredSample]:
    """The samples of any scored layout (module docstring), validated; ``ValueError`` naming the sample.

    ``group_size``: for the flat ``sampled_captions.json`` only, every ``group_size`` consecutive
    entries are one region, as ``calculate_prob.py`` groups them (``idx % 4``); needed only where two
    regions of one image follow each other. ``None``: one region per run of one ``image_id``.
    """
    if isinstance(scored, Mapping) and "samples" in scored:
        scored = scored["samples"]
    if not isinstance(scored, (list, tuple)):
        raise ValueError(
            "scored samples must be a list: of {'candidates': [...]} entries (or {'samples': [...]}), "
            "of the region-caption paper's {image_id, layer, iou, sam_score} entries, or of candidate lists"
        )
    if not scored:
        raise ValueError("no scored samples: the prior needs at least one sample with candidates")
    first = scored[0]
    if group_size is not None and not _is_published_entry(first):
        raise ValueError("group_size applies to the flat sampled_captions.json layout only; this file groups its candidates itself")
    if isinstance(first, (list, tuple)):  # scores_*.json: one list of candidates per region
        samples = []
        for index, group in enumerate(scored):
            if not isinstance(group, (list, tuple)):
                raise ValueError(f"entry {index} is not a list of candidates, unlike entry 0; use one layout per file")
            image = group[0].get("image_id") if group and isinstance(group[0], Mapping) else None
            where = f"region {index}" + (f" (image_id {image!r})" if image is not None else "")
            samples.append(_sample(where, group, PUBLISHED_CONFIDENCE, None))
        return samples
    if _is_published_entry(first):  # sampled_captions.json: consecutive entries of one image_id
        return _published_regions(scored, group_size)
    samples = []
    for index, sample in enumerate(scored):
        if not isinstance(sample, Mapping):
            raise ValueError(f"sample {index} must be an object with 'candidates'; got {sample!r}")
        where = f"sample {index}" + (f" (id {sample['id']!r})" if "id" in sample else "")
        default_confidence = _number(sample.get("confidence", 1.0), "confidence", where)
        samples.append(_sample(where, sample.get("candidates") or [], "confidence", default_confidence))
    return samples


def _published_regions(entries: Sequence[Any], group_size: Optional[int]) -> List[ScoredSample]:
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size must be an integer >= 1 (candidates per region); got {group_size!r}")
    regions: List[List[Mapping[str, Any]]] = []
    starts: List[int] = []
    for index, entry in enumerate(entries):
        if not _is_published_entry(entry):
            raise ValueError(f"entry {index} has no 'image_id', unlike entry 0; use one layout per file")
        same_image = bool(regions) and regions[-1][0]["image_id"] == entry["image_id"]
        if group_size is not None:
            if index % group_size:
                if not same_image:
                    raise ValueError(
                        f"entries {starts[-1]}..{index} should be one region (group_size {group_size}) but change "
                        f"image_id from {regions[-1][0]['image_id']!r} to {entry['image_id']!r}; check group_size"
                    )
                regions[-1].append(entry)
                continue
        elif same_image:
            regions[-1].append(entry)
            continue
        regions.append([entry])
        starts.append(index)
    if group_size is not None and len(entries) % group_size:
        raise ValueError(
            f"{len(entries)} entries do not make whole regions of {group_size} candidates (calculate_prob.py "
            f"would drop the last {len(entries) % group_size}); check group_size or the file"
        )
    samples = []
    for index, (region, start) in enumerate(zip(regions, starts)):
        where = f"region {index} (image_id {region[0]['image_id']!r}, entries from {start})"
        layers = [entry.get("layer") for entry in region]
        if group_size is None and any(layers.count(layer) > 1 for layer in layers):
            raise ValueError(
                f"{where}: a layer appears twice in one run of image_id entries ({layers}); if two regions of one "
                "image follow each other, give group_size (--group-size), the candidates per region"
            )
        samples.append(_sample(where, region, PUBLISHED_CONFIDENCE, None))
    return samples


def estimate_layer_prior(scored: Any, group_size: Optional[int] = None) -> Dict[int, float]:
    """The layer-importance prior ``{layer: weight}`` (weights sum to 1) from scored samples.

    ``scored``: any layout of :func:`scored_samples` (e.g. ``[r.to_scored() for r in ranked]``, or the
    region-caption paper's ``sampled_captions.json`` as loaded by ``json.load``; ``group_size`` as
    there). Every layer that
    appears is listed, in ascending order, with weight 0 when it was never kept (the paper's script
    lists only kept layers). Raises ``ValueError`` naming the sample for: no candidates, a repeated
    layer, a negative or non-finite score or confidence, scores that are all zero (nothing to normalise;
    drop that sample); and when every kept product is zero.
    """
    kept: List[Tuple[int, float]] = []   # each sample's best layer and its product
    layers = set()
    for sample in scored_samples(scored, group_size):
        top = max(sample.scores)
        if top == 0.0:
            raise ValueError(
                f"{sample.where}: every candidate has IoU 0, so its IoUs cannot be normalised; drop this sample"
            )
        scaled = [score / top for score in sample.scores]   # the prior is scale-free; huge IoUs stay finite
        total_score = sum(scaled)
        products = [score / total_score * confidence for score, confidence in zip(scaled, sample.confidences)]
        best = max(range(len(products)), key=lambda i: (products[i], -i))  # the first on ties
        layers.update(sample.layers)
        kept.append((sample.layers[best], products[best]))
    largest = max(product for _, product in kept)
    if largest == 0.0:
        raise ValueError("every kept score is 0 (all confidences of the best candidates are 0); no prior can be formed")
    totals = {layer: 0.0 for layer in layers}
    for layer, product in kept:
        totals[layer] += product / largest   # scaled so that huge confidences do not overflow the sum
    grand_total = sum(totals.values())
    return {layer: totals[layer] / grand_total for layer in sorted(totals)}


def prior_to_json(prior: Mapping[int, float], num_samples: Optional[int] = None) -> dict:
    """The JSON object saved by ``python -m hallupatch.prior`` and read by ``layer_prior="prior.json"``."""
    layers = sorted(prior)
    data: Dict[str, Any] = {"layers": layers, "prior": [prior[layer] for layer in layers]}
    if num_samples is not None:
        data["num_samples"] = num_samples
    return data


def layer_weights(pairs: Iterable[Tuple[Any, Any]], source: str = "layer_prior") -> Dict[int, float]:
    """``{layer: weight}`` from ``(layer, weight)`` pairs (e.g. a mapping's items); layers are ints or digit
    strings, as JSON writes the keys of ``{0: p0}``.

    Refuses non-integer or negative layers, a layer given twice (``0`` and ``"0"``), no pairs at all and
    non-finite or non-numeric weights, with a ``ValueError`` naming ``source``.
    """
    weights: Dict[int, float] = {}
    for key, value in pairs:
        if isinstance(key, str) and key.isascii() and key.isdigit():
            layer = int(key)
        elif isinstance(key, int) and not isinstance(key, bool) and key >= 0:
            layer = key
        else:
            raise ValueError(f"{source}: keys must be layer indices (integers >= 0, or strings such as \"0\"); got {key!r}")
        if layer in weights:
            raise ValueError(f"{source}: layer {layer} is given twice")
        weights[layer] = _number(value, f"the weight of layer {layer}", source)
    if not weights:
        raise ValueError(f"{source} has no weights; give one weight per candidate layer")
    return weights


PriorFile = Union[str, os.PathLike]


def load_layer_prior(path: PriorFile) -> Dict[int, float]:
    """Read a prior JSON as ``{layer: weight}``: ``{"layers": [...], "prior": [...]}`` or ``{"0": p0, ...}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"layer prior file not found: {path} (write one with `python -m hallupatch.prior`)")
    expected = ("expected hallupatch's {\"layers\": [...], \"prior\": [...]} (python -m hallupatch.prior) "
                "or the region-caption paper's layer_prob.json {\"0\": p0, \"1\": p1, ...}")
    data = read_json(path)
    if isinstance(data, Mapping) and set(data) >= {"layers", "prior"}:
        layers, weights = data["layers"], data["prior"]
        if not isinstance(layers, list) or not isinstance(weights, list) or len(layers) != len(weights):
            raise ValueError(f"{path}: 'layers' and 'prior' must be lists of equal length; {expected}")
        return layer_weights(zip(layers, weights), str(path))
    if isinstance(data, Mapping) and data:
        return layer_weights(data.items(), str(path))
    raise ValueError(f"{path} is not a layer prior: {expected}")


class _DuplicateKey(Exception):
    """A JSON object with a key given twice (``json`` would keep the last silently)."""


def read_json(path: PriorFile) -> Any:
    """The parsed JSON of ``path``; ``ValueError`` for a file that is not UTF-8 JSON, nests too deeply or
    gives one key twice in an object (a layer's weight given twice)."""
    def refuse_duplicates(pairs):
        keys = [key for key, _ in pairs]
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        if repeated:
            raise _DuplicateKey(f"{path} gives the key(s) {repeated} twice in one object; keep one of each")
        return dict(pairs)

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"), object_pairs_hook=refuse_duplicates)
    except _DuplicateKey as err:
        raise ValueError(str(err)) from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8 JSON") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    except RecursionError:
        raise ValueError(f"{path} nests JSON arrays/objects too deeply to read") from None
