"""``python -m hallupatch.lab train|measure|write``: train the lab model, measure it, write its data."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from hallupatch.names import SuggestingParser


class _Parser(SuggestingParser):
    def error(self, message):  # one line and exit 2, as argparse does, never a traceback
        self.exit(2, f"error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m hallupatch.lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("train", help="train the lab model into a checkpoint folder (resumable)")
    t.add_argument("--out", required=True, help="output folder (a from_pretrained checkpoint; resumes a killed run)")
    t.add_argument("--quick", action="store_true", help="a few tiny steps (tests)")
    t.add_argument("--seed", type=int, default=0, help="model initialisation seed (default 0 = the shipped checkpoint)")
    t.add_argument("--threads", type=int, default=2,
                   help="torch CPU threads (results depend on it; default 2, as the shipped checkpoint: ~26 min on "
                        "2 idle cores; on a busy machine use 1)")
    t.add_argument("--vision-steps", type=int, help="override the vision stage's steps")
    t.add_argument("--language-steps", type=int, help="override the language stage's steps")
    t.add_argument("--overwrite", action="store_true",
                   help="discard a previous training in --out (finished or not) and train afresh")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    m = sub.add_parser("measure", help="print the lab's figures (accuracy, planted hallucination, methods)")
    m.add_argument("--model", help="checkpoint folder (default: the shipped one)")
    m.add_argument("--questions", type=int, default=200, help="questions per POPE split and set (default 200)")
    m.add_argument("--captions", type=int, default=100, help="captions per set (default 100)")
    m.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    m.add_argument("--skip-methods", action="store_true", help="only the plain model's figures")
    w = sub.add_parser("write", help="write lab data in a benchmark's official layout")
    w.add_argument("benchmark", choices=["mme", "pope", "weak", "coco"],
                   help="weak: the second planted cause (weak.jsonl, full.jsonl: POPE's format)")
    w.add_argument("--out", required=True)
    w.add_argument("--split", default="test", choices=["dev", "test", "heldout"],
                   help="heldout: fresh scenes built exactly as test's (default test)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            from dataclasses import replace

            from hallupatch.lab.train import TrainConfig, train

            config = TrainConfig.quick(args.seed) if args.quick else TrainConfig(seed=args.seed)
            if args.vision_steps is not None:
                config = replace(config, vision_steps=args.vision_steps)
            if args.language_steps is not None:
                config = replace(config, language_steps=args.language_steps)
            out = train(args.out, config, threads=args.threads, progress=not args.no_progress,
                        overwrite=args.overwrite)
            print(f"checkpoint: {out}")
        elif args.command == "measure":
            from hallupatch.lab.measure import measure

            measure(args.model, questions=args.questions, captions=args.captions, threads=args.threads,
                    methods=not args.skip_methods)
        else:
            from hallupatch.lab import writers

            writer = {"mme": writers.write_mme, "pope": writers.write_pope, "weak": writers.write_weak,
                      "coco": writers.write_coco}[args.benchmark]
            print(writer(args.out, split=args.split))
    except (ValueError, TypeError, FileNotFoundError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = "; rerun the same command to resume from the last saved step" if args.command == "train" else ""
        print(f"interrupted{resume}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
