"""``python -m hallupatch.eval {mme,pope} ...``: measure a model with and without a mitigation method."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hallupatch.eval import caption_cli, models, runner, sample, tasks
from hallupatch.eval.store import StoreError

EMBEDDED_MODEL = "embedded:tiny-llava"
EMBEDDED_DATA = f"embedded:mme-sample-v{sample.SAMPLE_VERSION}"
EMBEDDED_MAX_NEW_TOKENS = 8    # the random tiny model rarely stops by itself; 8 tokens hold any yes/no
EMBEDDED_BATCH_SIZE = 8
EMBEDDED_MEMVR_LAYERS = {"starting_layer": 0, "ending_layer": 3}  # the published 5..16 exceed its 4 layers
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
}


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

With no --model and no --data, `python -m hallupatch.eval mme` runs a tiny built-in LLaVA on a small
built-in MME-format sample in a few seconds: a check that everything works, not a real score.

Real runs:
  python -m hallupatch.eval mme  --model path/to/llava-1.5-7b-hf --data MME_Benchmark_release_version
  python -m hallupatch.eval mme  --model CKPT --data lmms-lab-MME-folder --method memvr --batch-size 8
  python -m hallupatch.eval pope --model CKPT --data POPE/coco --image-folder val2014
  accelerate launch -m hallupatch.eval mme --model CKPT --data MME   # one shard per process
  python -m hallupatch.eval mme --answers llava_answers.jsonl --data MME   # score answers made elsewhere

Caption hallucination: chair (COCO captions), regcap (RefCOCOg region captions), phd (PhD yes/no);
  python -m hallupatch.eval chair --help  lists their data layouts.

Rerunning the same command resumes: finished questions are skipped. Results go to --output:
answers.jsonl, scores.json, run.json (settings) and, for MME, mme_tool/<subtask>.txt for the
official eval_tool/calculation.py.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hallupatch.eval", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("benchmark", choices=["mme", "pope", *caption_cli.BENCHMARKS], help="the benchmark")
    p.add_argument("--model", help="checkpoint folder (llava-hf, original LLaVA, Qwen-VL-Chat, GLM-4V-9b); "
                   "default: the built-in tiny LLaVA")
    p.add_argument("--family", choices=sorted(models.RECIPES), help="model family and prompt recipe (default: from config.json)")
    p.add_argument("--data", help="MME: the released folder (MME_Benchmark_release_version) or a `datasets` dataset "
                   "(save_to_disk folder, parquet/arrow files, or a cached hub name such as lmms-lab/MME); "
                   "POPE: folder with coco_pope_<split>.json files. Default (MME only): the built-in sample")
    p.add_argument("--image-folder", help="POPE: the COCO val2014 images (default: DATA/images or DATA/val2014)")
    p.add_argument("--splits", nargs="+", choices=["random", "popular", "adversarial"], help="POPE splits (default: all found)")
    p.add_argument("--method", default="none", help="none, memvr, dola (layer contrast) or memvr+dola")
    for flag, (_, typ, text) in KNOBS.items():
        p.add_argument(flag, type=typ, help=text)
    p.add_argument("--output", help="results folder (default: ./hallupatch_output/<benchmark>-<model>-<method>)")
    p.add_argument("--batch-size", type=int, help="questions per generate() call, left-padded; answers equal those "
                   "of batch size 1 (default 1; 8 for the built-in model)")
    p.add_argument("--limit", type=int, help="only the first N questions")
    p.add_argument("--max-new-tokens", type=int, help="default: the family's published value (LLaVA-1.5: 128)")
    p.add_argument("--device", help="cuda, cpu, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: float16 on GPU, float32 on CPU")
    p.add_argument("--answers", help="score this answers JSONL (LLaVA format: question_id, text[, prompt]) without a model")
    p.add_argument("--overwrite", action="store_true", help="discard a previous run in --output instead of resuming it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    caption_cli.add_arguments(p)
    return p


def _load_questions(args) -> List[tasks.Question]:
    if args.benchmark == "mme":
        if args.data is None:
            return tasks.load_mme_folder(sample.write_mme_sample(Path(args.output) / "sample_data"))
        return tasks.load_mme(args.data)
    if args.data is None:
        raise tasks.DataError("POPE needs --data: a folder with coco_pope_random/popular/adversarial.json and --image-folder")
    return tasks.load_pope(args.data, args.image_folder, args.splits)


def _where(path: str) -> str:
    """A local path made absolute (so a resume from another folder matches); a hub name as given."""
    return str(Path(path).resolve()) if Path(path).exists() else path


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-")


def _knobs(args, embedded: bool) -> Dict[str, Any]:
    knobs = {field: getattr(args, flag[2:].replace("-", "_")) for flag, (field, _, _) in KNOBS.items()}
    knobs = {k: v for k, v in knobs.items() if v is not None}
    if args.method == "none":
        if knobs:
            raise ValueError(f"method knobs {sorted(knobs)} need --method memvr (or another method)")
        return {}
    if embedded and "memvr" in args.method:
        knobs = {**EMBEDDED_MEMVR_LAYERS, **knobs}
    return knobs


def run(argv: Optional[Sequence[str]] = None, backend=None) -> Optional[Dict[str, Any]]:
    """Run the CLI; returns the scores (on the main process) and raises on errors.

    ``backend``: an already loaded :class:`~hallupatch.eval.models.Backend` instead of ``--model``.
    """
    args = build_parser().parse_args(argv)
    for flag in ("limit", "batch_size", "max_new_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1; got {value}")
    embedded = args.model is None and backend is None
    model_name = EMBEDDED_MODEL.split(":")[1] if embedded else (backend.name if backend else Path(args.model).name)
    if args.output is None:
        tag = f"answers-{Path(args.answers).stem}" if args.answers else f"{model_name}-{args.method}"
        args.output = str(Path("hallupatch_output") / _slug(f"{args.benchmark}-{tag}"))
    out = Path(args.output)
    if args.benchmark in caption_cli.BENCHMARKS:
        return caption_cli.run_from_cli(args, backend, embedded)
    proc = runner.current_process()

    questions = _load_questions(args)
    if args.limit is not None:
        questions = questions[: args.limit]
    runner.check_unique(questions)

    if args.answers:
        texts = runner.load_external_answers(Path(args.answers), questions)
        out.mkdir(parents=True, exist_ok=True)
        source = {"answers": str(Path(args.answers).resolve())}
        scores = runner.write_results(args.benchmark, questions, texts, out, source)
        _report(scores, out, None)
        return scores

    knobs = _knobs(args, embedded)
    if embedded:
        backend = sample.tiny_backend()
    elif backend is None:
        device = args.device or proc.device  # several processes on GPUs: one GPU each
        backend = models.load_backend(args.model, args.family, device, args.dtype, work_dir=out)
    if args.method != "none":
        import hallupatch

        hallupatch.apply(backend.model, method=args.method, **knobs)
    try:
        return _answer_and_score(args, backend, questions, out, proc, embedded, knobs)
    finally:
        if args.method != "none":
            hallupatch.remove(backend.model)


def _answer_and_score(args, backend, questions, out: Path, proc, embedded: bool, knobs) -> Optional[Dict[str, Any]]:
    max_new_tokens = args.max_new_tokens or (EMBEDDED_MAX_NEW_TOKENS if embedded else backend.recipe.max_new_tokens)
    settings = {
        "benchmark": args.benchmark,
        "model": EMBEDDED_MODEL if embedded else _where(args.model) if args.model else backend.name,
        "family": backend.recipe.family,
        "prompt_template": backend.recipe.template,
        "question_style": backend.recipe.question_style,
        "data": EMBEDDED_DATA if args.data is None else _where(args.data),
        "image_folder": str(Path(args.image_folder).resolve()) if args.image_folder else None,
        "splits": args.splits,
        "method": args.method,
        "knobs": knobs,
        "max_new_tokens": max_new_tokens,
        "dtype": str(next(backend.model.parameters()).dtype).replace("torch.", ""),
        "decoding": "greedy",
    }
    runner.open_run(out, settings, proc, overwrite=args.overwrite)

    start = time.perf_counter()
    produced = runner.answer_questions(
        backend, questions, out, batch_size=args.batch_size or (EMBEDDED_BATCH_SIZE if embedded else 1),
        max_new_tokens=max_new_tokens, proc=proc,
        trace="memvr" in args.method.split("+"), progress=not args.no_progress,
    )
    elapsed = time.perf_counter() - start
    proc.barrier()
    if not proc.is_main:
        return None
    scores = runner.finish(args.benchmark, questions, out, settings)
    _report(scores, out, (produced, elapsed, proc.world))
    return scores


def _report(scores, out: Path, timing) -> None:
    tool = f", official-tool files: {out / 'mme_tool'}" if scores["benchmark"] == "mme" else ""
    runner.print_report(runner.format_table(scores), timing, f"{out / 'scores.json'}{tool}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point: errors become one clear line on stderr and exit status 2."""
    try:
        run(argv)
    except (tasks.DataError, StoreError, ValueError, TypeError, ImportError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
