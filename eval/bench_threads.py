"""The main job's wall time on busy cores: torch's default threads against hallupatch's choice.

    python eval/bench_threads.py [--limit N] [--repeats R] [--spinners K] [--only before|after]

Starts K processes that spin on a core each (default: one per core), then runs the main job,
``python -m hallupatch.eval lab`` (fresh output folder, no plot, no progress bar), alternately

* before: ``--threads T``, T = torch's default intra-op threads (one per core), what every run used
  before the eval chose its threads;
* after: no flag, the eval's own choice (one thread for the small lab model),

``R`` times each, interleaved, and prints the wall times side by side with their medians and ratio, and
``uptime`` before and after (the machine may be shared). ``OMP_NUM_THREADS`` is removed from the jobs'
environment so that the eval's default is what runs. ``--limit N`` answers the first N questions of
each benchmark to keep a run short; ``--only after`` times the full job the new way alone (the "before" of
a full job takes many minutes on busy cores). Run from the repository root.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPIN = "while True:\n    pass\n"


def job_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def torch_default_threads() -> int:
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                         env=job_env(), capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def main_job(extra: list, limit, work: Path) -> float:
    """Wall time (s) of one main job into a fresh folder under ``work``."""
    output = Path(tempfile.mkdtemp(dir=work))
    command = [sys.executable, "-m", "hallupatch.eval", "lab", "--output", str(output), "--no-plot",
               "--no-progress", *(["--limit", str(limit)] if limit else []), *extra]
    start = time.perf_counter()
    subprocess.run(command, env=job_env(), cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, help="first N questions of each benchmark (default: the full job)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--spinners", type=int, default=os.cpu_count(), help="busy processes (default: one per core)")
    parser.add_argument("--only", choices=["before", "after"], help="time one setting only")
    args = parser.parse_args()

    before_threads = torch_default_threads()
    settings = {"before": ["--threads", str(before_threads)], "after": []}
    if args.only:
        settings = {args.only: settings[args.only]}
    print(f"uptime before: {uptime()}")
    print(f"{args.spinners} spinning process(es); before = --threads {before_threads} (torch's default), "
          "after = the eval's choice; limit " + (str(args.limit) if args.limit else "none (the full job)"))
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(args.spinners)]
    times = {name: [] for name in settings}
    try:
        with tempfile.TemporaryDirectory() as work:
            for repeat in range(args.repeats):
                order = list(settings) if repeat % 2 == 0 else list(reversed(settings))
                for name in order:
                    seconds = main_job(settings[name], args.limit, Path(work))
                    times[name].append(seconds)
                    print(f"  repeat {repeat + 1}, {name}: {seconds:.1f} s", flush=True)
    finally:
        for process in spinners:
            process.kill()
            process.wait()
    print(f"uptime after:  {uptime()}")
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"{'':10}" + "".join(f"{name:>12}" for name in medians) + (f"{'before / after':>18}" if len(medians) == 2 else ""))
    print(f"{'median s':10}" + "".join(f"{m:>12.1f}" for m in medians.values())
          + (f"{medians['before'] / medians['after']:>18.2f}" if len(medians) == 2 else ""))


if __name__ == "__main__":
    main()
