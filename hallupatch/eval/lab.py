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
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from hallupatch.eval.embedded import LAB, LAB_MEMVR_WINDOW, lab_backend
from hallupatch.eval.harness import Variant
from hallupatch.eval.stats import wilson_interval

BENCHMARKS = ("pope", "chair")
DEFAULT_OUTPUT = Path("hallupatch_output") / "lab"
DEV_QUESTIONS = 100          # dev questions per threshold when choosing MemVR's threshold
CAPTION_IMAGES = 100         # lab CHAIR images captioned per method
PROFILE_QUESTIONS = 100      # questions per POPE split for the entropy profile
ENTROPY_CEILING = math.log(2) / math.log(10)   # normalised top-10 entropy once the mass is on {yes, no}
SUMMARY = "every method on the lab (POPE and CHAIR, test split), side by side, with a plot"


def variants(dev_threshold: float) -> Dict[str, Variant]:
    """The settings compared (labels -> variants); MemVR checks after the lab's layers 1..4."""
    window = dict(LAB_MEMVR_WINDOW)
    return {
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
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="a lab checkpoint folder (python -m hallupatch.lab train --out DIR); "
                        "default: the one shipped in the package")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help=f"results folder (default {DEFAULT_OUTPUT})")
    parser.add_argument("--limit", type=int, help="only the first N questions of each benchmark")
    parser.add_argument("--threshold", type=float, help="MemVR's tuned threshold (default: chosen on the dev split)")
    parser.add_argument("--overwrite", action="store_true", help="discard previous answers instead of resuming")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-plot", action="store_true", help="no lab.png")


def choose_threshold(out: Path, backend) -> float:
    """MemVR's threshold with the best adversarial accuracy on the lab's dev split (saved, so a rerun
    resumes with the same choice)."""
    saved = out / "dev_threshold.json"
    if saved.is_file():
        return float(json.loads(saved.read_text(encoding="utf-8"))["threshold"])
    from hallupatch.lab.measure import choose_threshold as on_dev

    threshold, scores = on_dev(backend.model, backend.processor, DEV_QUESTIONS)
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps({"threshold": threshold, "dev_adversarial_accuracy": {str(k): v for k, v in scores.items()},
                                 "questions": DEV_QUESTIONS}, indent=2) + "\n", encoding="utf-8")
    return float(threshold)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Run the suite; returns ``{benchmark: {"methods": ..., "comparison": ...}, "dev_threshold": t}``."""
    from hallupatch.eval import cli
    from hallupatch.eval.store import check_output_folder

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1; got {args.limit}")
    out = Path(args.output)
    check_output_folder(out)
    backend = lab_backend(args.model)
    threshold = args.threshold if args.threshold is not None else choose_threshold(out, backend)
    print(f"MemVR's tuned threshold: {threshold:g} ({'given' if args.threshold is not None else 'chosen on dev'})")
    shared = [*(["--limit", str(args.limit)] if args.limit else []), *(["--overwrite"] if args.overwrite else []),
              *(["--no-progress"] if args.no_progress else []), "--batch-size", str(LAB.batch_size)]
    results: Dict[str, Any] = {"dev_threshold": threshold}
    for benchmark in BENCHMARKS:
        tokens = LAB.max_new_tokens(free_text=benchmark == "chair")
        extra = ["--max-new-tokens", str(tokens), *(["--num-images", str(CAPTION_IMAGES)] if benchmark == "chair" else [])]
        print(f"\n######## lab {benchmark}")
        results[benchmark] = cli.run([benchmark, "--output", str(out / benchmark), *extra, *shared],
                                     backend=backend, variants=variants(threshold))
    profile = entropy_profile(backend, args.limit or PROFILE_QUESTIONS)
    (out / "entropy_profile.json").write_text(json.dumps(profile, indent=2) + "\n", encoding="utf-8")
    results["entropy_profile"] = profile
    print("\nMemVR's normalised top-10 entropy on the yes/no answers (0-based layer: mean / max; "
          f"threshold 0.75, ceiling log 2 / log 10 = {ENTROPY_CEILING:.3f}):")
    print("  " + "  ".join(f"{layer}: {v['mean']:.3f} / {v['max']:.3f}" for layer, v in profile.items()))
    if not args.no_plot:
        path = plot(out, results)
        print(f"plot: {path}")
    return results


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
    """``lab.png``: POPE accuracy per split and CHAIR per method with 95% intervals, MemVR's entropy
    profile on the yes/no answers, where MemVR fired, and which premature layers DoLa used."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hallupatch.eval.scoring import parse_pope_answer

    pope, chair = results["pope"]["comparison"], results["chair"]["comparison"]
    pope_dirs, chair_dirs = _folders(out, "pope", pope), _folders(out, "chair", chair)
    labels = list(pope["methods"])
    fig, axes = plt.subplots(2, 2, figsize=(15, 10))

    ax = axes[0][0]
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
    ax.set_ylabel("POPE accuracy (%) with 95% Wilson interval")
    ax.set_title("POPE on the lab (test split)")
    ax.legend(fontsize=8)

    ax = axes[0][1]
    base = chair["methods"][labels[0]]["scores"]
    for k, metric in enumerate(("CHAIRs", "CHAIRi")):
        values, errors = [], [[], []]
        for label in labels:
            entry = chair["methods"][label]
            value = entry["scores"][metric]
            if label == labels[0] or metric not in entry.get("test", {}):
                lo = hi = value
            else:  # the interval of the difference from the baseline, shifted onto the baseline's value
                lo, hi = (base[metric] + d for d in entry["test"][metric]["ci95"])
            values.append(value)
            errors[0].append(max(0.0, value - lo) if not math.isnan(lo) else 0.0)
            errors[1].append(max(0.0, hi - value) if not math.isnan(hi) else 0.0)
        ax.bar([i + k * 0.4 for i in range(len(labels))], values, 0.4, yerr=errors, capsize=2, label=metric)
    ax.set_xticks([i + 0.2 for i in range(len(labels))], labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("CHAIR (%); bars: 95% bootstrap interval of the paired difference")
    ax.set_title("CHAIR on the lab captions (test split)")
    ax.legend(fontsize=8)

    ax = axes[1][0]
    profile = results["entropy_profile"]
    layers = sorted(profile, key=int)
    ax.plot([int(l) for l in layers], [profile[l]["mean"] for l in layers], "o-", label="mean")
    ax.plot([int(l) for l in layers], [profile[l]["max"] for l in layers], "s--", label="max")
    ax.axhline(0.75, color="red", linestyle=":", label="published threshold 0.75")
    ax.axhline(ENTROPY_CEILING, color="gray", linestyle="-.", label="log 2 / log 10 = 0.301")
    ax.set_xlabel("0-based decoder layer (checked after it)")
    ax.set_ylabel("normalised top-10 entropy")
    ax.set_title("MemVR's trigger signal on POPE answers (published settings)")
    ax.legend(fontsize=8)

    ax = axes[1][1]
    series = {}
    for label in labels:
        rows = _answers(pope_dirs[label])
        fired = [l for r in rows for l in r.get("memvr", {}).get("trigger_layers", []) if l is not None]
        chosen = [l for r in rows for l in r.get("dola_layers", [])]
        if any("memvr" in r for r in rows):
            series[f"{label}: MemVR fired after layer"] = fired
        if any("dola_layers" in r for r in rows):
            series[f"{label}: DoLa premature layer"] = chosen
    names = list(series)
    for i, name in enumerate(names):
        counts: Dict[int, int] = {}
        for layer in series[name]:
            counts[layer] = counts.get(layer, 0) + 1
        ax.scatter([i] * len(counts), list(counts), s=[4 + 200 * c / max(1, len(series[name])) for c in counts.values()])
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("layer (dot size: share of decisions)")
    ax.set_title("Where MemVR fired and which layers DoLa contrasted (POPE)")

    fig.tight_layout()
    path = out / "lab.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
