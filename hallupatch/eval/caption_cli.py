"""``python -m hallupatch.eval chair|regcap|phd``: the caption-hallucination benchmarks in the harness.

Same loop as MME/POPE (:func:`hallupatch.eval.runner.answer_questions`: sharded, batched, appended
and flushed per batch, resumed on rerun, progress bar), with each benchmark's data, prompt, default
generation length, scorer and table from :mod:`hallupatch.eval.caption_tasks`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from . import caption_tasks as ct
from .phd import PHD_MODES
from .ranking import RankingBackend, load_scorer, scored_candidates
from .store import merge_answers, write_json
from .tasks import DataError, Question

BENCHMARKS = ("chair", "regcap", "phd")
DEFAULT_MAX_NEW_TOKENS = {"chair": ct.CHAIR_MAX_NEW_TOKENS, "regcap": ct.REGCAP_MAX_NEW_TOKENS, "phd": None}
# CHAIR and region captions ask for free text: the question goes to the model as it is. PhD asks yes/no
# questions, prompted like POPE (the family recipe's question style).
FREE_TEXT = ("chair", "regcap")

HELP = """\
Caption benchmarks (--data is required):
  python -m hallupatch.eval chair  --model CKPT --data COCO --num-images 500 --seed 0
        COCO/annotations/{instances,captions}_val2014.json and COCO/val2014/*.jpg
  python -m hallupatch.eval chair  --answers captions.jsonl --data COCO     # JSONL: image_id, caption
  python -m hallupatch.eval regcap --model CKPT --data regions.jsonl --image-folder train2014
        records: id, image, bbox [x,y,w,h], references [..]; or the RefCOCOg folder (refs(umd).p, instances.json)
  python -m hallupatch.eval phd    --model CKPT --data PhD --modes base iac icc ccs
        PhD/data.json and PhD/images/{train2014,val2014,CCS_images}/
"""


def add_arguments(parser) -> None:
    """The caption benchmarks' options, on the harness's parser."""
    g = parser.add_argument_group("chair / regcap / phd", description=HELP)
    g.add_argument("--num-images", type=int, default=ct.CHAIR_NUM_IMAGES,
                   help=f"CHAIR: images drawn from the annotations (default {ct.CHAIR_NUM_IMAGES}; 0 = all)")
    g.add_argument("--seed", type=int, default=0, help="CHAIR: seed of the image sample (default 0)")
    g.add_argument("--annotations", help="CHAIR: COCO annotations folder (default DATA/annotations)")
    g.add_argument("--refcocog-split", default="val", help="regcap with the RefCOCOg folder: split (default val)")
    g.add_argument("--modes", nargs="+", choices=PHD_MODES, help="PhD modes (default: all four)")
    g.add_argument("--rank-with", metavar="MODULE:FUNCTION",
                   help="regcap with --method dola: caption once per candidate layer and keep the caption this "
                   "scorer ranks best (scorer(sample, caption) -> score or (score, confidence); sample: the region "
                   "record with its image path); writes scored_candidates.json for python -m hallupatch.prior")


@dataclass
class Task:
    """One prepared caption benchmark."""

    questions: List[Question]
    # (texts, the questions of this run) -> (scores, per-caption details or None)
    score: Callable[[Mapping[str, str], List[Question]], Tuple[Dict[str, Any], Optional[List[dict]]]]
    table: Callable[[Mapping[str, Any]], str]
    settings: Dict[str, Any]
    image_ids: Optional[List[int]] = None  # CHAIR: the sample, saved so later runs caption the same images
    scorer_sample: Optional[Callable[[Question], Any]] = None  # what --rank-with's scorer gets per question


def _chair_ids(out: Path, args) -> Optional[List[int]]:
    saved = out / ct.IMAGE_IDS_FILE
    if saved.exists() and not args.overwrite:
        return [int(i) for i in json.loads(saved.read_text(encoding="utf-8"))]
    return None


def prepare(args, family: Optional[str], out: Path, external: Optional[Path] = None) -> Task:
    """Load ``args.benchmark``'s data into questions and a scorer.

    ``external``: an answers file made elsewhere (then no image is needed and CHAIR scores exactly
    the images that file captions).
    """
    if args.data is None:
        raise DataError(f"{args.benchmark} needs --data\n{HELP}")
    need_images = external is None
    if args.benchmark == "chair":
        if args.num_images is not None and args.num_images < 0:
            raise ValueError(f"--num-images must be >= 0 (0 = all); got {args.num_images}")
        pairs = ct.read_chair_answers(external) if external else None
        ids = sorted({i for i, _ in pairs}) if pairs else _chair_ids(out, args)
        data = ct.load_chair(args.data, num_images=args.num_images or None, seed=args.seed, image_ids=ids,
                             annotations=args.annotations, need_images=need_images)

        def score(texts, questions):
            chosen = pairs or [(int(q.image_id), texts[q.qid]) for q in questions if q.qid in texts]
            scores, details = ct.score_chair_pairs(chosen, data.ground_truth)
            return {**scores, "answered": len(chosen), "questions": len(pairs or questions)}, details

        settings = {"num_images": args.num_images, "seed": args.seed, "prompt": ct.CHAIR_PROMPT,
                    "annotations": str(Path(args.annotations).resolve()) if args.annotations else None}
        return Task(data.questions, score, ct.chair_table, settings, data.image_ids)
    if args.benchmark == "regcap":
        data = ct.load_regcap(args.data, family, args.image_folder, args.refcocog_split, need_images=need_images)
        def score_regions(texts, questions):
            asked = {q.qid for q in questions}
            return ct.score_regcap([s for s in data.samples if s.sample_id in asked], texts)

        by_id = {s.sample_id: s for s in data.samples}
        def scorer_sample(q):
            return {**dataclasses.asdict(by_id[q.qid]), "image_path": q.image}

        return Task(data.questions, score_regions, ct.regcap_table,
                    {"refcocog_split": args.refcocog_split, "rank_with": args.rank_with}, scorer_sample=scorer_sample)
    if args.benchmark == "phd":
        modes = args.modes or list(PHD_MODES)
        questions, meta = ct.load_phd_questions(args.data, modes, need_images=need_images)
        return Task(questions, lambda texts, asked: (ct.score_phd_answers(asked, meta, texts), None), ct.phd_table,
                    {"modes": modes})
    raise ValueError(f"unknown caption benchmark {args.benchmark!r}; use one of {BENCHMARKS}")


def _external_texts(args, task: Task) -> Dict[str, str]:
    if args.benchmark == "chair":
        return {}  # CHAIR reads its image_id/caption pairs itself
    texts = ct.read_id_text_answers(args.answers)
    known = {q.qid for q in task.questions}
    unknown = [k for k in texts if k not in known]
    if unknown:
        raise DataError(f"{args.answers}: question ids {unknown[:5]} are not in the loaded {args.benchmark} data")
    return texts


def _write_results(args, task: Task, texts: Mapping[str, str], out: Path, settings: Mapping[str, Any]) -> Dict:
    scores, details = task.score(texts, task.questions)
    scores["settings"] = dict(settings)
    write_json(out / "scores.json", scores)
    if details is not None:
        write_json(out / f"{args.benchmark}_captions.json", details)
    return scores


EMBEDDED_CAPTION_TOKENS = 24  # the random tiny model rarely stops by itself


def run_from_cli(args, backend=None, embedded: bool = False) -> Optional[Dict]:
    """Entry from :func:`hallupatch.eval.cli.run`: load the model (or the built-in tiny one) and run."""
    from . import cli, models, runner, sample

    if args.answers:
        return run(args, None, knobs={}, model_setting="")
    knobs = cli._knobs(args, embedded)
    if embedded:
        backend = sample.tiny_backend()
        if args.batch_size is None:
            args.batch_size = cli.EMBEDDED_BATCH_SIZE
        if args.max_new_tokens is None:
            args.max_new_tokens = EMBEDDED_CAPTION_TOKENS if args.benchmark in FREE_TEXT else cli.EMBEDDED_MAX_NEW_TOKENS
    elif backend is None:
        device = args.device or runner.current_process().device  # several processes on GPUs: one GPU each
        backend = models.load_backend(args.model, args.family, device, args.dtype, work_dir=Path(args.output))
    model = cli.EMBEDDED_MODEL if embedded else (str(Path(args.model).resolve()) if args.model else backend.name)
    if args.method == "none":
        return run(args, backend, knobs=knobs, model_setting=model)
    import hallupatch

    hallupatch.apply(backend.model, method=args.method, **knobs)
    try:
        return run(args, backend, knobs=knobs, model_setting=model)
    finally:
        hallupatch.remove(backend.model)


def run(args, backend, *, knobs: Mapping[str, Any], model_setting: str) -> Optional[Dict]:
    """Run a caption benchmark with the harness's parsed ``args`` (``--answers``: score only)."""
    from . import runner

    out = Path(args.output)
    if args.answers:
        out.mkdir(parents=True, exist_ok=True)
        task = prepare(args, None, out, external=Path(args.answers))
        scores = _write_results(args, task, _external_texts(args, task), out,
                                {"answers": str(Path(args.answers).resolve())})
        _report(args, task, scores, out, None)
        return scores

    proc = runner.current_process()
    task = prepare(args, backend.recipe.family, out)
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"--limit must be >= 1; got {args.limit}")
        task.questions = task.questions[: args.limit]
    runner.check_unique(task.questions)
    style = "as_is" if args.benchmark in FREE_TEXT else backend.recipe.question_style
    with _question_style(backend, style):
        return _answer_and_score(args, backend, task, proc, knobs, model_setting)


@contextlib.contextmanager
def _question_style(backend, style: str):
    """Ask with ``style`` for this run (the backend's recipe is restored afterwards)."""
    saved = backend.recipe
    backend.recipe = dataclasses.replace(saved, question_style=style)
    try:
        yield
    finally:
        backend.recipe = saved


def _answer_and_score(args, backend, task: Task, proc, knobs, model_setting: str) -> Optional[Dict]:
    from . import runner

    out = Path(args.output)
    max_new_tokens = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[args.benchmark] or backend.recipe.max_new_tokens
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1; got {max_new_tokens}")
    settings = {
        "benchmark": args.benchmark,
        "model": model_setting,
        "family": backend.recipe.family,
        "prompt_template": backend.recipe.template,
        "question_style": backend.recipe.question_style,
        "data": str(Path(args.data).resolve()),
        "image_folder": str(Path(args.image_folder).resolve()) if args.image_folder else None,
        "method": args.method,
        "knobs": dict(knobs),
        "max_new_tokens": max_new_tokens,
        "limit": args.limit,
        "dtype": str(next(backend.model.parameters()).dtype).replace("torch.", ""),
        "decoding": "greedy",
        **task.settings,
    }
    def save_image_sample():
        if task.image_ids is not None and (args.overwrite or not (out / ct.IMAGE_IDS_FILE).exists()):
            write_json(out / ct.IMAGE_IDS_FILE, task.image_ids)

    runner.open_run(out, settings, proc, overwrite=args.overwrite, on_main=save_image_sample)

    answering = backend
    if args.rank_with:
        if task.scorer_sample is None:
            raise ValueError(f"--rank-with ranks region captions: use it with regcap, not {args.benchmark}")
        answering = RankingBackend(backend, load_scorer(args.rank_with), task.scorer_sample)
    start = time.perf_counter()
    produced = runner.answer_questions(
        answering, task.questions, out, batch_size=args.batch_size or 1, max_new_tokens=max_new_tokens, proc=proc,
        trace="memvr" in args.method.split("+"), progress=not args.no_progress,
    )
    elapsed = time.perf_counter() - start
    proc.barrier()
    if not proc.is_main:
        return None
    merged = merge_answers(out, [q.qid for q in task.questions])
    missing = [q.qid for q in task.questions if q.qid not in merged]
    if missing:
        raise runner.StoreError(f"{len(missing)} question(s) have no answer in {out} (e.g. {missing[:3]}); "
                                "rerun the same command to answer them")
    scores = _write_results(args, task, {qid: r["text"] for qid, r in merged.items()}, out, settings)
    if args.rank_with:
        write_json(out / "scored_candidates.json", scored_candidates(merged))
    _report(args, task, scores, out, (produced, elapsed, proc.world))
    return scores


def _report(args, task: Task, scores: Mapping[str, Any], out: Path, timing) -> None:
    from . import runner

    extra = f", per-caption details: {out / (args.benchmark + '_captions.json')}" if args.benchmark in FREE_TEXT else ""
    runner.print_report(task.table(scores), timing, f"{out / 'scores.json'}{extra}")
