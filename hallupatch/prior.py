"""Layer-importance prior from scored candidates (DESIGN §4d), and its command line.

    python -m hallupatch.prior SCORED.json -o prior.json

``SCORED.json`` is a JSON list with one entry per sample (or ``{"samples": [...]}``)::

    {"id": "img1", "candidates": [{"layer": 16, "iou": 0.62, "confidence": 0.9}, {"layer": 18, "iou": 0.4}]}

``confidence`` is the scorer's confidence for that candidate (default: the sample's ``confidence``
if given, else 1). Per sample the IoUs are normalised to sum to 1 and multiplied by the confidences;
the candidate with the largest product is kept (its layer and that product); the prior of a layer is
the sum of the kept products for that layer over the sum for all layers. ``prior.json`` holds
``{"layers": [...], "prior": [...]}`` (every layer that appeared, in ascending order) and is what
``hallupatch.apply(model, method="dola", layer_prior="prior.json")`` reads.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence


def _number(value: Any, what: str, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {what} must be a number; got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{where}: {what} must be finite; got {value!r}")
    return number


def _samples(scored: Any) -> List[Mapping[str, Any]]:
    if isinstance(scored, Mapping) and "samples" in scored:
        scored = scored["samples"]
    if not isinstance(scored, (list, tuple)):
        raise ValueError("scored samples must be a list (or {'samples': [...]}) of {'candidates': [...]} entries")
    if not scored:
        raise ValueError("no scored samples: the prior needs at least one sample with candidates")
    return list(scored)


def estimate_layer_prior(scored: Any) -> Dict[int, float]:
    """The layer-importance prior ``{layer: weight}`` (weights sum to 1) from scored samples.

    ``scored``: a list of ``{"candidates": [{"layer": int, "iou": float in [0, 1], "confidence": float >= 0}, ...]}``
    (see the module docstring; :meth:`hallupatch.candidates.RankedSample.to_scored` writes one entry).
    Raises ``ValueError`` naming the sample for: no candidates, a repeated layer, an IoU outside
    [0, 1], a negative confidence, or IoUs that are all zero (nothing to normalise; drop that sample);
    and when every kept score is zero.
    """
    totals: Dict[int, float] = {}
    for index, sample in enumerate(_samples(scored)):
        if not isinstance(sample, Mapping):
            raise ValueError(f"sample {index} must be an object with 'candidates'; got {sample!r}")
        where = f"sample {index}" + (f" (id {sample['id']!r})" if "id" in sample else "")
        candidates = sample.get("candidates")
        if not candidates:
            raise ValueError(f"{where} has no candidates; every sample needs at least one scored candidate")
        default_confidence = _number(sample.get("confidence", 1.0), "confidence", where)
        layers, ious, confidences = [], [], []
        for candidate in candidates:
            layer = candidate.get("layer") if isinstance(candidate, Mapping) else None
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise ValueError(f"{where}: each candidate needs an integer 'layer' >= 0; got {candidate!r}")
            if layer in layers:
                raise ValueError(f"{where}: layer {layer} appears twice")
            iou = _number(candidate.get("iou"), "iou", where)
            if not 0.0 <= iou <= 1.0:
                raise ValueError(f"{where}: iou must lie in [0, 1]; got {iou} for layer {layer}")
            confidence = _number(candidate.get("confidence", default_confidence), "confidence", where)
            if confidence < 0:
                raise ValueError(f"{where}: confidence must be >= 0; got {confidence} for layer {layer}")
            layers.append(layer)
            ious.append(iou)
            confidences.append(confidence)
        total_iou = sum(ious)
        if total_iou == 0.0:
            raise ValueError(
                f"{where}: every candidate has IoU 0, so its IoUs cannot be normalised; drop this sample"
            )
        products = [iou / total_iou * conf for iou, conf in zip(ious, confidences)]
        best = max(range(len(layers)), key=lambda i: (products[i], -i))
        for layer in layers:
            totals.setdefault(layer, 0.0)
        totals[layers[best]] += products[best]
    grand_total = sum(totals.values())
    if grand_total == 0.0:
        raise ValueError("every kept score is 0 (all confidences of the best candidates are 0); no prior can be formed")
    return {layer: totals[layer] / grand_total for layer in sorted(totals)}


def prior_to_json(prior: Mapping[int, float], num_samples: Optional[int] = None) -> dict:
    """The JSON object saved by the CLI and read by ``layer_prior="prior.json"``."""
    layers = sorted(prior)
    data: Dict[str, Any] = {"layers": layers, "prior": [prior[layer] for layer in layers]}
    if num_samples is not None:
        data["num_samples"] = num_samples
    return data


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hallupatch.prior",
        description="Estimate a layer-importance prior for layer-contrast decoding from scored candidates.",
    )
    parser.add_argument("scored", type=Path, help="JSON list of samples with scored candidates (layer, iou, confidence)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="where to write prior.json")
    args = parser.parse_args(argv)
    if not args.scored.is_file():
        parser.exit(2, f"error: scored file not found: {args.scored}\n")
    try:
        scored = json.loads(args.scored.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        parser.exit(2, f"error: {args.scored} is not valid JSON: {err}\n")
    try:
        prior = estimate_layer_prior(scored)
    except ValueError as err:
        parser.exit(1, f"error: {args.scored}: {err}\n")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(prior_to_json(prior, len(_samples(scored))), indent=2) + "\n", encoding="utf-8")
    _print_table(prior.items())
    print(f"wrote {args.output}")
    return 0


def _print_table(rows: Iterable) -> None:
    print(f"{'layer':>6}  {'prior':>8}")
    for layer, weight in rows:
        print(f"{layer:>6}  {weight:>8.4f}")


if __name__ == "__main__":
    sys.exit(main())
