"""``python -m hallupatch.lmms tasks DIR``: write the lab's MME and POPE as local lmms-eval tasks (offline)."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, never a traceback
        self.exit(2, f"error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m hallupatch.lmms", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("tasks", help="write the lab's tasks and data for lmms-eval's --include_path")
    t.add_argument("folder", help="output folder: pass it to lmms-eval as --include_path")
    t.add_argument("--mme-images", type=int, default=100, help="MME images, two questions each (default 100)")
    t.add_argument("--pope-questions", type=int, default=200, help="questions per POPE setting (default 200)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from hallupatch.lmms.tasks import TASKS, write_lab_tasks

    try:
        folder = write_lab_tasks(args.folder, mme_images=args.mme_images, pope_questions=args.pope_questions)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(TASKS)} to {folder}")
    print(f"run: python -m lmms_eval --model hallupatch --model_args pretrained=PATH --include_path {folder} "
          f"--tasks {','.join(TASKS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
