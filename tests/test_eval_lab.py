"""The lab as the built-in default of the benchmark commands, and `python -m hallupatch.eval lab`."""
import json
import math

import pytest

from hallupatch.lab import world

from hallupatch.eval import cli, harness, stats
from hallupatch.eval.embedded import builtin_model
from hallupatch.eval.chair import ChairWords, coco_ground_truth, load_synonyms, score_captions
from hallupatch.eval.scoring import parse_pope_answer
from hallupatch.eval.store import read_answers


def test_two_word_objects_of_another_vocabulary(tmp_path):
    table = tmp_path / "objects.txt"
    table.write_text("red circle, red circles\nblue square, blue squares\n")
    words = ChairWords.from_file(table)
    _, found = words.mentions("Two red circles and a blue square; no green square.")
    assert found == [("red circles", "red circle"), ("blue square", "blue square")]
    # COCO's table is unchanged by the option: "bus" stays a bus, "dining table" one object
    coco = ChairWords.from_file(None)
    assert [c for _, c in coco.mentions("A bus next to a dining table.")[1]] == ["bus", "dining table"]


def test_wilson_interval_against_the_formula():
    low, high = stats.wilson_interval(8, 10)
    z = 1.959963984540054
    p, n = 0.8, 10
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert (low, high) == pytest.approx((centre - half, centre + half))
    assert all(math.isnan(v) for v in stats.wilson_interval(0, 0))


@pytest.mark.parametrize("task_name", ["mme", "pope", "chair"])
def test_the_lab_is_the_default_model_and_data(task_name, tmp_path):
    out = tmp_path / task_name
    scores = cli.run([task_name, "--output", str(out), "--limit", "12", "--no-progress"])
    run = json.loads((out / "run.json").read_text())
    assert run["model"] == f"embedded:{builtin_model().name}" and run["data"] == f"embedded:lab-{ {'chair': 'coco'}.get(task_name, task_name)}-test"
    answers = read_answers(out / "answers.jsonl")
    assert len(answers) == 12
    if task_name == "pope":
        right = sum(parse_pope_answer(a["text"]) == a["answer"] for a in answers)
        assert scores["splits"]["random"]["accuracy"] == pytest.approx(right / 12)
    if task_name == "chair":  # scored with the lab's own object vocabulary, recomputed here
        vocabulary = out / "lab_data" / "coco" / "lab_chair_objects.txt"
        assert run["objects"] == str(vocabulary.resolve())
        words = ChairWords(load_synonyms(vocabulary))
        annotations = out / "lab_data" / "coco" / "annotations"
        gt = coco_ground_truth([annotations / "instances_val2014.json"], [annotations / "captions_val2014.json"],
                               words=words)
        again = score_captions([(int(a["image_id"]), a["text"]) for a in answers], gt, words)
        assert scores["CHAIRs"] == again.chair_s and scores["num_mentions"] == again.num_mentions


@pytest.fixture(scope="module")
def lab_checkpoint(tmp_path_factory):
    """A lab checkpoint trained for a few steps (the suite's plumbing, not its figures)."""
    from hallupatch.lab.train import TrainConfig, train

    return train(tmp_path_factory.mktemp("lab") / "ckpt", TrainConfig.quick(), progress=False)


def test_the_lab_suite_without_a_checkpoint_says_what_to_do(tmp_path, capsys):
    assert cli.main(["lab", "--model", str(tmp_path / "none"), "--output", str(tmp_path / "out")]) == 2
    assert "python -m hallupatch.lab train --out DIR" in capsys.readouterr().err


def test_the_lab_suite_compares_every_method_and_draws_the_plot(tmp_path, capsys, lab_checkpoint):
    out = tmp_path / "lab"
    result = cli.run(["lab", "--model", str(lab_checkpoint), "--output", str(out), "--limit", "6",
                      "--threshold", "0", "--no-progress"])
    printed = capsys.readouterr().out
    labels = ["none", "memvr", "memvr threshold 0 (dev)", "dola low", "dola high", "memvr+dola", "vcd", "icd",
              "m3id", "pai"]
    for benchmark, test in (("pope", "McNemar"), ("chair", "bootstrap")):
        comparison = json.loads((out / benchmark / "comparison.json").read_text())
        assert list(comparison["methods"]) == labels and test in comparison["test"]
        assert json.dumps(comparison, sort_keys=True) == json.dumps(result[benchmark]["comparison"], sort_keys=True)
        for label in labels:
            folder = out / benchmark / harness.method_folder_name(label)
            assert len(read_answers(folder / "answers.jsonl")) == 6
        settings = json.loads((out / benchmark / harness.method_folder_name("memvr threshold 0 (dev)") / "run.json").read_text())
        assert settings["method"] == "memvr" and settings["knobs"]["entropy_threshold"] == 0.0
        assert settings["model"] == str(lab_checkpoint.resolve())
    # threshold 0 fires at the first checked layer in every pass (what a diffuse logit lens does)
    fired = read_answers(out / "pope" / harness.method_folder_name("memvr threshold 0 (dev)") / "answers.jsonl")
    assert all(set(a["memvr"]["trigger_layers"]) == {1} for a in fired)
    profile = json.loads((out / "entropy_profile.json").read_text())
    assert list(profile) == ["1", "2", "3", "4"] and all(0 <= v["mean"] <= v["max"] <= 1 for v in profile.values())
    assert all("dola_layers" in a for a in read_answers(out / "pope" / "dola-low" / "answers.jsonl"))
    pai = json.loads((out / "pope" / "pai" / "run.json").read_text())
    assert pai["method"] == "pai" and pai["knobs"] == {"end_layer": 6}
    png = (out / "lab.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "memvr threshold 0 (dev)" in printed and "McNemar" in printed


def test_the_lab_suite_on_held_out_scenes(tmp_path, capsys, lab_checkpoint, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli.run(["lab", "--model", str(lab_checkpoint), "--limit", "4", "--threshold", "0.5", "--no-progress",
             "--no-plot", "--split", "heldout"])
    printed = capsys.readouterr().out
    out = tmp_path / "hallupatch_output" / "lab-heldout"   # its own default folder
    assert printed.splitlines()[0].endswith("(POPE and CHAIR, heldout split), side by side, with a plot")
    assert "data      the lab's heldout split" in printed
    for benchmark in ("pope", "chair"):
        rows = read_answers(out / benchmark / "none" / "answers.jsonl")
        heldout = ("lab_heldout_", str(world.SPLIT_SEEDS["heldout"] * 1_000_000)[:1])   # file names; COCO ids
        assert len(rows) == 4 and all(str(r["image_id"]).startswith(heldout) for r in rows)
        assert json.loads((out / benchmark / "none" / "run.json").read_text())["data"].endswith("-heldout")


@pytest.mark.parametrize("argv, message", [
    (["lab", "--full", "--limit", "3"], "--limit do(es) not apply to --full"),
    (["lab", "--full", "--threshold", "0.5", "--no-plot"], "--threshold, --no-plot do(es) not apply to --full"),
    (["lab", "--seeds", "1"], "--seeds chooses the seeds of the powered study: use it with --full"),
    (["lab", "--full", "--seeds", "1,x"], "--seeds takes comma-separated integers"),
    (["lab", "--full", "--seeds", "1,1"], "--seeds names a seed twice"),
    (["lab", "--full", "--seeds", "9"], "no shipped lab checkpoint for seed(s) [9]"),
    (["pope", "--data", "x", "--lab-split", "heldout"], "--lab-split chooses the built-in data's split"),
])
def test_lab_flags_that_do_not_apply_are_refused(tmp_path, capsys, argv, message):
    try:
        status = cli.main([*argv, "--output", str(tmp_path / "out")])
    except SystemExit as exit:   # argparse's own refusal of a value
        status = exit.code
    assert status == 2
    err = capsys.readouterr().err
    assert message in err and "error: " in err.strip().splitlines()[-1] and "Traceback" not in err
    assert not (tmp_path / "out").exists()
