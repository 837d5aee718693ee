"""The command line of the layer prior (a module of its own, so ``python -m hallupatch.prior`` does not run
a module the package has already imported)::

    python -m hallupatch.prior SCORED.json -o prior.json

``SCORED.json``: hallupatch's scored candidates (``scored_candidates.json`` of ``hallupatch.eval``,
``[r.to_scored() for r in ranked]``), or the region-caption paper's ``sampled_captions.json`` /
``scores_*.json`` as shipped. Every error is one ``error:`` line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterable, NoReturn, Optional, Sequence, Tuple

from hallupatch.prior import estimate_layer_prior, prior_to_json, read_json, scored_samples


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hallupatch.prior",
        description="Estimate a layer-importance prior for layer-contrast decoding from scored candidates "
                    "(hallupatch's scored JSON, or the region-caption paper's sampled_captions.json / scores_*.json).",
    )
    parser.add_argument("scored", type=Path, help="JSON of scored candidates (layer, iou, confidence or sam_score)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="where to write prior.json")
    parser.add_argument("--group-size", type=int, metavar="N",
                        help="sampled_captions.json only: every N consecutive entries are one region, as "
                             "calculate_prob.py groups them (4 there); default: one region per run of one image_id")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def fail(message: str) -> NoReturn:
        parser.exit(2, f"error: {message}\n")

    if not args.scored.is_file():
        fail(f"scored file not found: {args.scored}")
    if args.output.is_dir():
        fail(f"--output {args.output} is a directory; give the path of the prior JSON to write, e.g. {args.output / 'prior.json'}")
    try:
        scored = read_json(args.scored)
    except ValueError as err:  # not UTF-8, not JSON, nested too deeply: the message names the file
        fail(str(err))
    try:
        prior = estimate_layer_prior(scored, group_size=args.group_size)
    except ValueError as err:
        fail(f"{args.scored}: {err}")
    text = json.dumps(prior_to_json(prior, len(scored_samples(scored, args.group_size))), indent=2) + "\n"
    try:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")
    except OSError as err:
        fail(f"cannot write --output {args.output}: {err.strerror or err}")
    _print_table(prior.items())
    print(f"wrote {args.output}")
    return 0


def _print_table(rows: Iterable[Tuple[int, float]]) -> None:
    print(f"{'layer':>6}  {'prior':>8}")
    for layer, weight in rows:
        print(f"{layer:>6}  {weight:>8.4f}")
