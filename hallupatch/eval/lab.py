"""``python -m hallupatch.eval lab``: every method on the lab, side by side.

The lab model (``hallupatch.lab``) hallucinates for a known reason: in training, a trigger object brings
its partner in most scenes and some labelled objects are not drawn, so the language model learned to
guess an unseen partner. This suite runs the lab's POPE and CHAIR (test split, written in the official
layouts) through the harness once per method setting, with the paired comparison of each benchmark,
and draws the figures (scores with 95% intervals, MemVR's entropy profile and trigger layers, DoLa's
premature layers) into ``lab.png``. MemVR's threshold is chosen on the **dev** split first.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import textwrap
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Type

from hallupatch.eval.embedded import LAB, lab_backend
from hallupatch.eval.harness import SCREEN_WIDTH, Variant
from hallupatch.eval.models import THREADS_HELP, choose_threads
from hallupatch.eval.tasks import Task, registered_tasks
from hallupatch.lab.settings import variants   # the settings compared are the lab's

DEFAULT_OUTPUT = Path("hallupatch_output") / "lab"
DEV_QUESTIONS = 100          # dev questions per threshold when choosing MemVR's threshold
PROFILE_QUESTIONS = 100      # questions per POPE split for the entropy profile
ENTROPY_CEILING = math.log(2) / math.log(10)   # normalised top-10 entropy once the mass is on {yes, no}
SCREEN_FILE = "lab.txt"      # what the suite printed
FACTS_FILE = "lab_run.json"  # what its header says about the run


def lab_tasks() -> Dict[str, Type[Task]]:
    """The benchmarks the suite runs: every registered task that declares its part in the lab
    (``Task.lab_options``), in the registry's order."""
    return {name: task for name, task in registered_tasks().items() if task.lab_options is not None}


def summary(split: str = "test") -> str:
    """The screen's first line: what the suite runs."""
    return (f"every method on the lab ({' and '.join(task.title for task in lab_tasks().values())}, {split} split), "
            "side by side, with a plot")


SUMMARY = summary()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="a lab checkpoint folder (python -m hallupatch.lab train --out DIR); "
                        "default: the one shipped in the package")
    parser.add_argument("--output", help=f"results folder (default {DEFAULT_OUTPUT}, {DEFAULT_OUTPUT}-heldout with "
                        f"--split heldout, {DEFAULT_OUTPUT}-study with --full)")
    parser.add_argument("--limit", type=int, help="only the first N questions of each benchmark (and of the "
                        "dev split for MemVR's threshold)")
    parser.add_argument("--threshold", type=float, help="MemVR's tuned threshold (default: chosen on the dev split)")
    parser.add_argument("--overwrite", action="store_true", help="discard previous answers instead of resuming")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-plot", action="store_true", help="no lab.png")
    parser.add_argument("--threads", type=int, help=THREADS_HELP)
    parser.add_argument("--split", default="test", choices=["test", "heldout"],
                        help="the lab's scenes to evaluate on: test, or heldout (fresh scenes built as test's, to "
                        "check that a finding replicates); knobs are always chosen on dev (default test)")
    parser.add_argument("--full", action="store_true", help="the powered study instead of the main job: every "
                        "method (OPERA included) with knobs chosen on dev, on every shipped training seed, on both "
                        "planted causes, with question counts sized for power (see the README)")
    parser.add_argument("--seeds", type=_seed_list, help="with --full: only these shipped seeds, e.g. 1 or 0,2 (run "
                        "one process per seed in parallel into the same --output, then once without --seeds for "
                        "the table)")


def _seed_list(text: str) -> List[int]:
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers, e.g. 0,2; got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds names a seed twice: {text!r}")
    return seeds


def choose_threshold(out: Path, backend, questions: int = DEV_QUESTIONS, overwrite: bool = False) -> float:
    """MemVR's threshold with the best adversarial accuracy on ``questions`` of the lab's dev split, saved
    with the model it was chosen for, so a rerun resumes with the same choice; ``overwrite`` or another
    number of dev questions chooses afresh, and a saved choice for another model is refused (``StoreError``)."""
    from hallupatch.eval.store import StoreError

    saved = out / "dev_threshold.json"
    if saved.is_file() and not overwrite:
        try:
            stored = json.loads(saved.read_text(encoding="utf-8"))
            threshold = float(stored["threshold"])
        except (ValueError, KeyError, TypeError) as err:
            raise StoreError(f"{saved} is damaged ({err}); pass --overwrite to choose the threshold again") from None
        if stored.get("model", backend.name) != backend.name:
            raise StoreError(f"{out} holds a run of another model ({stored['model']}, now {backend.name}): its "
                             "dev-chosen threshold does not apply; use another --output, or pass --overwrite to "
                             "discard that run")
        if stored.get("questions") == questions:
            return threshold
    from hallupatch.lab.measure import choose_threshold as on_dev

    threshold, scores = on_dev(backend.model, backend.processor, questions)
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps({"threshold": threshold, "model": backend.name,
                                 "dev_adversarial_accuracy": {str(k): v for k, v in scores.items()},
                                 "questions": questions}, indent=2) + "\n", encoding="utf-8")
    return float(threshold)


def run(args: argparse.Namespace, run_benchmark: Callable[..., Any]) -> Dict[str, Any]:
    """Run the suite; returns ``{benchmark: {"methods": ..., "comparison": ...}, "dev_threshold": t}``.

    ``run_benchmark``: the command line's runner of one benchmark (``hallupatch.eval.cli.run``: argv,
    ``backend``, ``variants``), passed in by the command line, which lists this suite among its commands.

    It prints one screen: a header (model, data, decoding, MemVR's dev choice, each setting's knobs), one
    comparison table per benchmark, MemVR's entropy profile and where the details are. That text is a
    function of the output folder (:func:`render`; the run's facts in ``lab_run.json``) and is also
    written to ``<output>/lab.txt``; each setting's own tables are in its folder's ``report.txt``."""
    from hallupatch.eval.store import check_output_folder, write_json

    for flag in ("limit", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag} must be >= 1; got {value}")
    if args.full:
        ignored = [flag for flag, given in (("--model", args.model), ("--limit", args.limit),
                                            ("--threshold", args.threshold is not None), ("--no-plot", args.no_plot))
                   if given]
        if ignored:
            raise ValueError(f"{', '.join(ignored)} do(es) not apply to --full (the study runs the shipped seeds, "
                             "sizes its question sets for power and chooses every knob on dev): leave "
                             f"{'it' if len(ignored) == 1 else 'them'} out")
        from hallupatch.eval.lab_study import run_study

        args.output = args.output or f"{DEFAULT_OUTPUT}-study"
        check_output_folder(Path(args.output))
        return run_study(args, run_benchmark)
    if args.seeds is not None:
        raise ValueError("--seeds chooses the seeds of the powered study: use it with --full")
    args.output = args.output or (str(DEFAULT_OUTPUT) if args.split == "test" else f"{DEFAULT_OUTPUT}-{args.split}")
    out = Path(args.output)
    check_output_folder(out)
    backend = lab_backend(args.model)
    threads = choose_threads(backend.model, args.threads)
    dev_questions = min(args.limit or DEV_QUESTIONS, DEV_QUESTIONS)
    threshold = args.threshold if args.threshold is not None else \
        choose_threshold(out, backend, dev_questions, args.overwrite)
    chosen = variants(threshold)
    facts = run_facts(args, backend, threads, threshold, dev_questions, chosen)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / FACTS_FILE, facts)
    print(render_header(facts), flush=True)

    shared = [*(["--lab-split", args.split] if args.split != "test" else []),
              *(["--limit", str(args.limit)] if args.limit else []), *(["--overwrite"] if args.overwrite else []),
              *(["--no-progress"] if args.no_progress else []), "--batch-size", str(LAB.batch_size)]
    results: Dict[str, Any] = {"dev_threshold": threshold}
    for benchmark, task in lab_tasks().items():
        extra = ["--max-new-tokens", str(LAB.max_new_tokens(free_text=task.free_text)), *task.lab_options]
        with contextlib.redirect_stdout(io.StringIO()):   # its table is part of the screen rendered below
            results[benchmark] = run_benchmark([benchmark, "--output", str(out / benchmark), *extra, *shared],
                                               backend=backend, variants=chosen)
    profile = entropy_profile(backend, args.limit or PROFILE_QUESTIONS, args.split)
    (out / "entropy_profile.json").write_text(json.dumps(profile, indent=2) + "\n", encoding="utf-8")
    results["entropy_profile"] = profile
    if not args.no_plot:
        plot(out, results)
    (out / SCREEN_FILE).write_text(render(out) + "\n", encoding="utf-8")
    print(render_results(out, facts))
    return results


def run_facts(args, backend, threads: str, threshold: float, dev_questions: int,
              chosen: Mapping[str, Variant]) -> Dict[str, Any]:
    """What the header says about a run (saved as ``lab_run.json``)."""
    model = backend.model
    return {
        "output": str(args.output),
        "model": str(args.model) if args.model else "the shipped lab checkpoint",
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": backend.device.type,
        "threads": threads,
        **({"split": args.split} if args.split != "test" else {}),
        "limit": args.limit,
        "threshold": threshold,
        "dev_questions": None if args.threshold is not None else dev_questions,
        "settings": {label: dict(v.knobs) for label, v in chosen.items()},
        "plot": not args.no_plot,
    }


def render(out: Path) -> str:
    """The screen of the run in ``out`` (what :func:`run` printed), from its files."""
    facts = json.loads((Path(out) / FACTS_FILE).read_text(encoding="utf-8"))
    return render_header(facts) + "\n" + render_results(out, facts)


def render_header(facts: Mapping[str, Any]) -> str:
    """The lines above the tables: model, data, decoding, MemVR's dev choice and each setting's knobs."""
    if facts["dev_questions"] is None:
        dev = f"MemVR's threshold {facts['threshold']:g}, given with --threshold"
    else:
        dev = (f"MemVR's threshold {facts['threshold']:g}: the best adversarial accuracy on "
               f"{facts['dev_questions']} dev questions")
    lines = [
        f"hallupatch eval lab: {summary(facts.get('split', 'test'))}",
        f"model     {facts['model']}: {facts['parameters'] / 1e6:.1f}M parameters, {facts['dtype']} on "
        f"{facts['device']}",
        f"threads   {facts['threads']}",
        f"data      the lab's {facts.get('split', 'test')} split: "
        f"{' and '.join(task.lab_data for task in lab_tasks().values())}",
        *([f"limit     the first {facts['limit']} questions of each benchmark"] if facts["limit"] else []),
        f"decoding  greedy; {LAB.answer_tokens} new tokens for yes/no, {LAB.caption_tokens} for captions",
        f"dev       {dev}",
        "settings  knobs set here (layers: MemVR's are 0-based decoder layers, DoLa's hidden-state indices)",
    ]
    width = max(len(label) for label in facts["settings"]) + 4
    for label, knobs in facts["settings"].items():
        text = ", ".join(f"{k}={v}" for k, v in knobs.items()) or "-"
        lines.extend(textwrap.wrap(text, SCREEN_WIDTH, initial_indent=f"  {label:<{width - 2}}",
                                   subsequent_indent=" " * width))
    return "\n".join(lines)


def render_results(out: Path, facts: Mapping[str, Any]) -> str:
    """One comparison table per benchmark, MemVR's entropy profile and where the files are."""
    from hallupatch.eval.harness import details_line, format_comparison

    shown = Path(facts["output"])   # paths as the user gave them
    blocks = []
    for benchmark, task in lab_tasks().items():
        comparison = json.loads((Path(out) / benchmark / "comparison.json").read_text(encoding="utf-8"))
        blocks.append(format_comparison(comparison, task.screen_columns) + "\n"
                      + details_line(shown / benchmark))
    profile = json.loads((Path(out) / "entropy_profile.json").read_text(encoding="utf-8"))
    blocks.append(
        "MemVR's trigger signal: normalised top-10 entropy on the POPE answers, mean / max after each\n"
        f"0-based decoder layer (published threshold 0.75; ceiling log 2 / log 10 = {ENTROPY_CEILING:.3f})\n  "
        + "   ".join(f"{layer}: {v['mean']:.3f} / {v['max']:.3f}" for layer, v in profile.items()))
    files = [*(["lab.png"] if facts["plot"] else []), "entropy_profile.json", "dev_threshold.json", SCREEN_FILE]
    blocks.append(f"files: {', '.join(files)} in {shown}")
    return "\n" + "\n\n".join(blocks)


def entropy_profile(backend, questions: int, split: str = "test") -> Dict[str, Dict[str, float]]:
    """MemVR's trigger signal after each checked layer on the answer's pass of lab POPE questions
    (``split``: adversarial and random), as ``{layer: {"mean", "max"}}``."""
    from hallupatch.lab.measure import split_entropy_profile

    profile = split_entropy_profile(backend.model, backend.processor, questions, split)
    return {str(layer): values for layer, values in profile.items()}


# ----------------------------------------------------------------------------------- figures
def _answers(folder: Path) -> List[dict]:
    from hallupatch.eval.store import read_answers

    return read_answers(folder / "answers.jsonl")


def _folders(out: Path, benchmark: str, comparison: Mapping[str, Any]) -> Dict[str, Path]:
    from hallupatch.eval.harness import method_folder_name

    return {label: out / benchmark / method_folder_name(label) for label in comparison["methods"]}


def plot(out: Path, results: Mapping[str, Any]) -> Path:
    """Draw :func:`figure` into ``<out>/lab.png``."""
    import matplotlib.pyplot as plt

    fig = figure(out, results)
    path = out / "lab.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def figure(out: Path, results: Mapping[str, Any]):
    """The ``lab.png`` figure: in the top row each suite task's panel (:meth:`Task.lab_panel`: POPE
    accuracy per split with 95% Wilson intervals; CHAIR's change against the baseline with the 95%
    bootstrap interval of that paired difference); below, MemVR's entropy profile on the yes/no answers,
    after which decoder layer MemVR fired and which hidden state DoLa contrasted (read from the answers of
    the task that declares ``lab_traces``). Every layer axis names its convention (0-based decoder layer,
    or hidden-state index) and has integer ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    tasks = {name: task() for name, task in lab_tasks().items()}
    folders = {name: _folders(out, name, results[name]["comparison"]) for name in tasks}
    traced = next(name for name, task in tasks.items() if task.lab_traces)
    trace_dirs, trace_title = folders[traced], tasks[traced].title
    labels = list(results[traced]["comparison"]["methods"])
    fig = plt.figure(figsize=(16, 10))
    columns = math.lcm(len(tasks), 3)   # the top row: one panel per task; the bottom row: three
    grid = fig.add_gridspec(2, columns)
    span = columns // len(tasks)
    for i, (name, task) in enumerate(tasks.items()):
        task.lab_panel(fig.add_subplot(grid[0, i * span:(i + 1) * span]), results[name]["comparison"], folders[name])

    third = columns // 3
    ax = fig.add_subplot(grid[1, :third])
    profile = results["entropy_profile"]
    layers = sorted(profile, key=int)
    ax.plot([int(l) for l in layers], [profile[l]["mean"] for l in layers], "o-", label="mean")
    ax.plot([int(l) for l in layers], [profile[l]["max"] for l in layers], "s--", label="max")
    ax.axhline(0.75, color="red", linestyle=":", label="published threshold 0.75")
    ax.axhline(ENTROPY_CEILING, color="gray", linestyle="-.", label=f"log 2 / log 10 = {ENTROPY_CEILING:.3f}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("checked after 0-based decoder layer")
    ax.set_ylabel("normalised top-10 entropy")
    ax.set_title("MemVR's trigger signal on POPE answers", fontsize=10)
    ax.legend(fontsize=8)

    memvr = {label: [l for r in _answers(trace_dirs[label]) for l in r.get("memvr", {}).get("trigger_layers", [])
                     if l is not None] for label in labels}
    dola = {label: [l for r in _answers(trace_dirs[label]) for l in r.get("dola_layers", [])] for label in labels}
    _layer_dots(fig.add_subplot(grid[1, third:2 * third]), {k: v for k, v in memvr.items() if any(
        "memvr" in r for r in _answers(trace_dirs[k]))}, "0-based decoder layer MemVR fired after",
        f"Where MemVR fired ({trace_title})", MaxNLocator)
    _layer_dots(fig.add_subplot(grid[1, 2 * third:]), {k: v for k, v in dola.items() if any(
        "dola_layers" in r for r in _answers(trace_dirs[k]))}, "premature layer (hidden-state index)",
        f"Which layer DoLa contrasted ({trace_title})", MaxNLocator)

    fig.tight_layout()
    return fig


def _layer_dots(ax, series: Mapping[str, List[int]], ylabel: str, title: str, locator) -> None:
    """One column of dots per setting: a dot per layer, its area the share of that setting's decisions."""
    names = list(series)
    for i, name in enumerate(names):
        counts: Dict[int, int] = {}
        for layer in series[name]:
            counts[layer] = counts.get(layer, 0) + 1
        total = max(1, len(series[name]))
        ax.scatter([i] * len(counts), list(counts), s=[4 + 200 * c / total for c in counts.values()])
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.yaxis.set_major_locator(locator(integer=True))
    ax.set_ylabel(f"{ylabel}\n(dot area: share of decisions)", fontsize=9)
    ax.set_title(title, fontsize=10)
