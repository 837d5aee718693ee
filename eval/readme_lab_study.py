"""Regenerate the README's tables of the powered lab study from a finished run.

    python -m hallupatch.eval lab --full --output DIR                  # once per split (resumable),
    python -m hallupatch.eval lab --full --output DIR --split heldout  # or one process per seed: --seeds 1
    python eval/readme_lab_study.py --from DIR [--render-stored]

Copies ``<DIR>/{test,heldout}-study.json`` (the counts every figure of the table is computed from) to
``tests/data/lab_study/`` and replaces the README blocks between ``<!-- lab-study-<split>:begin -->`` and
``<!-- lab-study-<split>:end -->`` with the table today's code renders from them. ``--render-stored``
copies nothing (after a change of the table's format only). ``tests/test_lab_study.py`` checks that each
README block is exactly what today's code renders from the stored file. Run from anywhere.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STORED = ROOT / "tests" / "data" / "lab_study"
SPLITS = ("test", "heldout")


def markers(split: str):
    return f"<!-- lab-study-{split}:begin -->", f"<!-- lab-study-{split}:end -->"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", help="a finished study's --output folder")
    parser.add_argument("--render-stored", action="store_true", help="re-render the stored files, copy nothing")
    args = parser.parse_args()
    if not args.render_stored and not args.source:
        parser.error("give --from DIR (a finished study) or --render-stored")
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "eval"))
    from hallupatch.eval.lab_study import STUDY_FILE, render
    from readme_lab_output import readme_with

    STORED.mkdir(parents=True, exist_ok=True)
    readme_path = ROOT / "README.md"
    readme = readme_path.read_text(encoding="utf-8")
    for split in SPLITS:
        stored = STORED / f"{split}-{STUDY_FILE}"
        if not args.render_stored:
            shutil.copyfile(Path(args.source) / f"{split}-{STUDY_FILE}", stored)
        table = render(json.loads(stored.read_text(encoding="utf-8")))
        readme = readme_with(table, readme, *markers(split))
    readme_path.write_text(readme, encoding="utf-8")
    print(f"{STORED} and the README's study tables updated")


if __name__ == "__main__":
    main()
