"""``--preset NAME`` (issue 10 §4): the published scripts' settings, listed by ``--preset help``, recorded in run.json."""
import dataclasses
import json

import pytest

from hallupatch.eval import cli, models
from hallupatch.eval.presets import PRESETS
from hallupatch.testing.mme_sample import write_mme_sample
from hallupatch.testing.tiny import build_tiny_llava_checkpoint

# the published scripts' values, typed from the scripts (MemVR eval_scripts/*/mme.sh and llava/chair.sh,
# unleash-eliminate eval/run_with_prob/eval_phd.sh + phd_eval_w_prob.py), not from the presets module
PUBLISHED = {
    "memvr-mme-llava": ("mme", dict(method="memvr", retracing_ratio=0.12, entropy_threshold=0.75, starting_layer=5,
                                    ending_layer=16, max_new_tokens=1), {}),
    "memvr-mme-qwen": ("mme", dict(method="memvr", retracing_ratio=0.28, entropy_threshold=0.75, starting_layer=9,
                                   ending_layer=16, max_new_tokens=1), {"question_style": "short_answer"}),
    "memvr-mme-glm": ("mme", dict(method="memvr", retracing_ratio=0.28, entropy_threshold=0.75, starting_layer=9,
                                  ending_layer=16, max_new_tokens=1), {"question_style": "short_answer"}),
    "memvr-chair-llava": ("chair", dict(method="memvr", retracing_ratio=0.31, entropy_threshold=0.75, starting_layer=5,
                                        ending_layer=16, max_new_tokens=1024), {"pad_to_square": False}),
    "regcap-phd": ("phd", dict(method="dola", candidate_layers=[0, 1, 2, 3, 4, 5, 6, 7], max_new_tokens=10,
                               repetition_penalty=1.05,
                               layer_prior=[0.13899, 0.10750, 0.09652, 0.12360, 0.12347, 0.12838, 0.12860, 0.15291]), {}),
    "regcap-captions": ("regcap", dict(max_new_tokens=50), {}),
    # VCD experiments/cd_scripts/llava1.5_pope.bash; ICD experiments/gen_scripts/icd_llava_pope.py; AvisC
    # experiments/cd_scripts/mme_eval.sh + mme_llava.py; PAI README's pope_eval.py command
    "vcd-pope-llava": ("pope", dict(method="vcd", cd_alpha=1.0, cd_beta=0.2, noise_step=500, do_sample=True,
                                    temperature=1.0, top_p=1.0, top_k=0, seed=55, max_new_tokens=1024), {}),
    "icd-pope-llava": ("pope", dict(method="icd", cd_alpha=1.0, cd_beta=0.1, icd_instruction=0, do_sample=True,
                                    temperature=1.0, top_p=1.0, top_k=50, max_new_tokens=1024), {}),
    "m3id-mme-llava": ("mme", dict(method="m3id", cd_beta=0.1, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                   seed=55,
                                   max_new_tokens=64), {"question_style": "as_is"}),
    "pai-pope-llava": ("pope", dict(method="pai", pai_alpha=0.2, pai_gamma=1.1, pai_start_layer=2, pai_end_layer=32,
                                    max_new_tokens=512), {}),
    # OPERA pope_eval.py / chair_eval.py: --beam 5, scale 50, threshold 15, 5 candidates, penalty 1;
    # max_new_tokens 10 (POPE) and 512 (CHAIR); the README's fast setting: threshold 25, 1 candidate
    "opera": ("pope", dict(method="opera", num_beams=5, max_new_tokens=10), {}),
    "opera-fast": ("pope", dict(method="opera", num_beams=5, max_new_tokens=10, opera_threshold=25,
                                num_attn_candidates=1), {}),
}


def test_preset_help_lists_every_preset(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["mme", "--preset", "help"])
    assert exit_info.value.code == 0
    listing = capsys.readouterr().out
    assert set(PUBLISHED) == set(PRESETS)
    for name, preset in PRESETS.items():
        assert name in listing and preset.source in listing
    assert "never applies MemVR" in listing        # GLM's published script: said, and done as the paper describes


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_each_preset_sets_the_published_values(name):
    benchmark, values, recipe = PUBLISHED[name]
    args = cli.parse_args([benchmark, "--preset", name])
    for key, value in values.items():
        assert getattr(args, key) == value, (name, key)
    assert dict(PRESETS[name].recipe) == recipe and args.preset == name
    # greedy as the MemVR, region-caption and PAI scripts, beam search as OPERA's; VCD, ICD and AvisC only sample
    assert args.do_sample == values.get("do_sample", False)
    assert args.num_beams == values.get("num_beams", 1)


@pytest.mark.parametrize("name", ["opera", "opera-fast"])
def test_opera_presets_take_each_benchmark_s_published_length(name):
    for benchmark, length in (("pope", 10), ("chair", 512), ("mme", None), ("phd", None)):
        args = cli.parse_args([benchmark, "--preset", name])
        assert args.method == "opera" and args.num_beams == 5 and args.max_new_tokens == length
        assert (args.opera_threshold, args.num_attn_candidates) == ((25, 1) if name == "opera-fast" else (None, None))


def test_flags_win_over_the_preset_and_a_wrong_benchmark_is_refused(capsys):
    args = cli.parse_args(["mme", "--preset", "memvr-mme-llava", "--max-new-tokens", "3", "--retracing-ratio", "0.2"])
    assert args.max_new_tokens == 3 and args.retracing_ratio == 0.2 and args.starting_layer == 5
    with pytest.raises(ValueError, match="preset 'regcap-phd' is for phd, not mme"):
        cli.parse_args(["mme", "--preset", "regcap-phd"])
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        cli.parse_args(["mme", "--preset", "nope"])
    assert cli.main(["pope", "--preset", "memvr-mme-llava"]) == 2
    assert capsys.readouterr().err.startswith("error: preset 'memvr-mme-llava' is for mme")


@pytest.fixture(scope="module")
def deep_backend(tmp_path_factory):
    """A tiny llava-hf model deep enough for the published layer windows (ending layer 16)."""
    path = build_tiny_llava_checkpoint(tmp_path_factory.mktemp("deep"), seed=0, num_layers=17, hidden_size=32)
    return models.load_backend(str(path), device="cpu")


@pytest.mark.parametrize("name", ["memvr-mme-llava", "memvr-mme-qwen"])
def test_a_preset_run_records_its_settings_in_run_json(tmp_path, deep_backend, monkeypatch, name):
    data = write_mme_sample(tmp_path / "MME_Benchmark_release_version")
    # a recipe that asks questions as written (as Qwen's and GLM's do): the Qwen preset changes that to
    # LLaVA's short-answer suffix, the LLaVA preset keeps the checkpoint's recipe
    as_written = dataclasses.replace(deep_backend.recipe, question_style="as_is")
    monkeypatch.setattr(deep_backend, "recipe", as_written if name == "memvr-mme-qwen" else deep_backend.recipe)
    recipe_before = deep_backend.recipe
    cli.run(["mme", "--preset", name, "--data", str(data), "--output", str(tmp_path / "out"), "--limit", "2",
             "--no-progress"], backend=deep_backend)
    assert deep_backend.recipe == recipe_before            # the preset's recipe change lasts for its run only
    settings = json.loads((tmp_path / "out" / "run.json").read_text())
    _, values, recipe = PUBLISHED[name]
    assert settings["preset"] == name and settings["method"] == "memvr"
    assert settings["max_new_tokens"] == 1
    assert settings["knobs"] == {k: values[k] for k in ("retracing_ratio", "entropy_threshold", "starting_layer",
                                                       "ending_layer")}
    assert settings["decoding"]["do_sample"] is False and settings["decoding"]["num_beams"] == 1
    assert settings["question_style"] == recipe.get("question_style", deep_backend.recipe.question_style)
    answers = [json.loads(line) for line in (tmp_path / "out" / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 2 and all(a["new_tokens"] <= 1 for a in answers)
    assert all(a["prompt"].endswith("Answer the question using a single word or phrase.") for a in answers)
