"""``--preset NAME``: the settings of a published evaluation script, one flag away (``--preset help`` lists them).

A preset is the command-line arguments the script's settings translate to, plus recipe changes that
have no flag of their own (the question style, square padding). Flags given on the command line win
over the preset's; ``run.json`` records the preset's name next to the resulting settings. Where the
published script does something broken, the description says so and the preset does what the paper
describes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Sequence, Tuple

#: the region-caption paper's layer prior over layers 0-7 (its eval/run_with_prob/eval_phd.sh)
REGION_CAPTION_PRIOR = "0.13899,0.10750,0.09652,0.12360,0.12347,0.12838,0.12860,0.15291"


#: ``Preset.benchmark`` of a preset that every benchmark takes
EVERY_BENCHMARK = "every benchmark"


@dataclass(frozen=True)
class Preset:
    name: str
    benchmark: str                            # the benchmark it is for, or EVERY_BENCHMARK
    source: str                               # the published script
    description: str                          # what it sets, and where it departs from the script
    args: Tuple[str, ...]                     # command-line arguments, before the user's own
    recipe: Mapping[str, Any] = field(default_factory=dict)   # Recipe fields to change (no flag of their own)
    # further arguments on some benchmarks (a published script's generation length), after ``args``
    benchmark_args: Mapping[str, Tuple[str, ...]] = field(default_factory=dict)


def _memvr(ratio: float, start: int, end: int) -> Tuple[str, ...]:
    return ("--method", "memvr", "--retracing-ratio", str(ratio), "--entropy-threshold", "0.75",
            "--starting-layer", str(start), "--ending-layer", str(end))


#: OPERA's scripts: pope_eval.py generates 10 new tokens, chair_eval.py 512; both run 5 beams (--beam 5)
OPERA_LENGTHS = {"pope": ("--max-new-tokens", "10"), "chair": ("--max-new-tokens", "512")}
OPERA_SOURCE = "OPERA pope_eval.py / chair_eval.py (opera_decoding=True, --beam 5)"

PRESETS: Dict[str, Preset] = {p.name: p for p in [
    Preset("opera", EVERY_BENCHMARK, OPERA_SOURCE,
           "OPERA with its published knobs (scale 50, threshold 15, 5 candidates, penalty 1) in 5-beam search; "
           "POPE 10 new tokens, CHAIR 512, as the scripts", ("--method", "opera", "--num-beams", "5"),
           benchmark_args=OPERA_LENGTHS),
    Preset("opera-fast", EVERY_BENCHMARK, OPERA_SOURCE + ", the README's fast setting",
           "OPERA's fast setting (threshold 25, 1 candidate) in 5-beam search; POPE 10 new tokens, CHAIR 512",
           ("--method", "opera", "--num-beams", "5", "--opera-threshold", "25", "--num-attn-candidates", "1"),
           benchmark_args=OPERA_LENGTHS),
    Preset("memvr-mme-llava", "mme", "MemVR eval_scripts/llava/mme.sh (llava_model_vqa_loader, --temperature 0)",
           "LLaVA-1.5, MemVR ratio 0.12, threshold 0.75, layers 5..16, max_new_tokens 1, greedy; LLaVA's "
           "short-answer prompt", _memvr(0.12, 5, 16) + ("--max-new-tokens", "1")),
    Preset("memvr-mme-qwen", "mme", "MemVR eval_scripts/qwen/mme.sh (qwen_model_vqa_loader)",
           "Qwen-VL-Chat, MemVR ratio 0.28, threshold 0.75, layers 9..16, max_new_tokens 1, greedy; the question "
           "with LLaVA's short-answer suffix (the script asks llava_mme.jsonl's text) in Qwen's chat format, as "
           "its model.chat builds it. The published Qwen path is reported (issue 10) not to retrace; this preset "
           "retraces, as the paper describes", _memvr(0.28, 9, 16) + ("--max-new-tokens", "1"),
           {"question_style": "short_answer"}),
    Preset("memvr-mme-glm", "mme", "MemVR eval_scripts/glm/mme.sh (glm_model_vqa_loader)",
           "GLM-4V-9b, MemVR ratio 0.28, threshold 0.75, layers 9..16, max_new_tokens 1, greedy; LLaVA's short-"
           "answer suffix in GLM's chat template. The published script passes --apply-memvr default, which never "
           "applies MemVR; this preset retraces, as the paper describes", _memvr(0.28, 9, 16) + ("--max-new-tokens", "1"),
           {"question_style": "short_answer"}),
    Preset("memvr-chair-llava", "chair", "MemVR eval_scripts/llava/chair.sh (llava_model_vqa_loader_chair)",
           "LLaVA-1.5 captions of the CHAIR images, MemVR ratio 0.31, threshold 0.75, layers 5..16, "
           "max_new_tokens 1024, greedy, the image preprocessed without square padding (as the script does)",
           _memvr(0.31, 5, 16) + ("--max-new-tokens", "1024"), {"pad_to_square": False}),
    Preset("regcap-phd", "phd", "unleash-eliminate eval/run_with_prob/eval_phd.sh (phd_eval_w_prob.py)",
           "layer contrast over layers 0-7 with the paper's prior, max_new_tokens 10, repetition penalty 1.05, "
           "greedy", ("--method", "dola", "--candidate-layers", "0,1,2,3,4,5,6,7", "--layer-prior",
                      REGION_CAPTION_PRIOR, "--max-new-tokens", "10", "--repetition-penalty", "1.05")),
    Preset("vcd-pope-llava", "pope", "VCD experiments/cd_scripts/llava1.5_pope.bash (eval/object_hallucination_vqa_llava.py)",
           "LLaVA-1.5, VCD alpha 1, beta 0.2 (the bash script's; the Python script's default is 0.1), noise step 500, "
           "sampling at temperature 1, top-p 1, no top-k (the script passes top_k=None), seed 55, max_new_tokens 1024. "
           "The script asks the question with "
           "' Please answer this question with one word.'; the recipe's prompt is used here",
           ("--method", "vcd", "--cd-alpha", "1", "--cd-beta", "0.2", "--noise-step", "500", "--do-sample",
            "--temperature", "1", "--top-p", "1", "--top-k", "0", "--seed", "55", "--max-new-tokens", "1024")),
    Preset("icd-pope-llava", "pope", "ICD experiments/gen_scripts/icd_llava_pope.py",
           "LLaVA-1.5, ICD alpha 1, beta 0.1, the first of the five disturbing instructions (the script loops over "
           "all five: --icd-instruction 0..4), sampling at temperature 1, top-p 1, top-k 50 (generation_config's: the "
           "script passes none), max_new_tokens 1024. The published "
           "LLaVA script dies on an ImportError (it imports a name icd_sample_llava does not define); this preset "
           "runs what it means to run", ("--method", "icd", "--cd-alpha", "1", "--cd-beta", "0.1", "--icd-instruction",
                                         "0", "--do-sample", "--temperature", "1", "--top-p", "1",
                                         "--top-k", "50", "--max-new-tokens", "1024")),
    Preset("m3id-mme-llava", "mme", "AvisC experiments/cd_scripts/mme_eval.sh with model=llava, use_m3id=True "
           "(experiments/eval/mme_llava.py, avisc_utils/avisc_sample.py)",
           "LLaVA-1.5, M3ID beta 0.1, lambda 0.02 (hard-coded there), sampling at temperature 1, top-p 1, no top-k "
           "(top_k=None passed), seed 55, max_new_tokens 64, the question as asked (mme_llava.py adds no suffix; it "
           "keeps the question's first line and maps answers to Yes/No with its recorder(), which hallupatch's MME "
           "parsing does not). No AvisC POPE script runs M3ID",
           ("--method", "m3id", "--cd-beta", "0.1", "--do-sample", "--temperature", "1", "--top-p", "1", "--top-k",
            "0", "--seed", "55", "--max-new-tokens", "64"), {"question_style": "as_is"}),
    Preset("pai-pope-llava", "pope", "PAI README: pope_eval.py --use-attn --alpha 0.2 --use-cfg --gamma 1.1 "
           "--start-layer 2 --end-layer 32", "LLaVA-1.5, PAI alpha 0.2, gamma 1.1 (the README's command; "
           "pope_eval.py's own --gamma default is 2, and a bare pope_eval.py run has both parts off), layers 2..31, greedy "
           "(no --sample), max_new_tokens 512. PAI's prompt is the vicuna_v1 system text with no space before "
           "'USER:'; the recipe's prompt is used here",
           ("--method", "pai", "--pai-alpha", "0.2", "--pai-gamma", "1.1", "--pai-start-layer", "2",
            "--pai-end-layer", "32", "--max-new-tokens", "512")),
    Preset("regcap-captions", "regcap", "unleash-eliminate region captions (eval/run/run_layers.sh, cyc.sh)",
           "region captions of 50 new tokens, greedy", ("--max-new-tokens", "50")),
]}


def preset_help() -> str:
    """The ``--preset help`` listing: name, benchmark, source and description of every preset."""
    lines = ["presets (python -m hallupatch.eval BENCHMARK --preset NAME):"]
    for p in PRESETS.values():
        lines += [f"  {p.name}  [{p.benchmark}]", f"      from: {p.source}", f"      {p.description}",
                  f"      sets: {' '.join(p.args)}" + "".join(f" {k}={v}" for k, v in p.recipe.items())]
        lines += [f"      {benchmark}: {' '.join(extra)}" for benchmark, extra in p.benchmark_args.items()]
    return "\n".join(lines)


def get_preset(name: str, benchmark: str) -> Preset:
    """The preset ``name`` for ``benchmark``; ``ValueError`` naming the valid ones otherwise."""
    if name not in PRESETS:
        from hallupatch.names import did_you_mean

        raise ValueError(f"unknown preset {name!r}{did_you_mean(name, PRESETS)}; choose one of {sorted(PRESETS)} (--preset help describes them)")
    preset = PRESETS[name]
    if preset.benchmark not in (benchmark, EVERY_BENCHMARK):
        raise ValueError(f"preset {name!r} is for {preset.benchmark}, not {benchmark}: "
                         f"python -m hallupatch.eval {preset.benchmark} --preset {name}")
    return preset


def with_preset(argv: Sequence[str], preset: Preset) -> List[str]:
    """``argv`` (benchmark first) with the preset's arguments before the user's, so the user's win."""
    return [argv[0], *preset.args, *preset.benchmark_args.get(argv[0], ()), *argv[1:]]
