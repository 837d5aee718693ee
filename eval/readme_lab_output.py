"""Regenerate the README's copy of the main job's output from a run.

    python eval/readme_lab_output.py [--from DIR | --render-stored]

Runs ``python -m hallupatch.eval lab`` exactly as the README shows it (default output folder, in a
temporary working folder), or takes the finished run in ``--from DIR`` (whose ``lab_run.json`` must say
it was run with the default output folder), then

* copies the files the screen is rendered from (``lab_run.json``, ``{pope,chair}/comparison.json``,
  ``entropy_profile.json``) and the screen itself (``lab.txt``) to ``tests/data/lab_main_job/``, and
* replaces the README block between ``<!-- lab-output:begin -->`` and ``<!-- lab-output:end -->``
  with ``lab.txt``.

``--render-stored`` runs nothing: it renders the stored files again with today's code (after a change of
the output's format only; the figures stay those of the stored run). ``tests/test_eval_screen.py`` checks that the README block equals the stored ``lab.txt`` and that
today's code renders the stored files into exactly that text. Run from anywhere.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STORED = ROOT / "tests" / "data" / "lab_main_job"
RENDERED_FROM = ("lab_run.json", "pope/comparison.json", "chair/comparison.json", "entropy_profile.json", "lab.txt")
BEGIN, END = "<!-- lab-output:begin -->", "<!-- lab-output:end -->"
DEFAULT_OUTPUT = "hallupatch_output/lab"


def run_main_job(work: Path) -> Path:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("OMP_NUM_THREADS", None)   # the README shows the default thread choice
    subprocess.run([sys.executable, "-m", "hallupatch.eval", "lab", "--no-progress"], cwd=work, env=env, check=True)
    return work / DEFAULT_OUTPUT


def readme_with(text: str, readme: str, begin: str = BEGIN, end: str = END) -> str:
    """``readme`` with the block between the markers ``begin`` and ``end`` replaced by ``text`` in a
    fenced block."""
    start, stop = readme.index(begin), readme.index(end)
    return readme[: start + len(begin)] + "\n```\n" + text.rstrip("\n") + "\n```\n" + readme[stop:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", help="a finished run's output folder (default: run the main job)")
    parser.add_argument("--render-stored", action="store_true", help="re-render the stored run's files, run nothing")
    args = parser.parse_args()
    if args.render_stored:
        sys.path.insert(0, str(ROOT))
        from hallupatch.eval.lab import SCREEN_FILE, render

        (STORED / SCREEN_FILE).write_text(render(STORED) + "\n", encoding="utf-8")
    else:
        store_run(args.source)
    screen = (STORED / "lab.txt").read_text(encoding="utf-8")
    readme = ROOT / "README.md"
    readme.write_text(readme_with(screen, readme.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"{STORED} and the README block updated ({len(screen.splitlines())} lines)")


def store_run(source) -> None:
    """Copy the files of the run in ``source`` (default: a fresh main job) to :data:`STORED`."""
    with tempfile.TemporaryDirectory() as work:
        source = Path(source) if source else run_main_job(Path(work))
        facts = json.loads((source / "lab_run.json").read_text(encoding="utf-8"))
        if facts["output"] != DEFAULT_OUTPUT:
            raise SystemExit(f"{source} was run with --output {facts['output']}; the README shows the default "
                             f"({DEFAULT_OUTPUT})")
        for name in RENDERED_FROM:
            (STORED / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, STORED / name)


if __name__ == "__main__":
    main()
