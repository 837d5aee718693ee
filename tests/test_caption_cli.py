"""End to end: `python -m hallupatch.eval chair|regcap|phd` on tiny test-written data with a tiny checkpoint."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from caption_data import CHAIR_IMAGES, REGIONS, write_chair_data, write_phd_data, write_regcap_data  # noqa: E402

from hallupatch.eval import cli, regcap  # noqa: E402
from hallupatch.eval.chair import ChairWords, coco_ground_truth, sample_image_ids, score_captions  # noqa: E402
from hallupatch.eval.phd import load_phd, score_phd  # noqa: E402
from hallupatch.eval.regcap import region_prompt  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from hallupatch.testing.tiny import build_tiny_llava_checkpoint

    return str(build_tiny_llava_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llava", seed=0))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"chair": write_chair_data(root / "coco"), "regcap": write_regcap_data(root / "refcocog"),
            "phd": write_phd_data(root / "phd")}


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def chair_args(checkpoint, data, out, *extra):
    return ["chair", "--model", checkpoint, "--data", str(data["chair"]), "--output", str(out),
            "--num-images", "3", "--seed", "1", "--max-new-tokens", "6", "--no-progress", *extra]


def test_chair_end_to_end(checkpoint, data, tmp_path, capsys):
    out = tmp_path / "chair"
    scores = cli.run(chair_args(checkpoint, data, out, "--batch-size", "2"))
    ids = sample_image_ids(CHAIR_IMAGES, 3, seed=1)
    assert json.loads((out / "chair_image_ids.json").read_text()) == ids
    answers = read_jsonl(out / "answers.jsonl")
    assert [a["question_id"] for a in answers] == [str(i) for i in ids]
    assert all(a["prompt"] == "Please describe this image in detail." for a in answers)  # no short-answer suffix
    # Independent re-scoring of the stored captions.
    gt = coco_ground_truth([data["chair"] / "annotations" / "instances_val2014.json"],
                           [data["chair"] / "annotations" / "captions_val2014.json"])
    again = score_captions([(int(a["image_id"]), a["text"]) for a in answers], gt, ChairWords())
    assert scores["CHAIRs"] == again.chair_s and scores["num_mentions"] == again.num_mentions
    assert json.loads((out / "scores.json").read_text())["settings"]["max_new_tokens"] == 6
    details = json.loads((out / "chair_captions.json").read_text())
    assert [d["image_id"] for d in details] == ids
    assert "CHAIRs" in capsys.readouterr().out


class Interrupt(Exception):
    pass


def test_chair_resume_after_interruption(checkpoint, data, tmp_path):
    from hallupatch.eval import models

    full = tmp_path / "full"
    cli.run(chair_args(checkpoint, data, full))
    backend = models.load_backend(checkpoint, device="cpu")
    calls = []
    real_generate = backend.generate

    def failing(questions, max_new_tokens):
        calls.append([q.qid for q in questions])
        if len(calls) == 2:
            raise Interrupt("killed")
        return real_generate(questions, max_new_tokens)

    backend.generate = failing
    out = tmp_path / "resumed"
    with pytest.raises(Interrupt):
        cli.run(chair_args(checkpoint, data, out), backend=backend)
    assert len(read_jsonl(out / "answers.jsonl")) == 1
    with open(out / "answers.jsonl", "a") as f:
        f.write('{"question_id": "1')  # a write cut by the kill
    calls.clear()
    backend.generate = lambda qs, n: (calls.append([q.qid for q in qs]), real_generate(qs, n))[1]
    with pytest.warns(UserWarning, match="incomplete last line"):
        scores = cli.run(chair_args(checkpoint, data, out), backend=backend)
    assert len(calls) == 2  # only the two unanswered images
    assert read_jsonl(out / "answers.jsonl") == read_jsonl(full / "answers.jsonl")
    assert scores["CHAIRs"] == json.loads((full / "scores.json").read_text())["CHAIRs"]
    # Other settings in the same folder are refused.
    with pytest.raises(Exception, match="different settings"):
        cli.run(chair_args(checkpoint, data, out, "--seed", "2"), backend=backend)


def test_chair_outside_answers(data, tmp_path, capsys):
    answers = tmp_path / "opera.jsonl"
    answers.write_text("\n".join(json.dumps(r) for r in [
        {"image_id": 12, "caption": "A red car next to a fire hydrant."},  # hydrant hallucinated
        {"image_id": 13, "caption": "A cat sleeping on a bed."},
    ]))
    code = cli.main(["chair", "--answers", str(answers), "--data", str(data["chair"]), "--output", str(tmp_path / "o")])
    assert code == 0
    scores = json.loads((tmp_path / "o" / "scores.json").read_text())
    assert scores["CHAIRs"] == pytest.approx(1 / 2) and scores["CHAIRi"] == pytest.approx(1 / 4)
    assert scores["Recall"] == pytest.approx(3 / 3)
    assert "CHAIRi" in capsys.readouterr().out


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    code = cli.main(["chair", "--answers", str(tmp_path / "a.jsonl"), "--data", str(tmp_path / "coco")])
    assert code == 2 and "a.jsonl" in capsys.readouterr().err
    (tmp_path / "coco").mkdir()
    (tmp_path / "a.jsonl").write_text(json.dumps({"image_id": 1, "caption": "x"}) + "\n")
    code = cli.main(["chair", "--answers", str(tmp_path / "a.jsonl"), "--data", str(tmp_path / "coco"),
                     "--output", str(tmp_path / "o")])
    assert code == 2 and str(tmp_path / "coco" / "annotations") in capsys.readouterr().err
    assert cli.main(["phd", "--answers", str(tmp_path / "a.jsonl"), "--data", str(tmp_path / "nophd"),
                     "--output", str(tmp_path / "o2")]) == 2
    assert "data.json" in capsys.readouterr().err
    assert cli.main(["regcap", "--output", str(tmp_path / "o3")]) == 2
    assert "needs --data" in capsys.readouterr().err


@pytest.mark.skipif(not regcap.java_available(), reason="no Java runtime: pycocoevalcap needs one "
                                                         "(.ci/run installs default-jre-headless)")
def test_regcap_end_to_end_and_outside_answers(checkpoint, data, tmp_path):
    out = tmp_path / "regcap"
    scores = cli.run(["regcap", "--model", checkpoint, "--data", str(data["regcap"]), "--output", str(out),
                      "--max-new-tokens", "6", "--batch-size", "3", "--no-progress"])
    answers = read_jsonl(out / "answers.jsonl")
    assert [a["question_id"] for a in answers] == ["r1", "r2", "r3"]
    assert answers[0]["prompt"] == region_prompt("llava-hf", REGIONS[0]["bbox"], 64, 48)
    assert set(regcap.CAPTION_METRICS) <= set(scores)  # their values are checked against the toolkit in test_regcap
    chair = score_captions([(a["question_id"], a["text"]) for a in answers],
                           {r["id"]: regcap.region_ground_truth([regcap.RegionSample(r["id"], r["image"], r["bbox"],
                                                                                     r["references"], None,
                                                                                     r.get("category"))])[r["id"]]
                            for r in REGIONS}, ChairWords())
    assert scores["CHAIRs"] == chair.chair_s and scores["CHAIRi"] == chair.chair_i
    # The same answers in LLaVA's format, scored without a model, give the same numbers.
    outside = tmp_path / "llava_answers.jsonl"
    outside.write_text("\n".join(json.dumps({"question_id": a["question_id"], "text": a["text"]}) for a in answers))
    again = cli.run(["regcap", "--answers", str(outside), "--data", str(data["regcap"]), "--output", str(tmp_path / "o")])
    for name in (*regcap.CAPTION_METRICS, "CHAIRs", "CHAIRi"):
        assert again[name] == pytest.approx(scores[name])


def test_phd_end_to_end_and_outside_answers(checkpoint, data, tmp_path):
    out = tmp_path / "phd"
    scores = cli.run(["phd", "--model", checkpoint, "--data", str(data["phd"]), "--output", str(out),
                      "--modes", "base", "icc", "--max-new-tokens", "3", "--batch-size", "4", "--no-progress"])
    answers = read_jsonl(out / "answers.jsonl")
    questions = {q.qid: q for q in load_phd(data["phd"] / "data.json", ["base", "icc"])}
    assert sorted(a["question_id"] for a in answers) == sorted(questions)
    icc = next(a for a in answers if a["question_id"] == "icc/0/yes")
    assert icc["question"].startswith("There is a cat in the picture. In case there is an inconsistency")
    assert icc["prompt"].endswith("Answer the question using a single word or phrase.")  # LLaVA's yes/no recipe
    expected = score_phd((questions[a["question_id"]].mode, questions[a["question_id"]].task,
                          questions[a["question_id"]].label, a["text"]) for a in answers)
    assert scores["overall"] == expected["overall"] and scores["groups"] == expected["groups"]
    outside = tmp_path / "phd_answers.jsonl"
    outside.write_text("\n".join(json.dumps({"question_id": q, "text": "Yes" if q.endswith("yes") else "No"})
                                 for q in questions))
    perfect = cli.run(["phd", "--answers", str(outside), "--data", str(data["phd"]), "--modes", "base", "icc",
                       "--output", str(tmp_path / "o")])
    assert perfect["overall"]["phd_index"] == 1.0


def test_chair_with_memvr_records_trace_and_unpatches(checkpoint, data, tmp_path):
    from hallupatch.engine import get_patch
    from hallupatch.eval import models

    backend = models.load_backend(checkpoint, device="cpu")
    out = tmp_path / "memvr"
    cli.run(chair_args(checkpoint, data, out, "--method", "memvr", "--entropy-threshold", "0",
                       "--starting-layer", "0", "--ending-layer", "3"), backend=backend)
    answers = read_jsonl(out / "answers.jsonl")
    # threshold 0: MemVR fires on every generated token's pass
    assert all(a["memvr"]["passes"] == a["new_tokens"] == a["memvr"]["triggered_passes"] for a in answers)
    assert json.loads((out / "run.json").read_text())["method"] == "memvr"
    assert get_patch(backend.model) is None  # the run leaves the model as it found it


def test_phd_two_processes_merge_into_the_single_process_result(data, tmp_path):
    """`accelerate launch` with two processes: each answers its shard, rank 0 merges and scores."""
    from conftest import launch_two_processes

    pytest.importorskip("accelerate")
    args = ["phd", "--data", str(data["phd"]), "--modes", "base", "ccs", "--max-new-tokens", "2", "--batch-size", "2",
            "--no-progress"]
    single = cli.run([*args, "--output", str(tmp_path / "single")])
    done = launch_two_processes([*args, "--output", str(tmp_path / "sharded")], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on rank 0 of 2" in done.stdout
    assert read_jsonl(tmp_path / "sharded" / "answers.jsonl") == read_jsonl(tmp_path / "single" / "answers.jsonl")
    sharded = json.loads((tmp_path / "sharded" / "scores.json").read_text())
    assert sharded["overall"] == single["overall"] and sharded["groups"] == single["groups"]


def test_limit_and_partial_outside_answers(checkpoint, data, tmp_path, capsys):
    scores = cli.run(["phd", "--model", checkpoint, "--data", str(data["phd"]), "--limit", "4", "--max-new-tokens", "2",
                      "--output", str(tmp_path / "lim"), "--no-progress"])
    assert (scores["answered"], scores["questions"]) == (4, 4) and scores["overall"]["questions"] == 4
    # an outside file that answers only some questions is scored on those, and says so
    part = tmp_path / "part.jsonl"
    part.write_text(json.dumps({"question_id": "base/0/yes", "text": "Yes"}) + "\n"
                    + json.dumps({"question_id": "base/0/no", "text": "No"}) + "\n")
    capsys.readouterr()
    scores = cli.run(["phd", "--answers", str(part), "--data", str(data["phd"]), "--output", str(tmp_path / "p")])
    assert (scores["answered"], scores["questions"]) == (2, 14)
    assert "(scored 2 of 14)" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question_id": "base/9/yes", "text": "Yes"}) + "\n")
    assert cli.main(["phd", "--answers", str(bad), "--data", str(data["phd"]), "--output", str(tmp_path / "b")]) == 2
    assert "base/9/yes" in capsys.readouterr().err


def test_layer_contrast_knobs_reach_apply_and_the_run_settings(checkpoint, data, tmp_path, monkeypatch):
    import hallupatch
    from hallupatch.engine import get_patch
    from hallupatch.eval import models

    seen = []
    real_apply = hallupatch.apply

    def spy(model, method, **knobs):
        seen.append((method, knobs))
        return real_apply(model, method, **knobs)

    monkeypatch.setattr(hallupatch, "apply", spy)
    backend = models.load_backend(checkpoint, device="cpu")
    out = tmp_path / "dola"
    cli.run(["phd", "--data", str(data["phd"]), "--output", str(out), "--limit", "4", "--max-new-tokens", "2",
             "--no-progress", "--method", "dola", "--candidate-layers", "0,2", "--layer-prior", "0.2,0.8",
             "--layer-seed", "3"], backend=backend)
    knobs = {"candidate_layers": [0, 2], "layer_prior": [0.2, 0.8], "seed": 3}
    assert seen == [("dola", knobs)] * 2   # checked once (applied and removed) before anything is written, then run
    settings = json.loads((out / "run.json").read_text())
    assert settings["method"] == "dola" and settings["knobs"] == knobs
    assert len(read_jsonl(out / "answers.jsonl")) == 4
    assert get_patch(backend.model) is None


def test_bad_layer_contrast_knobs_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["mme", "--method", "dola", "--candidate-layers", "middle"])
    with pytest.raises(ValueError, match="layer_prior has 3 weights but there are 1 candidate layers"):
        cli.run(["mme", "--output", str(tmp_path), "--method", "dola", "--candidate-layers", "2",
                 "--layer-prior", "0.1,0.2,0.7", "--no-progress"])


@pytest.mark.skipif(not regcap.java_available(), reason="no Java runtime: pycocoevalcap needs one "
                                                         "(.ci/run installs default-jre-headless)")
def test_regcap_ranks_one_candidate_per_layer_with_a_scorer(checkpoint, data, tmp_path):
    import hallupatch
    from hallupatch.eval import models

    scorer_file = tmp_path / "scorer.py"
    scorer_file.write_text(
        "def distinct_words(sample, caption):\n"
        "    assert sample['image_path'].endswith(sample['image'])\n"
        "    return len(set(caption.split())) / 100, 0.5\n"
    )
    backend = models.load_backend(checkpoint, device="cpu")
    common = ["regcap", "--data", str(data["regcap"]), "--max-new-tokens", "6", "--batch-size", "2",
              "--no-progress", "--method", "dola"]
    out = tmp_path / "ranked"
    cli.run([*common, "--output", str(out), "--candidate-layers", "0,2", "--rank-with",
             f"{scorer_file}:distinct_words"], backend=backend)
    answers = read_jsonl(out / "answers.jsonl")
    # each layer's candidates equal a plain run contrasting against that layer alone
    singles = {}
    for layer in (0, 2):
        cli.run([*common, "--output", str(tmp_path / f"l{layer}"), "--candidate-layers", str(layer)], backend=backend)
        singles[layer] = {a["question_id"]: a["text"] for a in read_jsonl(tmp_path / f"l{layer}" / "answers.jsonl")}
    for a in answers:
        texts = [c["text"] for c in a["candidates"]]
        assert [c["layer"] for c in a["candidates"]] == [0, 2]
        assert texts == [singles[0][a["question_id"]], singles[2][a["question_id"]]]
        scores = [len(set(t.split())) / 100 for t in texts]
        best = max(range(2), key=lambda i: (scores[i], -i))
        assert a["text"] == texts[best] and a["layer"] == [0, 2][best]
        assert [c["iou"] for c in a["candidates"]] == pytest.approx(scores)
    scored = json.loads((out / "scored_candidates.json").read_text())
    assert [s["id"] for s in scored] == [a["question_id"] for a in answers]
    best_layers = [a["layer"] for a in answers]
    prior = hallupatch.estimate_layer_prior(scored)
    assert set(prior) == {0, 2} and sum(prior.values()) == pytest.approx(1.0)
    if len(set(best_layers)) == 1:
        assert prior[best_layers[0]] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="use it with regcap"):
        cli.run(["phd", "--data", str(data["phd"]), "--output", str(tmp_path / "p"), "--method", "dola",
                 "--candidate-layers", "0,2", "--rank-with", f"{scorer_file}:distinct_words", "--limit", "2"],
                backend=backend)
    with pytest.raises(ValueError, match="needs layer contrast"):
        cli.run(["regcap", "--data", str(data["regcap"]), "--output", str(tmp_path / "m"), "--method", "memvr",
                 "--starting-layer", "0", "--ending-layer", "3", "--rank-with", f"{scorer_file}:distinct_words"],
                backend=backend)
