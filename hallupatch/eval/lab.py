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
from typing import Any, Dict, List, Mapping

from hallupatch.eval.embedded import LAB, LAB_MEMVR_WINDOW, lab_backend
from hallupatch.eval.harness import SCREEN_WIDTH, Variant
from hallupatch.eval.models import THREADS_HELP, choose_threads
from hallupatch.eval.stats import wilson_interval
from hallupatch.methods.opera import FAST as OPERA_FAST

BENCHMARKS = ("pope", "chair")
DEFAULT_OUTPUT = Path("hallupatch_output") / "lab"
DEV_QUESTIONS = 100          # dev questions per threshold when choosing MemVR's threshold
CAPTION_IMAGES = 100         # lab CHAIR images captioned per method
PROFILE_QUESTIONS = 100      # questions per POPE split for the entropy profile
ENTROPY_CEILING = math.log(2) / math.log(10)   # normalised top-10 entropy once the mass is on {yes, no}
SUMMARY = "every method on the lab (POPE and CHAIR, test split), side by side, with a plot"
SCREEN_FILE = "lab.txt"      # what the suite printed
FACTS_FILE = "lab_run.json"  # what its header says about the run
#: in ``eval lab --full`` only, so that the main job stays under 3 minutes on two busy cores: the settings
#: that explain a method rather than compare it (MemVR firing at once, DoLa with the final norm, OPERA's fast
#: setting) and OPERA (a 5-beam search with a forward of every candidate: the full run's largest share)
DIAGNOSTIC = ("memvr threshold 0", "dola low +norm", "dola high +norm", "opera", "opera fast")


def variants(dev_threshold: float, full: bool = True) -> Dict[str, Variant]:
    """The settings compared (labels -> variants); MemVR checks after the lab's layers 1..4.

    Each method at its published knobs (MemVR also at its dev-chosen threshold, layer contrast also at
    the high layers); ``full`` adds :data:`DIAGNOSTIC` (OPERA and the diagnostic settings), which the main
    job leaves out to stay quick (``eval lab --full`` runs them)."""
    window = dict(LAB_MEMVR_WINDOW)
    chosen = {
        "none": Variant("none"),
        "memvr": Variant("memvr", window),                                  # published threshold 0.75
        "memvr threshold 0": Variant("memvr", {**window, "entropy_threshold": 0.0}),  # fires at once
        f"memvr threshold {dev_threshold:g} (dev)": Variant("memvr", {**window, "entropy_threshold": dev_threshold}),
        "dola low": Variant("dola", {"candidate_layers": "low"}),           # published: no final norm
        "dola high": Variant("dola", {"candidate_layers": "high"}),
        "dola low +norm": Variant("dola", {"candidate_layers": "low", "early_exit_norm": True}),
        "dola high +norm": Variant("dola", {"candidate_layers": "high", "early_exit_norm": True}),
        "memvr+dola": Variant("memvr+dola", {**window, "entropy_threshold": dev_threshold, "candidate_layers": "low"}),
        "vcd": Variant("vcd", {"noise_seed": 0}),   # published alpha 1, beta 0.1, step 500; noise fixed per run
        "icd": Variant("icd"),
        "m3id": Variant("m3id"),
        "pai": Variant("pai", dict(LAB.method_knobs["pai"])),   # end_layer = the lab's depth; published alpha, gamma
        "opera": Variant("opera"),                                          # published knobs, 5 beams
        "opera fast": Variant("opera", dict(OPERA_FAST)),                   # threshold 25, 1 candidate
    }
    return chosen if full else {label: v for label, v in chosen.items() if label not in DIAGNOSTIC}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="a lab checkpoint folder (python -m hallupatch.lab train --out DIR); "
                        "default: the one shipped in the package")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help=f"results folder (default {DEFAULT_OUTPUT})")
    parser.add_argument("--limit", type=int, help="only the first N questions of each benchmark (and of the "
                        "dev split for MemVR's threshold)")
    parser.add_argument("--threshold", type=float, help="MemVR's tuned threshold (default: chosen on the dev split)")
    parser.add_argument("--overwrite", action="store_true", help="discard previous answers instead of resuming")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-plot", action="store_true", help="no lab.png")
    parser.add_argument("--threads", type=int, help=THREADS_HELP)
    parser.add_argument("--full", action="store_true", help="also OPERA and the diagnostic settings: " + ", ".join(DIAGNOSTIC))


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


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Run the suite; returns ``{benchmark: {"methods": ..., "comparison": ...}, "dev_threshold": t}``.

    It prints one screen: a header (model, data, decoding, MemVR's dev choice, each setting's knobs), one
    comparison table per benchmark, MemVR's entropy profile and where the details are. That text is a
    function of the output folder (:func:`render`; the run's facts in ``lab_run.json``) and is also
    written to ``<output>/lab.txt``; each setting's own tables are in its folder's ``report.txt``."""
    from hallupatch.eval import cli
    from hallupatch.eval.store import check_output_folder, write_json

    for flag in ("limit", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag} must be >= 1; got {value}")
    out = Path(args.output)
    check_output_folder(out)
    backend = lab_backend(args.model)
    threads = choose_threads(backend.model, args.threads)
    dev_questions = min(args.limit or DEV_QUESTIONS, DEV_QUESTIONS)
    threshold = args.threshold if args.threshold is not None else \
        choose_threshold(out, backend, dev_questions, args.overwrite)
    chosen = variants(threshold, full=args.full)
    facts = run_facts(args, backend, threads, threshold, dev_questions, chosen)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / FACTS_FILE, facts)
    print(render_header(facts), flush=True)

    shared = [*(["--limit", str(args.limit)] if args.limit else []), *(["--overwrite"] if args.overwrite else []),
              *(["--no-progress"] if args.no_progress else []), "--batch-size", str(LAB.batch_size)]
    results: Dict[str, Any] = {"dev_threshold": threshold}
    for benchmark in BENCHMARKS:
        tokens = LAB.max_new_tokens(free_text=benchmark == "chair")
        extra = ["--max-new-tokens", str(tokens), *(["--num-images", str(CAPTION_IMAGES)] if benchmark == "chair" else [])]
        with contextlib.redirect_stdout(io.StringIO()):   # its table is part of the screen rendered below
            results[benchmark] = cli.run([benchmark, "--output", str(out / benchmark), *extra, *shared],
                                         backend=backend, variants=chosen)
    profile = entropy_profile(backend, args.limit or PROFILE_QUESTIONS)
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
        f"hallupatch eval lab: {SUMMARY}",
        f"model     {facts['model']}: {facts['parameters'] / 1e6:.1f}M parameters, {facts['dtype']} on "
        f"{facts['device']}",
        f"threads   {facts['threads']}",
        "data      the lab's test split: POPE (random, popular, adversarial) and CHAIR captions",
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
    from hallupatch.eval.tasks import get_task

    shown = Path(facts["output"])   # paths as the user gave them
    blocks = []
    for benchmark in BENCHMARKS:
        comparison = json.loads((Path(out) / benchmark / "comparison.json").read_text(encoding="utf-8"))
        blocks.append(format_comparison(comparison, get_task(benchmark).screen_columns) + "\n"
                      + details_line(shown / benchmark))
    profile = json.loads((Path(out) / "entropy_profile.json").read_text(encoding="utf-8"))
    blocks.append(
        "MemVR's trigger signal: normalised top-10 entropy on the POPE answers, mean / max after each\n"
        f"0-based decoder layer (published threshold 0.75; ceiling log 2 / log 10 = {ENTROPY_CEILING:.3f})\n  "
        + "   ".join(f"{layer}: {v['mean']:.3f} / {v['max']:.3f}" for layer, v in profile.items()))
    files = [*(["lab.png"] if facts["plot"] else []), "entropy_profile.json", "dev_threshold.json", SCREEN_FILE]
    blocks.append(f"files: {', '.join(files)} in {shown}")
    return "\n" + "\n\n".join(blocks)


def entropy_profile(backend, questions: int) -> Dict[str, Dict[str, float]]:
    """MemVR's trigger signal after each checked layer on the answer's pass of lab POPE questions
    (test split: adversarial and random), as ``{layer: {"mean", "max"}}``."""
    from hallupatch.lab import questions as lab_questions
    from hallupatch.lab.measure import entropy_profile as measure_profile

    qs = lab_questions.pope_questions("test", "adversarial", questions) + \
        lab_questions.pope_questions("test", "random", questions)
    profile = measure_profile(backend.model, backend.processor, qs)
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
    """The ``lab.png`` figure: POPE accuracy per split with 95% Wilson intervals; CHAIR's change against the
    baseline with the 95% bootstrap interval of that paired difference; MemVR's entropy profile on the
    yes/no answers; after which decoder layer MemVR fired; which hidden state DoLa contrasted. Every layer
    axis names its convention (0-based decoder layer, or hidden-state index) and has integer ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from hallupatch.eval.scoring import parse_pope_answer

    pope, chair = results["pope"]["comparison"], results["chair"]["comparison"]
    pope_dirs = _folders(out, "pope", pope)
    labels = list(pope["methods"])
    baseline = chair["baseline"]
    fig = plt.figure(figsize=(16, 10))
    grid = fig.add_gridspec(2, 6)

    ax = fig.add_subplot(grid[0, :3])
    splits = ("random", "popular", "adversarial")
    width = 0.8 / len(splits)
    for k, split in enumerate(splits):
        values, errors = [], [[], []]
        for label in labels:
            rows = [r for r in _answers(pope_dirs[label]) if r["group"] == split]
            right = sum(parse_pope_answer(r["text"]) == r["answer"] for r in rows)
            low, high = wilson_interval(right, len(rows))
            acc = right / len(rows) if rows else float("nan")
            values.append(100 * acc)
            errors[0].append(100 * (acc - low))
            errors[1].append(100 * (high - acc))
        ax.bar([i + k * width for i in range(len(labels))], values, width, yerr=errors, capsize=2, label=split)
    ax.set_xticks([i + width for i in range(len(labels))], labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0, 118)   # room for the legend above the bars
    ax.set_ylabel("POPE accuracy (%), 95% Wilson interval")
    ax.set_title("POPE on the lab (test split)")
    ax.legend(fontsize=8, loc="upper center", ncol=len(splits))

    ax = fig.add_subplot(grid[0, 3:])
    others = [label for label in chair["methods"] if label != baseline]
    metrics = ("CHAIRs", "CHAIRi")
    for k, metric in enumerate(metrics):
        changes, errors = [], [[], []]
        for label in others:
            entry = chair["methods"][label]
            change = entry["difference"][metric]
            low, high = entry["test"][metric]["ci95"] if metric in entry.get("test", {}) else (change, change)
            changes.append(change)
            errors[0].append(0.0 if math.isnan(low) else max(0.0, change - low))
            errors[1].append(0.0 if math.isnan(high) else max(0.0, high - change))
        ax.bar([i + k * 0.4 for i in range(len(others))], changes, 0.4, yerr=errors, capsize=2, label=metric)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks([i + 0.2 for i in range(len(others))], others, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(f"change against {baseline} (points)")
    ax.set_title(f"CHAIR on the lab captions: method minus {baseline},\n95% paired bootstrap interval "
                 "(lower is fewer hallucinated objects)", fontsize=10)
    ax.legend(fontsize=8)

    ax = fig.add_subplot(grid[1, :2])
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

    memvr = {label: [l for r in _answers(pope_dirs[label]) for l in r.get("memvr", {}).get("trigger_layers", [])
                     if l is not None] for label in labels}
    dola = {label: [l for r in _answers(pope_dirs[label]) for l in r.get("dola_layers", [])] for label in labels}
    _layer_dots(fig.add_subplot(grid[1, 2:4]), {k: v for k, v in memvr.items() if any(
        "memvr" in r for r in _answers(pope_dirs[k]))}, "0-based decoder layer MemVR fired after",
        "Where MemVR fired (POPE)", MaxNLocator)
    _layer_dots(fig.add_subplot(grid[1, 4:]), {k: v for k, v in dola.items() if any(
        "dola_layers" in r for r in _answers(pope_dirs[k]))}, "premature layer (hidden-state index)",
        "Which layer DoLa contrasted (POPE)", MaxNLocator)

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
