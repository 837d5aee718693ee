"""``python -m hallupatch.eval lab --full``: the powered lab study.

Every method against ``none`` on the lab's two planted causes, on every shipped training seed:

1. **Dev**: each method's small knob grid (:data:`GRIDS`, the published setting first) answers
   :data:`DEV_QUESTIONS` dev questions of every compared set; the setting with the best mean accuracy
   over those sets is chosen (ties: the earlier in the grid). Test and held-out scenes are never used.
2. **Sizes**: each compared set gets as many questions as give its paired test 80% power to detect a
   2-point change in accuracy at alpha = 0.05, computed from the discordance the chosen settings showed
   on dev (the largest over methods and seeds), within [:data:`MIN_QUESTIONS`, :data:`MAX_QUESTIONS`].
3. **Test** (or ``--split heldout``, fresh scenes built as test's): the chosen settings once, through
   the harness (answers stored and resumable, one folder per seed / split / set / method).

The table shows, per seed, each method's change in accuracy against ``none``, the exact McNemar p, the
Holm-corrected p over every (seed x method x set) comparison of the table, and the minimum
detectable effect at the observed discordance; a finding **holds** when every seed shows the same sign
with a corrected p < 0.05. Everything printed is a function of ``study.json`` (:func:`render`), which
keeps the counts each figure is computed from.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from hallupatch.eval.harness import SCREEN_WIDTH, Variant

STUDY_FILE = "study.json"
SCREEN_FILE = "study.txt"
DEV_QUESTIONS = 300          # dev questions per compared set and grid setting
MIN_QUESTIONS = 400          # the fewest questions a compared set gets on test / heldout
MAX_QUESTIONS = 2000         # the most (the cost ceiling: where it binds, the MDE column says so)
TARGET_EFFECT = 0.02         # the change in accuracy each set is sized to detect ...
TARGET_POWER = 0.8           # ... with this power ...
ALPHA = 0.05                 # ... at this level (two-sided)
#: methods whose answers cost many forwards (OPERA: a 5-beam search with a forward of every candidate)
#: answer only the first this-many questions of each set; their MDE shows what that costs in power
COSTLY_QUESTIONS = {"opera": 400}


@dataclass(frozen=True)
class QuestionSet:
    """One set of lab yes/no questions, written as a POPE question file and asked through the harness.

    ``build(split, count)`` makes the questions; ``compared``: methods are compared on it (``False``: a
    paired control, answered by ``none`` only, that shows the planted error without its cause);
    ``planted``: the label whose wrong answers are the planted error (``"no"``: saying yes to an absent
    object; ``"yes"``: missing a present one); ``control``: the set that is this one's control."""

    name: str
    build: Callable[[str, int], list]
    compared: bool
    planted: str
    cause: str = ""
    control: str = ""


def _adversarial(split: str, count: int):
    from hallupatch.lab import questions as lq
    return lq.pope_questions(split, "adversarial", count)


def _prior_control(split: str, count: int):
    from hallupatch.lab import questions as lq
    return lq.control_questions(lq.pope_questions(split, "adversarial", 2 * count))


def _weak(split: str, count: int):
    from hallupatch.lab import questions as lq
    return lq.weak_questions(split, count)


def _full(split: str, count: int):
    from hallupatch.lab import questions as lq
    return lq.full_evidence(lq.weak_questions(split, count))


def _random(split: str, count: int):
    from hallupatch.lab import questions as lq
    return lq.pope_questions(split, "random", count)


SETS: Tuple[QuestionSet, ...] = (
    QuestionSet("adversarial", _adversarial, True, "no", "the co-occurrence prior", "prior-control"),
    QuestionSet("prior-control", _prior_control, False, "no"),
    QuestionSet("weak", _weak, True, "yes", "weak visual evidence", "full-evidence"),
    QuestionSet("full-evidence", _full, False, "yes"),
    QuestionSet("random", _random, True, "no", "nothing planted"),
)
COMPARED = tuple(s for s in SETS if s.compared)


def grids() -> Dict[str, List[Dict[str, Any]]]:
    """Each method's dev grid, the published setting (with the lab's layer window) first."""
    from hallupatch.eval.embedded import LAB
    from hallupatch.methods.opera import FAST as OPERA_FAST

    window = dict(LAB.method_knobs["memvr"])
    pai = dict(LAB.method_knobs["pai"])
    return {
        "memvr": [{**window, "entropy_threshold": t, "retracing_ratio": r}
                  for r in (0.12, 0.5) for t in (0.75, 0.5, 0.9)],
        "dola": [{"candidate_layers": c, "early_exit_norm": n} for n in (False, True) for c in ("high", "low")],
        "vcd": [{"noise_seed": 0, "alpha": a, "noise_step": s} for s in (500, 999) for a in (1.0, 0.5)],
        "icd": [{"alpha": a} for a in (1.0, 0.5)],
        "m3id": [{"lambda_decay": d} for d in (0.02, 0.1)],
        "pai": [{**pai, "alpha": a} for a in (0.2, 0.5)],
        "opera": [{}, dict(OPERA_FAST)],
    }


def grid_label(method: str, knobs: Mapping[str, Any]) -> str:
    """``"dola candidate_layers=low early_exit_norm=True"``: a dev setting's label (and folder)."""
    return " ".join([method, *(f"{k}={v}" for k, v in knobs.items())])


# ----------------------------------------------------------------------------- running
def shipped_seeds() -> Dict[int, Optional[Path]]:
    """``{seed: checkpoint folder}`` of the shipped lab models (``None``: the default checkpoint)."""
    from hallupatch.lab.model import SHIPPED_CHECKPOINTS

    return dict(SHIPPED_CHECKPOINTS)


def _write_set(root: Path, qset: QuestionSet, split: str, count: int) -> Path:
    from hallupatch.lab import writers

    folder = root / "data" / split
    target = folder / f"{qset.name}-{count}.jsonl"
    if not target.is_file():
        tmp = writers.write_question_file(folder, f"{qset.name}-{count}.part", qset.build(split, count))
        tmp.replace(target)
    return target


Runner = Callable[..., Any]   # the command line's runner of one benchmark (hallupatch.eval.cli.run), passed in


def _answer(run_benchmark: Runner, backend, data: Path, out: Path, label: str, variant: Variant,
            limit: Optional[int], overwrite: bool, progress: bool) -> List[dict]:
    """One setting's answers to one question file, through the harness (resumable)."""
    from hallupatch.eval.embedded import LAB
    from hallupatch.eval.harness import method_folder_name
    from hallupatch.eval.store import read_answers

    folder = out / method_folder_name(label)
    argv = [yes_no_task(), "--data", str(data), "--output", str(folder), "--batch-size", str(LAB.batch_size),
            "--max-new-tokens", str(LAB.answer_tokens), *(["--limit", str(limit)] if limit else []),
            *(["--overwrite"] if overwrite else []), *([] if progress else ["--no-progress"])]
    with contextlib.redirect_stdout(io.StringIO()):
        run_benchmark(argv, backend=backend, variants={label: variant})
    return read_answers(folder / "answers.jsonl")


def yes_no_task() -> str:
    """The registered task that reads the study's question files (``Task.lab_question_files``)."""
    from hallupatch.eval.tasks import registered_tasks

    return next(name for name, task in registered_tasks().items() if task.lab_question_files)


def _outcomes(rows: Sequence[Mapping[str, Any]]) -> Dict[str, Tuple[str, bool]]:
    """``{question id: (label, answered right)}`` with POPE's parsing."""
    from hallupatch.eval.scoring import parse_pope_answer

    return {r["question_id"]: (r["answer"], parse_pope_answer(r["text"]) == r["answer"]) for r in rows}


def outcome_figures(outcomes: Mapping[str, Tuple[str, bool]], planted: str) -> Dict[str, int]:
    """One setting's figures on some questions: ``n``, ``right``, and its planted errors (wrong answers to
    questions labelled ``planted``) out of ``planted_n``."""
    return {"n": len(outcomes), "right": sum(right for _, right in outcomes.values()),
            "planted_n": sum(label == planted for label, _ in outcomes.values()),
            "planted_errors": sum(label == planted and not right for label, right in outcomes.values())}


def paired_counts(base: Mapping[str, Tuple[str, bool]], other: Mapping[str, Tuple[str, bool]],
                  planted: str) -> Dict[str, int]:
    """The counts a comparison is computed from, over the questions both answered: ``n``; ``b`` (``none``
    right, the method wrong) and ``c`` (the reverse); each one's right answers; and each one's planted
    errors (wrong answers to questions labelled ``planted``) out of ``planted_n``."""
    shared = [q for q in other if q in base]
    b = sum(base[q][1] and not other[q][1] for q in shared)
    c = sum(other[q][1] and not base[q][1] for q in shared)
    mine = outcome_figures({q: base[q] for q in shared}, planted)
    theirs = outcome_figures({q: other[q] for q in shared}, planted)
    return {"n": len(shared), "b": b, "c": c, "base_right": mine["right"], "method_right": theirs["right"],
            "planted_n": mine["planted_n"], "base_planted_errors": mine["planted_errors"],
            "method_planted_errors": theirs["planted_errors"]}


def choose_on_dev(run_benchmark: Runner, backend, root: Path, overwrite: bool, progress: bool) -> Dict[str, Any]:
    """Run every grid setting on the dev sets; returns ``{"chosen": {method: knobs}, "grid": {...},
    "discordance": {method: {set: rate}}}``."""
    dev = root / "dev"
    data = {qset.name: _write_set(root, qset, "dev", DEV_QUESTIONS) for qset in COMPARED}
    base = {qset.name: _outcomes(_answer(run_benchmark, backend, data[qset.name], dev / qset.name, "none",
                                         Variant("none"), None, overwrite, progress)) for qset in COMPARED}
    chosen, grid_scores, discordance = {}, {}, {}
    for method, settings in grids().items():
        limit = min(DEV_QUESTIONS, COSTLY_QUESTIONS.get(method, DEV_QUESTIONS))
        scores = []
        for knobs in settings:
            label = grid_label(method, knobs)
            per_set = {}
            for qset in COMPARED:
                rows = _answer(run_benchmark, backend, data[qset.name], dev / qset.name, label,
                               Variant(method, dict(knobs)), limit, overwrite, progress)
                per_set[qset.name] = paired_counts(base[qset.name], _outcomes(rows), qset.planted)
            accuracy = sum(c["method_right"] / c["n"] for c in per_set.values()) / len(per_set)
            scores.append((accuracy, label, knobs, per_set))
        best = max(range(len(scores)), key=lambda i: (round(scores[i][0], 9), -i))
        chosen[method] = dict(scores[best][2])
        grid_scores[method] = [{"knobs": dict(k), "dev_accuracy": a, "counts": s} for a, _, k, s in scores]
        discordance[method] = {name: (c["b"] + c["c"]) / c["n"] for name, c in scores[best][3].items()}
    return {"chosen": chosen, "grid": grid_scores, "discordance": discordance, "questions": DEV_QUESTIONS}


def set_sizes(dev: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Each set's question count on test / heldout from one seed's dev discordance of its chosen settings
    (see the module docstring), with the discordance and method it was sized on; a control set gets the
    count of the set it controls."""
    from hallupatch.eval.stats import mcnemar_sample_size

    sizes: Dict[str, Dict[str, Any]] = {}
    for qset in COMPARED:
        need, on = MIN_QUESTIONS, None
        for method, rates in dev["discordance"].items():
            rate = rates[qset.name]
            if method in COSTLY_QUESTIONS or rate <= TARGET_EFFECT:
                continue   # a 2-point change needs more than 2% discordant questions
            n = mcnemar_sample_size(rate, TARGET_EFFECT, power=TARGET_POWER, alpha=ALPHA)
            if n > need:
                need, on = n, {"method": method, "discordance": rate}
        sizes[qset.name] = {"questions": min(MAX_QUESTIONS, need + need % 2), "needed": need, "sized_on": on,
                            "capped": need > MAX_QUESTIONS}
    for qset in SETS:
        if not qset.compared:
            source = next(s for s in COMPARED if s.control == qset.name)
            sizes[qset.name] = {"questions": sizes[source.name]["questions"], "control_of": source.name}
    return sizes


def evaluate_split(run_benchmark: Runner, backend, root: Path, split: str, chosen: Mapping[str, Mapping[str, Any]],
                   sizes: Mapping[str, Mapping[str, Any]], overwrite: bool, progress: bool) -> Dict[str, Any]:
    """The chosen settings on ``split``: per set, ``none``'s figures and each method's paired counts."""
    out: Dict[str, Any] = {}
    for qset in SETS:
        count = sizes[qset.name]["questions"]
        data = _write_set(root, qset, split, count)
        folder = root / split / qset.name
        base = _outcomes(_answer(run_benchmark, backend, data, folder, "none", Variant("none"), None, overwrite, progress))
        entry: Dict[str, Any] = {"questions": count, "none": outcome_figures(base, qset.planted)}
        if qset.compared:
            entry["methods"] = {}
            for method, knobs in chosen.items():
                limit = COSTLY_QUESTIONS.get(method)
                rows = _answer(run_benchmark, backend, data, folder, method, Variant(method, dict(knobs)), limit, overwrite, progress)
                entry["methods"][method] = paired_counts(base, _outcomes(rows), qset.planted)
        out[qset.name] = entry
    return out


def run_seed(run_benchmark: Runner, seed: int, checkpoint: Optional[Path], root: Path, split: str, threads: Optional[int],
             overwrite: bool = False, progress: bool = True) -> Dict[str, Any]:
    """One seed's part of the study (dev choice, sizes, the split's answers' counts), saved as
    ``<root>/<split>.json`` and returned; a saved part is returned as it is (``overwrite``: run afresh)."""
    from hallupatch.eval.embedded import lab_backend
    from hallupatch.eval.models import choose_threads
    from hallupatch.eval.store import write_json

    saved = root / f"{split}.json"
    if saved.is_file() and not overwrite:
        return json.loads(saved.read_text(encoding="utf-8"))
    backend = lab_backend(checkpoint)
    choose_threads(backend.model, threads)
    dev = choose_on_dev(run_benchmark, backend, root, overwrite, progress)
    write_json(root / "dev_choice.json", dev)
    sizes = set_sizes(dev)
    part = {"seed": seed, "split": split, "dev": dev, "sizes": sizes,
            "results": evaluate_split(run_benchmark, backend, root, split, dev["chosen"], sizes, overwrite, progress)}
    write_json(saved, part)
    return part


def run_study(args, run_benchmark: Runner) -> Dict[str, Any]:
    """Run (or resume) the study for ``args.seeds`` (default: every shipped seed) on ``args.split``; write
    ``<split>-study.json`` and ``<split>-study.txt`` and print the table. Seeds are independent: run one
    process per seed (``--seeds 1``) in parallel into the same ``--output``, then once without ``--seeds``
    to resume them all (nothing is answered twice) and print the table."""
    from hallupatch.eval.store import write_json

    out = Path(args.output)
    seeds = shipped_seeds()
    wanted = sorted(args.seeds) if args.seeds else sorted(seeds)
    unknown = [s for s in wanted if s not in seeds]
    if unknown:
        raise ValueError(f"no shipped lab checkpoint for seed(s) {unknown}; shipped seeds: {sorted(seeds)}")
    parts = [run_seed(run_benchmark, seed, seeds[seed], out / f"seed{seed}", args.split, args.threads, args.overwrite,
                      not args.no_progress) for seed in wanted]
    study = {"split": args.split, "seeds": wanted, "alpha": ALPHA, "power": TARGET_POWER,
             "target_effect": TARGET_EFFECT, "costly_questions": dict(COSTLY_QUESTIONS),
             "parts": {str(p["seed"]): p for p in parts}}
    write_json(out / f"{args.split}-{STUDY_FILE}", study)
    text = render(study)
    (out / f"{args.split}-{SCREEN_FILE}").write_text(text + "\n", encoding="utf-8")
    print(text)
    return study


# ----------------------------------------------------------------------------- the table
def comparisons(study: Mapping[str, Any]) -> Dict[Tuple[int, str, str], Dict[str, float]]:
    """``{(seed, set, method): {"change", "p", "holm", "mde", "discordance", "n", "planted_change"}}``:
    accuracy change in points, raw exact McNemar p, Holm-corrected p over every (seed x set x method)
    comparison of the table, the minimum detectable effect (points) at the observed discordance, and the
    change of the planted error's rate (points)."""
    from hallupatch.eval.stats import holm, mcnemar_exact, mcnemar_mde

    out: Dict[Tuple[int, str, str], Dict[str, float]] = {}
    for seed in study["seeds"]:
        for qset in COMPARED:
            for method, c in study["parts"][str(seed)]["results"][qset.name]["methods"].items():
                discordance = (c["b"] + c["c"]) / c["n"]
                out[(seed, qset.name, method)] = {
                    "change": 100 * (c["c"] - c["b"]) / c["n"], "p": mcnemar_exact(c["b"], c["c"]), "n": c["n"],
                    "discordance": discordance,
                    "mde": 100 * mcnemar_mde(c["n"], discordance, power=study["power"], alpha=study["alpha"]),
                    "planted_change": 100 * (c["method_planted_errors"] - c["base_planted_errors"]) / max(1, c["planted_n"]),
                }
    for key, corrected in zip(out, holm([row["p"] for row in out.values()])):
        out[key]["holm"] = corrected
    return out


def holds(rows: Sequence[Mapping[str, float]], alpha: float = ALPHA) -> str:
    """``"yes +"`` / ``"yes -"`` when every seed shows the same sign with a Holm p < alpha, else ``"no"``."""
    signs = {math.copysign(1, r["change"]) if r["change"] else 0 for r in rows}
    if len(signs) == 1 and 0 not in signs and all(r["holm"] < alpha for r in rows):
        return "yes " + ("+" if signs.pop() > 0 else "-")
    return "no"


def planted_rate(figures: Mapping[str, int]) -> float:
    """A set's planted error rate (%) from ``none``'s figures: wrong answers to the planted label's questions."""
    return 100 * figures["planted_errors"] / figures["planted_n"]


def _p(p: float) -> str:
    return "<.001" if p < 0.001 else f"{p:.3f}"[1:] if p < 1 else "1"


def render(study: Mapping[str, Any]) -> str:
    """The study's screen (at most 100 columns): the planted causes on ``none``, each seed's dev choices
    and set sizes, and the comparison table; a function of ``study.json`` alone."""
    seeds = list(study["seeds"])
    parts = {s: study["parts"][str(s)] for s in seeds}
    table = comparisons(study)
    lines = [f"hallupatch eval lab --full: every method against none on the lab's {study['split']} split, "
             f"seeds {', '.join(map(str, seeds))}",
             "planted causes: none's error rate on the planted label, with the cause / in its control (%)"]
    for qset in COMPARED:
        if not qset.control:
            continue
        kind = "false yes" if qset.planted == "no" else "false no"
        cells = []
        for seed in seeds:
            here, ctrl = parts[seed]["results"][qset.name]["none"], parts[seed]["results"][qset.control]["none"]
            cells.append(f"seed {seed} {planted_rate(here):.1f} / {planted_rate(ctrl):.1f}")
        lines.append(f"  {qset.cause + ', ' + kind:<36}" + "   ".join(cells))
    lines.append("questions per set (sized on dev for 80% power at a 2-point change; seeds " +
                 ", ".join(map(str, seeds)) + "):")
    for qset in COMPARED:
        counts = [f"{parts[s]['sizes'][qset.name]['questions']}" +
                  ("*" if parts[s]["sizes"][qset.name].get("capped") else "") for s in seeds]
        lines.append(f"  {qset.name:<12}{' / '.join(counts)}")
    costly = ", ".join(f"{m} answers the first {n} of each set" for m, n in study["costly_questions"].items())
    lines.append(f"  * capped at {MAX_QUESTIONS} (the MDE column shows the power left); {costly}")
    lines.append(f"dev choice per seed ({DEV_QUESTIONS} dev questions per set; knobs that differ from the "
                 "published setting):")
    published = {m: g[0] for m, g in grids().items()}
    for method in published:
        picks = []
        for seed in seeds:
            knobs = parts[seed]["dev"]["chosen"][method]
            picks.append(f"{seed}: " + (", ".join(f"{k}={v}" for k, v in knobs.items()
                                                    if published[method].get(k) != v) or "published"))
        lines += textwrap.wrap(" | ".join(picks), SCREEN_WIDTH, initial_indent=f"  {method:<7}",
                               subsequent_indent=" " * 9)
    lines += ["", "accuracy change against none (points); p: exact McNemar, two-sided; holm: Holm-corrected over",
              f"all {len(table)} comparisons of this table; mde: minimum detectable effect (points; 80% power, "
              "alpha 0.05)", "at the observed discordance (inf: too few discordant questions for any change to "
              "reach that power);", "holds: the same sign on every seed, each with holm < 0.05",
              f"{'':<19}" + "".join(f"{'seed ' + str(s):^25}" for s in seeds),
              f"{'method':<7}{'set':<12}" + "".join(f"{'change':>7}{'p':>6}{'holm':>6}{'mde':>5} " for _ in seeds)
              + "holds"]
    for qset in COMPARED:
        for method in published:
            rows = [table[(s, qset.name, method)] for s in seeds]
            cells = "".join(f"{r['change']:>+7.2f}{_p(r['p']):>6}{_p(r['holm']):>6}{r['mde']:>5.1f} " for r in rows)
            lines.append(f"{method:<7}{qset.name:<12}{cells}{holds(rows)}")
    lines += ["", "the planted error (wrong answers to the questions of the planted label): none's rate (%) and each",
              f"method's change (points), seeds {' / '.join(map(str, seeds))}",
              f"{'':<7}" + "".join(f"{q.name + (' false yes' if q.planted == 'no' else ' false no'):>24}"
                                   for q in COMPARED)]
    for label in ["none", *published]:
        cells = []
        for qset in COMPARED:
            if label == "none":
                values = [f"{planted_rate(parts[s]['results'][qset.name]['none']):5.1f}" for s in seeds]
            else:
                values = [f"{table[(s, qset.name, label)]['planted_change']:+5.1f}" for s in seeds]
            cells.append(f"{' '.join(values):>24}")
        lines.append(f"{label:<7}" + "".join(cells))
    return "\n".join(line.rstrip() for line in lines)
