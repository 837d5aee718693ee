"""``python -m hallupatch.eval --method none,vcd,icd,m3id,pai`` (issue 18 §4): one run, the paired comparison,
scoped knob flags, ICD's branch prompt built by the backend, batches equal to batch size 1."""
import json

import pytest

import hallupatch
from hallupatch.eval import cli

ARGS = ["--limit", "4", "--max-new-tokens", "3", "--no-progress"]


def _answers(folder):
    return {json.loads(line)["question_id"]: json.loads(line)["text"]
            for line in (folder / "answers.jsonl").read_text().splitlines()}


def test_baselines_compare_in_one_run_and_batches_change_nothing(tmp_path, backend, mme_folder):
    methods = "none,vcd,icd,m3id,pai"
    common = ["mme", "--data", str(mme_folder), "--method", methods, "--noise-seed", "3", "--pai-end-layer", "6", *ARGS]
    one = cli.run(common + ["--output", str(tmp_path / "b1"), "--batch-size", "1"], backend=backend)
    four = cli.run(common + ["--output", str(tmp_path / "b4"), "--batch-size", "4"], backend=backend)
    assert set(one["methods"]) == set(methods.split(",")) and one["comparison"]
    for method in methods.split(","):
        assert _answers(tmp_path / "b1" / method) == _answers(tmp_path / "b4" / method), method
        run = json.loads((tmp_path / "b1" / method / "run.json").read_text())
        assert run["method"] == method
    assert json.loads((tmp_path / "b1" / "vcd" / "run.json").read_text())["knobs"]["noise_seed"] == 3
    assert json.loads((tmp_path / "b1" / "pai" / "run.json").read_text())["knobs"] == {"end_layer": 6}


def test_icd_branch_prompt_is_built_by_the_backend(tmp_path, backend, mme_folder, monkeypatch):
    from hallupatch.eval import models

    built = []

    def spy(model, texts, encode):
        out = branch_call_inputs(model, texts, encode)
        built.append((list(texts), out, hallupatch.engine.get_patch(model).configs["icd"]))
        return out

    branch_call_inputs = models.branch_call_inputs
    monkeypatch.setattr(models, "branch_call_inputs", spy)
    cli.run(["mme", "--data", str(mme_folder), "--method", "icd", "--icd-instruction", "3", "--cd-alpha", "2",
             "--batch-size", "2", "--output", str(tmp_path), *ARGS], backend=backend)
    assert built
    tokenizer = backend.processor.tokenizer
    for texts, out, config in built:
        assert config.alpha == 2.0 and config.instruction == 3
        assert texts[0].startswith(backend.recipe.template.split(" USER:")[0])
        for text, ids, mask in zip(texts, out["input_ids_cd"], out["attention_mask_cd"]):
            expected = tokenizer(hallupatch.icd_prompt(text, 3)).input_ids
            assert ids[mask.bool()].tolist() == expected     # left-padded, the disturbed prompt exactly
            assert hallupatch.ICD_INSTRUCTIONS[3].lower().split()[0] in tokenizer.decode(ids[mask.bool()])


def test_scoped_knob_flags(tmp_path, backend, mme_folder):
    with pytest.raises(ValueError, match="--pai-alpha is a knob of pai"):
        cli.run(["mme", "--data", str(mme_folder), "--method", "none,vcd", "--pai-alpha", "0.5",
                 "--output", str(tmp_path), *ARGS], backend=backend)
    args = cli.parse_args(["mme", "--method", "vcd,pai", "--cd-alpha", "0.5", "--pai-alpha", "0.3"])
    variants = cli._variants(args, ["vcd", "pai"], None)
    assert variants["vcd"].knobs == {"alpha": 0.5} and variants["pai"].knobs == {"alpha": 0.3}
    with pytest.raises(ValueError, match=r"instruction index must be in \[0, 4\]"):
        cli.run(["mme", "--method", "icd", "--icd-instruction", "9", "--data", str(mme_folder),
                 "--output", str(tmp_path / "bad"), *ARGS], backend=backend)


def test_vcd_noise_from_the_global_generator_is_seeded_per_question(tmp_path, backend, mme_folder):
    """Without --noise-seed VCD draws its noise from the global generator at every generate() call: with
    --seed each question is answered on its own seed, so the batch size changes no answer."""
    from hallupatch.eval import harness

    assert harness.draws_random_numbers(harness.Variant("vcd", {}))
    assert not harness.draws_random_numbers(harness.Variant("vcd", {"noise_seed": 1}))
    assert not harness.draws_random_numbers(harness.Variant("icd", {}))
    common = ["mme", "--data", str(mme_folder), "--method", "vcd", "--cd-beta", "0", "--seed", "7", *ARGS]
    cli.run(common + ["--output", str(tmp_path / "b1"), "--batch-size", "1"], backend=backend)
    cli.run(common + ["--output", str(tmp_path / "b4"), "--batch-size", "4"], backend=backend)
    assert _answers(tmp_path / "b1") == _answers(tmp_path / "b4")
