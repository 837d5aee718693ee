"""``python -m hallupatch.eval <benchmark> ...``: measure a model with and without mitigation methods.

The command line of :mod:`hallupatch.eval.harness`: one sub-command per registered task
(:mod:`hallupatch.eval.tasks`), each with the shared options below plus the task's own.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hallupatch.eval import embedded as builtin
from hallupatch.eval import harness, lab, models
from hallupatch.eval.data import DataError
from hallupatch.eval.decoding import Decoding
from hallupatch.eval.presets import get_preset, preset_help, with_preset
from hallupatch.eval.store import StoreError, check_output_folder, folder_name
from hallupatch.eval.tasks import Task, get_task, registered_tasks
from hallupatch.names import SuggestingParser, did_you_mean

KNOBS = {  # CLI flag -> (config field, type, help)
    "--retracing-ratio": ("retracing_ratio", float, "MemVR alpha, in [0, 1] (default: the family's published value)"),
    "--entropy-threshold": ("entropy_threshold", float, "MemVR trigger threshold on the normalised top-10 entropy"),
    "--starting-layer": ("starting_layer", int, "MemVR: first 0-based layer bound (exclusive)"),
    "--ending-layer": ("ending_layer", int, "MemVR: last 0-based layer bound (exclusive)"),
    "--adapter-activation": ("adapter_activation", str, "MemVR adapter activation (default: the family's)"),
    "--candidate-layers": ("candidate_layers", lambda text: _layers_or_name(text),
                           "layer contrast: low, high or hidden-state indices such as 16,18,20 (default: high)"),
    "--layer-prior": ("layer_prior", lambda text: _prior(text),
                      "layer contrast: a prior JSON (python -m hallupatch.prior) or one weight per candidate, e.g. 0.2,0.8"),
    "--layer-seed": ("seed", int, "layer contrast with a prior: seed of the per-sample layer draws"),
    "--scale-factor": ("scale_factor", float, "OPERA: attention scale before the column products (default 50)"),
    "--opera-threshold": ("threshold", int, "OPERA: rollback when a location wins more than this many times "
                          "(default 15; fast 25)"),
    "--num-attn-candidates": ("num_attn_candidates", int, "OPERA: candidates per beam (default 5; fast 1)"),
    "--penalty-weights": ("penalty_weights", float, "OPERA: weight of the over-trust penalty (default 1.0)"),
    "--window-size": ("window_size", int, "OPERA: the fork's history length (default 512)"),
}

# knobs of the two-branch baselines, which share field names (alpha, beta) with other meanings: each flag acts
# on the methods it names only. flag -> (methods, config field, type, help)
SCOPED_KNOBS = {
    "--cd-alpha": (("vcd", "icd"), "alpha", float, "VCD/ICD contrast strength (published cd_alpha; default 1)"),
    "--cd-beta": (("vcd", "icd", "m3id"), "beta", float,
                  "VCD/ICD/M3ID plausibility cutoff (published cd_beta; default 0.1; 0 = no mask)"),
    "--noise-step": (("vcd",), "noise_step", int, "VCD diffusion step, 0-based in [0, 999] (default 500)"),
    "--noise-seed": (("vcd",), "noise_seed", int, "VCD: seed of the image noise (default: torch's global generator)"),
    "--icd-instruction": (("icd",), "instruction", lambda text: int(text) if text.isdigit() else text,
                          "ICD disturbing instruction: an index 0-4 into the published five, or the text (default 0)"),
    "--m3id-lambda": (("m3id",), "lambda_decay", float, "M3ID decay lambda of exp(-lambda t) (default 0.02)"),
    "--pai-alpha": (("pai",), "alpha", float, "PAI attention amplification (default 0.2)"),
    "--pai-gamma": (("pai",), "gamma", float, "PAI CFG strength (default 1.1; PAI's eval scripts default to 2)"),
    "--pai-start-layer": (("pai",), "start_layer", int, "PAI: first amplified 0-based layer (default 2)"),
    "--pai-end-layer": (("pai",), "end_layer", int, "PAI: amplified layers end here, excluded (default 32)"),
    "--pai-use-attn": (("pai",), "use_attn", lambda text: _boolean(text), "PAI attention part on/off (default true)"),
    "--pai-use-cfg": (("pai",), "use_cfg", lambda text: _boolean(text), "PAI CFG part on/off (default true)"),
}


def _boolean(text: str) -> bool:
    if text.lower() in ("true", "1", "yes", "on"):
        return True
    if text.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false; got {text!r}")


def _layers_or_name(text: str):
    """``low`` / ``high`` as given, else a comma-separated list of hidden-state indices."""
    if text in ("low", "high"):
        return text
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected low, high or comma-separated layer indices; got {text!r}") from None


def _prior(text: str):
    """A JSON path as given, else a comma-separated list of weights."""
    if Path(text).suffix == ".json" or Path(text).exists():
        return text
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a prior JSON path or comma-separated weights; got {text!r}") from None

DESCRIPTION = """\
Evaluate a multimodal model on a hallucination benchmark, scored as the official tools score it.

With no --model and no --data, `python -m hallupatch.eval mme|pope|chair` runs the built-in model on the
lab's data (a synthetic world with a planted hallucination) written in the benchmark's official layout,
in seconds; `python -m hallupatch.eval lab` compares every method on the lab. The built-in model is the
lab's trained tiny LLaVA, shipped with the package.

Real runs:
  python -m hallupatch.eval mme  --model path/to/llava-1.5-7b-hf --data MME_Benchmark_release_version
  python -m hallupatch.eval mme  --model CKPT --data lmms-lab-MME-folder --method none,memvr --batch-size 8
  python -m hallupatch.eval pope --model CKPT --data POPE/coco --image-folder val2014
  accelerate launch -m hallupatch.eval mme --model CKPT --data MME   # one shard per process
  python -m hallupatch.eval mme --answers llava_answers.jsonl --data MME   # score answers made elsewhere
  python -m hallupatch.eval <benchmark> --help                           # the benchmark's own options

Several methods (--method none,memvr,dola) answer the same questions once each, in <output>/<method>/,
and print one comparison table with paired tests (comparison.json).
Rerunning the same command resumes: finished questions are skipped. Results go to --output:
answers.jsonl, scores.json, run.json (settings) and the benchmark's own files.
"""


#: runs of several benchmarks with their own options (``add_arguments``, ``run(args, run_benchmark)`` given this
#: module's :func:`run`, so that a suite never imports the command line, ``SUMMARY``)
SUITES = {"lab": lab}


def _shared_options() -> argparse.ArgumentParser:
    """The options every benchmark takes (a parent parser of each sub-command)."""
    p = SuggestingParser(add_help=False)
    g = p.add_argument_group("model, methods and run")
    g.add_argument("--model", help="checkpoint folder (llava-hf, original LLaVA, Qwen-VL-Chat, GLM-4V-9b); "
                   "default: the built-in model")
    g.add_argument("--recipe", choices=sorted(models.RECIPES), help="the checkpoint's evaluation recipe: loader and "
                   "published prompt (default: from config.json)")
    g.add_argument("--family", dest="recipe_old_spelling", choices=sorted(models.RECIPES), help=argparse.SUPPRESS)
    g.add_argument("--data", help="the benchmark's data in its official layout (see the benchmark's --help); "
                   "default: the built-in data, where the benchmark has one")
    g.add_argument("--lab-split", choices=["dev", "test", "heldout"], help="which split of the built-in (lab) data "
                   "to write when no --data is given: heldout = fresh scenes built as test's (default test)")
    g.add_argument("--preset", help="the settings of a published evaluation script (flags given here win); "
                   "--preset help lists them")
    g.add_argument("--method", help="none, memvr, dola (layer contrast), memvr+dola, vcd, icd, m3id, pai, opera "
                   "(beam search with OPERA's penalty and rollbacks), or several separated by commas "
                   "(none,vcd,icd,memvr) to compare them on the same questions")
    for flag, (_, typ, text) in KNOBS.items():
        g.add_argument(flag, type=typ, help=text)
    for flag, (_, _, typ, text) in SCOPED_KNOBS.items():
        g.add_argument(flag, type=typ, help=text)
    g.add_argument("--output", help="results folder (default: ./hallupatch_output/<benchmark>-<model>-<method>)")
    g.add_argument("--batch-size", type=int, help="questions per generate() call, left-padded; answers equal those "
                   "of batch size 1 (default 1; the built-in model's own otherwise)")
    g.add_argument("--limit", type=int, help="only the first N questions")
    g.add_argument("--max-new-tokens", type=int, help="default: the benchmark's published value, else the recipe's")
    g.add_argument("--device", help="cuda, cpu, cuda:1 ... (default: cuda when available)")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: float16 on GPU, float32 on CPU")
    g.add_argument("--threads", type=int, help=models.THREADS_HELP)
    d = p.add_argument_group("decoding (default: greedy; recorded in run.json)")
    d.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    d.add_argument("--temperature", type=float, help="with --do-sample (default: the checkpoint's generation config)")
    d.add_argument("--top-p", type=float, help="with --do-sample: nucleus sampling mass, in (0, 1]")
    d.add_argument("--top-k", type=int, help="with --do-sample: top-k sampling, 0 = off (default: the checkpoint's "
                   "generation config, transformers' 50)")
    d.add_argument("--num-beams", type=int, default=1, help="beam search width (default 1; OPERA runs 5 unless "
                   "a width >= 2 is given)")
    d.add_argument("--repetition-penalty", type=float, help="transformers' repetition penalty (1.0 = none)")
    d.add_argument("--seed", type=int, help="seed Python, NumPy and torch before each method answers; sampled "
                   "answers are seeded per question, so they do not depend on --batch-size (CHAIR: also the seed "
                   "of its image sample, default 0)")
    g.add_argument("--answers", help="score this answers file made elsewhere (LLaVA's JSONL: question_id, text) "
                   "without a model")
    g.add_argument("--overwrite", action="store_true", help="discard a previous run in --output instead of resuming it")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def build_parser() -> argparse.ArgumentParser:
    p = SuggestingParser(
        prog="python -m hallupatch.eval", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    shared = _shared_options()
    commands = p.add_subparsers(dest="benchmark", metavar="benchmark", required=True)
    for name, task in registered_tasks().items():
        sub = commands.add_parser(name, parents=[shared], help=task.summary, description=f"{task.summary}.\n\n"
                                  f"Data: {task.data_help}", formatter_class=argparse.RawDescriptionHelpFormatter)
        task.add_arguments(sub.add_argument_group(f"{name} options"))
    for name, suite in SUITES.items():
        suite.add_arguments(commands.add_parser(name, help=suite.SUMMARY, description=suite.__doc__,
                                                formatter_class=argparse.RawDescriptionHelpFormatter))
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line; an option of another benchmark is refused with a ``ValueError`` naming
    the benchmarks that take it (anything else unknown is argparse's usage error)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    name = _preset_name(argv)
    if name == "help":
        print(preset_help())
        raise SystemExit(0)
    preset_flags: List[str] = []
    if name is not None and argv and not argv[0].startswith("-"):
        preset = get_preset(name, argv[0])
        user_flags = {token.split("=", 1)[0] for token in argv if token.startswith("--")}
        preset_flags = [flag for flag in preset.args if flag.startswith("--") and flag not in user_flags]
        argv = with_preset(argv, preset)
    args, extra = parser.parse_known_args(argv)
    args.preset_flags = preset_flags
    if extra:
        owners = _option_owners(parser)
        for token in extra:
            flag = token.split("=", 1)[0]
            if flag in owners:
                raise ValueError(f"{flag} is an option of {', '.join(owners[flag])}: use it with "
                                 f"{' or '.join(owners[flag])}, not {args.benchmark}")
        parser.parse_args(argv)  # the usage error for what no benchmark takes
    return args


def _preset_name(argv: Sequence[str]) -> Optional[str]:
    """The value of ``--preset`` in ``argv`` (the last one given), or ``None``."""
    name = None
    for i, token in enumerate(argv):
        if token == "--preset" and i + 1 < len(argv):
            name = argv[i + 1]
        elif token.startswith("--preset="):
            name = token.split("=", 1)[1]
    return name


def _option_owners(parser: argparse.ArgumentParser) -> Dict[str, List[str]]:
    """``{--option: [benchmarks whose own options include it]}``."""
    shared = {flag for action in _shared_options()._actions for flag in action.option_strings}
    owners: Dict[str, List[str]] = {}
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        for action in sub._actions:
            for flag in action.option_strings:
                if flag not in shared and flag not in ("-h", "--help"):
                    owners.setdefault(flag, []).append(name)
    return owners


def _where(path: str) -> str:
    """A local path made absolute (so a resume from another folder matches); a hub name as given."""
    return str(Path(path).resolve()) if Path(path).exists() else path


def parse_methods(text: str) -> List[str]:
    """``"none,memvr"`` -> ``["none", "memvr"]``; each one checked (``none`` or a method, or several joined with +)."""
    from hallupatch.methods import METHODS, parse_method

    methods = [m.strip() for m in str(text).split(",")]
    if any(not m for m in methods) or len(set(methods)) != len(methods):
        raise ValueError(f"--method takes distinct methods separated by commas (e.g. none,memvr,dola); got {text!r}")
    for m in methods:
        if m == "none":
            continue
        try:
            parse_method(m)
        except ValueError:
            unknown = next((part.strip() for part in m.split("+") if part.strip() not in METHODS), m)
            raise ValueError(f"unknown method {unknown!r}{did_you_mean(unknown, ['none', *METHODS])} in --method "
                             f"{text!r}: use none, {', '.join(sorted(METHODS))}, several joined with + (memvr+dola), "
                             "or several separated by commas (none,memvr)") from None
    return methods


def _given_knobs(args) -> Dict[str, Any]:
    """``{config field: value}`` of the knob flags given (on the command line or by ``--preset``)."""
    given = {field: getattr(args, flag[2:].replace("-", "_")) for flag, (field, _, _) in KNOBS.items()}
    given = {k: v for k, v in given.items() if v is not None}
    prior = given.get("layer_prior")
    if isinstance(prior, str):   # a file: absolute, so a resume from another folder names the same file
        given["layer_prior"] = str(Path(prior).resolve())
    return given


def _given_scoped_knobs(args) -> Dict[str, Tuple[Tuple[str, ...], str, Any]]:
    """``{flag: (methods it acts on, config field, value)}`` of the method-scoped knob flags given."""
    given = {flag: (owners, field, getattr(args, flag[2:].replace("-", "_"), None))
             for flag, (owners, field, _, _) in SCOPED_KNOBS.items()}
    return {flag: spec for flag, spec in given.items() if spec[2] is not None}


def _flag_origin(args, flag: str) -> str:
    """``flag``, and the preset that set it when the user did not give it."""
    return f"{flag} (set by --preset {args.preset})" if flag in getattr(args, "preset_flags", ()) else flag


def _variants(args, methods: Sequence[str], embedded: Optional[builtin.EmbeddedModel],
              given_variants: Optional[Dict[str, harness.Variant]] = None) -> Dict[str, harness.Variant]:
    """Each method's variant: the knob flags given (for every method that has them), or the variants a
    caller passed in, on top of the built-in model's defaults for that method. A knob that none of the
    methods takes is refused, naming the methods that take it (and the preset that set it)."""
    from hallupatch.methods import METHODS, parse_method

    given = _given_knobs(args)
    scoped = _given_scoped_knobs(args)

    def defaults(method: str) -> Dict[str, Any]:
        if embedded is None or method == "none":
            return {}
        out: Dict[str, Any] = {}
        for part in method.split("+"):
            out.update(embedded.method_knobs.get(part, {}))
        return out

    if given_variants is not None:
        if given or scoped:
            raise ValueError(f"knob flags {sorted([*given, *scoped])} do not apply to the variants passed in: "
                             "put them in the variants")
        return {label: harness.Variant(v.method, {**defaults(v.method), **v.knobs}) for label, v in given_variants.items()}
    fields = {m: set() if m == "none" else {k for part in parse_method(m) for k in part.config_cls.knobs()}
              for m in methods}
    running = {part for method in methods for part in method.split("+")}
    flag_of = {field: flag for flag, (field, _, _) in KNOBS.items()}
    takers = {flag_of[knob]: sorted(name for name, method in METHODS.items() if knob in method.config_cls.knobs())
              for knob in given if not any(knob in f for f in fields.values())}
    takers.update({flag: list(owners) for flag, (owners, _, _) in scoped.items() if not running & set(owners)})
    if takers:
        flag, owners = next(iter(takers.items()))
        raise ValueError(
            f"{_flag_origin(args, flag)} is a knob of {' and '.join(owners)}, which --method "
            f"{','.join(methods)} does not include: add {owners[0]} to --method (e.g. --method "
            f"{','.join([*methods, owners[0]])}) or drop {flag}"
        )
    variants = {}
    for method in methods:
        own = {field: value for owners, field, value in scoped.values() if method in owners}
        variants[method] = harness.Variant(
            method, {**defaults(method), **{k: v for k, v in given.items() if k in fields[method]}, **own})
    return variants


#: flags that only matter when a model answers: refused with --answers, which scores answers made elsewhere
_MODEL_FLAGS = ("--model", "--recipe", "--method", *KNOBS, *SCOPED_KNOBS, "--batch-size", "--max-new-tokens", "--device", "--dtype",
                "--threads", "--do-sample", "--temperature", "--top-p", "--top-k", "--num-beams", "--repetition-penalty", "--seed", "--preset")


def _refuse_model_flags(args) -> None:
    """``--answers`` scores answers made elsewhere: a flag that would change how answers are made has no
    effect there, so it is refused rather than ignored."""
    defaults = build_parser().parse_args([args.benchmark])
    given = [flag for flag in _MODEL_FLAGS
             if getattr(args, flag[2:].replace("-", "_")) != getattr(defaults, flag[2:].replace("-", "_"))]
    if args.recipe_old_spelling:
        given.append("--family")
    if given:
        raise ValueError(
            f"--answers scores answers made elsewhere, without a model, so {', '.join(_flag_origin(args, f) for f in given)} "
            "would have no effect: drop them (or drop --answers to generate answers)"
        )


def run(argv: Optional[Sequence[str]] = None, backend=None,
        variants: Optional[Dict[str, harness.Variant]] = None) -> Optional[Dict[str, Any]]:
    """Run the CLI; returns the scores (on the main process) and raises on errors.

    ``backend``: an already loaded :class:`~hallupatch.eval.models.Backend` instead of ``--model``.
    ``variants``: ``{label: Variant}`` to compare instead of ``--method`` (e.g. one method in several settings).
    With several methods the result is ``{"methods": {label: scores}, "comparison": ...}``.

    Everything is checked before anything is written or deleted: the flags, the methods and their knobs,
    the decoding options, the preset, the model (loaded, each method applied and removed once) and the
    resumability of every method's folder; only then does ``--overwrite`` discard a previous run.
    """
    args = parse_args(argv)
    if args.benchmark in SUITES:
        return SUITES[args.benchmark].run(args, run)
    if args.recipe_old_spelling:
        print("note: --family is now spelled --recipe (a family is the model structure hallupatch patches)",
              file=sys.stderr)
    for flag in ("limit", "batch_size", "max_new_tokens", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1; got {value}")
    decoding = Decoding(do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                        num_beams=args.num_beams, repetition_penalty=args.repetition_penalty, seed=args.seed)
    task: Task = get_task(args.benchmark)(args)
    if args.answers:
        _refuse_model_flags(args)
        out = _output_folder(args, f"answers-{Path(args.answers).stem}")
        data, _ = _data(task, args, out)
        questions = _questions(task, data, None, out, args, answers=Path(args.answers))
        return harness.score_outside_answers(task, questions, Path(args.answers), out)

    args.recipe = args.recipe or args.recipe_old_spelling
    if args.device is not None:
        models.resolve_device(args.device)   # refused before any data is read
    args.method = args.method or "none"
    methods = list(variants) if variants is not None else parse_methods(args.method)
    recipe_changes = get_preset(args.preset, args.benchmark).recipe if args.preset else {}
    embedded = builtin.builtin_model() if args.model is None and backend is None else None
    model_name = embedded.name if embedded else (backend.name if backend else Path(args.model).name)
    out = _output_folder(args, f"{model_name}-{args.method}")
    chosen = _variants(args, methods, embedded, variants)
    harness.check_knobs(chosen)

    if embedded:
        backend = embedded.build()
        if args.device is not None or args.dtype is not None:   # the built-in model is built on the CPU
            device = args.device or "cpu"
            backend.model.to(device=device, dtype=models.resolve_dtype(args.dtype, device))
    elif backend is None:
        device = args.device or harness.current_process().device  # several processes on GPUs: one GPU each
        backend = models.load_backend(args.model, args.recipe, device, args.dtype, work_dir=out)
    if embedded or args.model is not None:   # a backend passed in comes with its threads chosen
        models.choose_threads(backend.model, args.threads)
    harness.check_variants(backend.model, chosen, decoding)
    data, data_setting = _data(task, args, out)
    recipe = backend.recipe
    backend.recipe = dataclasses.replace(recipe, **recipe_changes)  # for this run only: a backend passed in keeps its own
    try:
        results, comparison = _evaluate(task, args, backend, embedded, data, data_setting, out, chosen, decoding)
    finally:
        backend.recipe = recipe
    if len(methods) == 1 or results[methods[0]] is None:
        return results[methods[0]]
    return {"methods": results, "comparison": comparison}


def _output_folder(args, tag: str) -> Path:
    """``--output``, or ``hallupatch_output/<benchmark>-<tag>``; checked to be a writable folder (nothing is created)."""
    if args.output is None:
        args.output = str(Path("hallupatch_output") / folder_name(f"{args.benchmark}-{tag}"))
    out = Path(args.output)
    check_output_folder(out)
    return out


def _evaluate(task: Task, args, backend, embedded, data, data_setting, out: Path, variants, decoding: Decoding):
    """Load the questions, record the settings and run the harness (``run`` has loaded the backend)."""
    questions = _questions(task, data, backend.recipe.name, out, args)
    max_new_tokens = args.max_new_tokens or (embedded.max_new_tokens(task.free_text) if embedded else None) \
        or task.max_new_tokens or backend.recipe.max_new_tokens
    settings = {
        "benchmark": args.benchmark,
        "model": f"embedded:{embedded.name}" if embedded else _where(args.model) if args.model else backend.name,
        "recipe": backend.recipe.name,
        "prompt_template": backend.recipe.template,
        "question_style": "as_is" if task.free_text else backend.recipe.question_style,
        "pad_to_square": backend.recipe.pad_to_square,
        "preset": args.preset,
        "data": data_setting,
        "max_new_tokens": max_new_tokens,
        "limit": args.limit,
        "dtype": str(next(backend.model.parameters()).dtype).replace("torch.", ""),
        "decoding": decoding.settings(),
        **task.settings(),
    }
    plan = harness.Run(
        backend=backend, questions=questions, out_dir=out, methods=variants, settings=settings,
        batch_size=args.batch_size or (embedded.batch_size if embedded else 1), max_new_tokens=max_new_tokens,
        overwrite=args.overwrite, progress=not args.no_progress, decoding=decoding,
    )
    return harness.evaluate(task, plan)


def _data(task: Task, args, out: Path):
    """The data path and its ``run.json`` setting: ``--data``, else the task's built-in data."""
    if args.data is not None:
        if args.lab_split is not None:
            raise ValueError("--lab-split chooses the built-in data's split: leave it out with --data")
        return Path(args.data) if Path(args.data).exists() else args.data, _where(args.data)
    embedded = task.embedded_data(out, args.lab_split or "test")
    if embedded is None:
        raise DataError(f"{task.title} needs --data: {task.data_help}")
    path, label = embedded
    return path, label


def _questions(task: Task, data, recipe, out: Path, args, answers: Optional[Path] = None):
    questions = task.load(data, recipe, out, answers)
    if args.limit is not None:
        questions = questions[: args.limit]
    harness.check_unique(questions)
    return questions


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point: errors become one clear line on stderr and exit status 2; Ctrl-C one line
    saying where the run stopped, and exit status 130."""
    try:
        run(argv)
    except (DataError, StoreError, ValueError, TypeError, ImportError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. a folder that turned read-only or a full disk while writing results
        print(f"error: {err.filename or 'a file'}: {err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        where = (f" in {stop.out_dir} after {stop.answered} of {stop.total} question(s), each answer saved"
                 if isinstance(stop, harness.RunInterrupted) else "")
        print(f"interrupted{where}; rerun the same command to resume where it stopped", file=sys.stderr)
        return 130
    return 0
