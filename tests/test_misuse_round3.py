"""Misuse, round 3 (issue 21, items 1-10 and 13-15): nothing poisoned or deleted by a refused command, nothing
silently wrong, records that do not depend on the batch size, one ``error:`` line instead of a traceback,
Ctrl-C that says where it stopped, and the nearest valid name for a typo.

Runs use the built-in lab model and data with a few questions and tokens (seconds each)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hallupatch.eval import cli, harness
from hallupatch.eval.store import StoreError, prepare_output, read_answers

REPO = Path(__file__).resolve().parent.parent
QUICK = ["--limit", "3", "--max-new-tokens", "2", "--no-progress"]


@pytest.fixture(autouse=True)
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def error_line(capsys, *needles) -> str:
    """The one ``error:`` message of a refused command (the tokenizer's special-tokens notice aside; a
    refused resume lists the differences on the lines that follow it)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    starts = [i for i, line in enumerate(err.splitlines()) if line.startswith("error: ")]
    assert len(starts) == 1, err
    message = "\n".join(err.splitlines()[starts[0]:])
    for needle in needles:
        assert needle in message, message
    return message


def files(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ 1-3: validate everything, then write
@pytest.mark.parametrize("bad", [["--method", "none,memvr", "--retracing-ratio", "1.5"],
                                 ["--method", "memvr", "--ending-layer", "9"],
                                 ["--method", "dola", "--candidate-layers", "99"],
                                 ["--method", "dola", "--num-beams", "2"]])
def test_item1_a_refused_setting_writes_nothing_and_the_corrected_command_runs(tmp_path, capsys, bad):
    out = tmp_path / "run"
    assert cli.main(["mme", *QUICK, "--output", str(out), *bad]) == 2
    error_line(capsys)
    assert not out.exists()
    method = bad[bad.index("--method") + 1]
    assert cli.main(["mme", *QUICK, "--output", str(out), "--method", method]) == 0


def test_item2_a_refused_command_with_overwrite_leaves_the_previous_run_as_it_was(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["mme", *QUICK, "--output", str(out), "--method", "none,memvr"]) == 0
    before = files(out)
    for bad in (["--ending-layer", "99"], ["--retracing-ratio", "-1"], ["--candidate-layers", "99"]):
        method = "none,dola" if "--candidate-layers" in bad else "none,memvr"
        assert cli.main(["mme", *QUICK, "--output", str(out), "--method", method, "--overwrite", *bad]) == 2
        error_line(capsys)
        assert files(out) == before


def test_item3_a_folder_without_answers_blocks_nothing_and_finished_work_is_resumed(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["mme", *QUICK, "--output", str(out), "--method", "none,memvr"]) == 0
    # what a refused method left in earlier versions: its run.json with the refused knobs, and no answer
    settings = json.loads((out / "memvr" / "run.json").read_text())
    shutil.rmtree(out / "memvr")
    prepare_output(out / "memvr", {**settings, "knobs": {**settings["knobs"], "ending_layer": 99}})
    baseline = (out / "none" / "answers.jsonl").read_bytes()
    capsys.readouterr()
    assert cli.main(["mme", *QUICK, "--output", str(out), "--method", "none,memvr"]) == 0
    # each method's own report (its folder's report.txt in a multi-method run) says what it answered now
    assert "answered 0 question(s) now" in (out / "none" / "report.txt").read_text()   # the baseline was not redone
    assert "answered 3 question(s) now" in (out / "memvr" / "report.txt").read_text()
    assert (out / "none" / "answers.jsonl").read_bytes() == baseline
    assert json.loads((out / "memvr" / "run.json").read_text())["knobs"] == settings["knobs"]
    # a folder whose answers were made with other settings is refused before any method answers, and
    # the advice names that folder (--overwrite would discard the baseline too)
    with pytest.raises(StoreError, match=f"delete {out / 'memvr'}"):
        cli.run(["mme", *QUICK, "--output", str(out), "--method", "none,memvr", "--retracing-ratio", "0.5"])
    assert (out / "none" / "answers.jsonl").read_bytes() == baseline


# ------------------------------------------------------------------ 4: a knob without its method
def test_item4_a_knob_for_a_method_not_run_is_refused_naming_its_method_and_preset(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["mme", *QUICK, "--output", str(out), "--method", "none,dola", "--retracing-ratio", "0.3"]) == 2
    error_line(capsys, "--retracing-ratio is a knob of memvr", "--method none,dola does not include")
    assert cli.main(["mme", *QUICK, "--output", str(out), "--method", "memvr", "--candidate-layers", "2"]) == 2
    error_line(capsys, "--candidate-layers is a knob of dola")
    assert cli.main(["mme", *QUICK, "--output", str(out), "--preset", "memvr-mme-llava", "--method", "dola"]) == 2
    error_line(capsys, "(set by --preset memvr-mme-llava)", "is a knob of memvr")
    assert not out.exists()


# ------------------------------------------------------------------ 5: answers made elsewhere
def _mme_ids(tmp_path):
    from hallupatch.eval.tasks.mme import load_mme
    from hallupatch.lab import writers

    data = writers.write_mme(tmp_path / "mme", split="test")
    return data, [q.qid for q in load_mme(data, need_images=False)][:2]


@pytest.mark.parametrize("rows, message", [
    ([{"text": "Yes"}, {"text": "No"}], "a second answer for"),
    ([{"text": None}], "'text' is null"),
    ([{"text": ["yes"]}], "'text' must be a string; got list"),
    ([{"text": 1}], "'text' must be a string; got int"),
])
def test_item5_answers_that_cannot_be_scored_as_given_are_refused(tmp_path, capsys, rows, message):
    data, ids = _mme_ids(tmp_path)
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": ids[0], **row}) + "\n" for row in rows))
    assert cli.main(["mme", "--data", str(data), "--answers", str(answers), "--output", str(tmp_path / "out")]) == 2
    error_line(capsys, message)


def test_item5_identical_repeated_answers_count_once(tmp_path):
    data, ids = _mme_ids(tmp_path)
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": qid, "text": "Yes"}) + "\n" for qid in [ids[0], ids[0], ids[1]]))
    scores = cli.run(["mme", "--data", str(data), "--answers", str(answers), "--output", str(tmp_path / "out")])
    assert scores["answered"] == 2


@pytest.mark.parametrize("flags", [["--model", "somewhere"], ["--method", "memvr"], ["--retracing-ratio", "0.2"],
                                   ["--batch-size", "4"], ["--preset", "memvr-mme-llava"]])
def test_item5_flags_without_effect_on_answers_are_refused(tmp_path, capsys, flags):
    data, ids = _mme_ids(tmp_path)
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"question_id": ids[0], "text": "Yes"}) + "\n")
    assert cli.main(["mme", "--data", str(data), "--answers", str(answers), "--output", str(tmp_path / "out"), *flags]) == 2
    error_line(capsys, "--answers scores answers made elsewhere", flags[0])


def test_item5_a_null_caption_is_named_as_such(tmp_path, capsys):
    answers = tmp_path / "captions.jsonl"
    answers.write_text(json.dumps({"image_id": 1, "caption": None}) + "\n")
    assert cli.main(["chair", "--answers", str(answers), "--output", str(tmp_path / "out")]) == 2
    error_line(capsys, "'caption' is null")


# ------------------------------------------------------------------ 6-7: layer prior files
def _prior(folder: Path, weights) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "prior.json"
    path.write_text(json.dumps({"layers": [0, 2], "prior": weights}))
    return path


def test_item6_a_relative_layer_prior_is_recorded_absolute_with_its_hash(tmp_path, monkeypatch, capsys):
    first, second = _prior(tmp_path / "a", [0.2, 0.8]), _prior(tmp_path / "b", [0.9, 0.1])
    out = tmp_path / "run"
    command = ["mme", *QUICK, "--output", str(out), "--method", "dola", "--candidate-layers", "0,2",
               "--layer-prior", "prior.json", "--layer-seed", "0"]
    monkeypatch.chdir(first.parent)
    assert cli.main(command) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["knobs"]["layer_prior"] == str(first.resolve())
    assert run["file_hashes"]["layer_prior"].startswith("sha256:")
    capsys.readouterr()
    monkeypatch.chdir(second.parent)   # the same command elsewhere names another file: refused
    assert cli.main(command) == 2
    error_line(capsys, "different settings")
    shutil.copy(second, first)         # the same path with other content: refused too
    monkeypatch.chdir(first.parent)
    assert cli.main(command) == 2
    error_line(capsys, "file_hashes")


def test_item7_duplicate_layers_and_huge_numbers_in_prior_files(tmp_path, capsys):
    from hallupatch.prior import estimate_layer_prior, load_layer_prior
    from hallupatch.prior.cli import main as prior_main

    twice = tmp_path / "twice.json"
    twice.write_text('{"0": 0.5, "2": 0.2, "0": 0.7}')
    with pytest.raises(ValueError, match=r"key\(s\) \['0'\] twice"):
        load_layer_prior(twice)
    huge = tmp_path / "huge.json"
    huge.write_text('{"0": 1' + "0" * 400 + ', "2": 1}')
    with pytest.raises(ValueError, match="must be finite"):
        load_layer_prior(huge)
    assert cli.main(["mme", *QUICK, "--output", str(tmp_path / "run"), "--method", "dola",
                     "--candidate-layers", "0,2", "--layer-prior", str(huge)]) == 2
    error_line(capsys, "must be finite")
    scored = tmp_path / "scored.json"
    scored.write_text('[{"candidates": [{"layer": 0, "iou": 1' + "0" * 400 + '}, {"layer": 2, "iou": 1}]}]')
    with pytest.raises(SystemExit) as stop:
        prior_main([str(scored), "-o", str(tmp_path / "prior.json")])
    assert stop.value.code == 2
    error_line(capsys, "iou must be finite")
    # huge but finite IoUs and confidences give the prior of their ratios, not an overflow
    big = [{"candidates": [{"layer": 0, "iou": 1e308}, {"layer": 2, "iou": 3e307}], "confidence": 1e308},
           {"candidates": [{"layer": 0, "iou": 1e308}, {"layer": 2, "iou": 1.5e308}], "confidence": 1e308}]
    small = [{"candidates": [{"layer": 0, "iou": 10}, {"layer": 2, "iou": 3}]},
             {"candidates": [{"layer": 0, "iou": 10}, {"layer": 2, "iou": 15}]}]
    assert estimate_layer_prior(big) == pytest.approx(estimate_layer_prior(small))


# ------------------------------------------------------------------ 8: lab train into a used folder
def test_item8_lab_train_refuses_other_settings_and_a_corrupt_state(tmp_path):
    from hallupatch.lab.__main__ import main as lab_main
    from hallupatch.lab.train import STATE_FILE, TrainConfig, train

    out = train(tmp_path / "ckpt", TrainConfig.quick(seed=0), threads=1, progress=False)
    with pytest.raises(ValueError, match=r"finished training with other settings: seed: 0 \(stored\) vs 1 \(now\)"):
        train(out, TrainConfig.quick(seed=1), threads=1, progress=False)
    assert train(out, TrainConfig.quick(seed=0), threads=1, progress=False) == out   # the same: finished
    train(out, TrainConfig.quick(seed=1), threads=1, progress=False, overwrite=True)
    assert json.loads((out / "training.json").read_text())["config"]["seed"] == 1
    (out / STATE_FILE).write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="is corrupt and cannot be resumed"):
        train(out, TrainConfig.quick(seed=1), threads=1, progress=False)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "hallupatch.lab", "train", "--quick", "--seed", "1", "--threads", "1",
                           "--out", str(out), "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ") and "is corrupt" in done.stderr and "--overwrite" in done.stderr
    assert lab_main(["train", "--quick", "--seed", "2", "--threads", "1", "--out", str(out), "--no-progress",
                     "--overwrite"]) == 0
    assert json.loads((out / "training.json").read_text())["config"]["seed"] == 2


# ------------------------------------------------------------------ 9: eval lab on what is not the lab
def test_item9_eval_lab_says_what_the_lab_needs(tmp_path, capsys, tiny_llava_dir):
    assert cli.main(["lab", "--model", str(tiny_llava_dir), "--output", str(tmp_path / "a")]) == 2
    error_line(capsys, "another tokenizer than the lab's", "python -m hallupatch.lab train")
    for model_type, architecture in (("llava_next", "LlavaNextForConditionalGeneration"), ("llama", "LlamaForCausalLM")):
        folder = tmp_path / model_type
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": model_type, "architectures": [architecture]}))
        assert cli.main(["lab", "--model", str(folder), "--output", str(tmp_path / "b")]) == 2
        error_line(capsys, "is not a lab checkpoint", model_type)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_item9_eval_lab_chooses_its_dev_threshold_afresh(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from hallupatch.eval import lab
    from hallupatch.lab import measure

    chosen = iter([(0.3, {0.3: 0.7}), (0.6, {0.6: 0.8})])
    monkeypatch.setattr(measure, "choose_threshold", lambda model, processor, questions: next(chosen))
    first = SimpleNamespace(name="/models/first", model=None, processor=None)
    assert lab.choose_threshold(tmp_path, first) == 0.3
    assert lab.choose_threshold(tmp_path, first) == 0.3   # resumed: the saved choice
    other = SimpleNamespace(name="/models/other", model=None, processor=None)
    with pytest.raises(StoreError, match="another model"):
        lab.choose_threshold(tmp_path, other)
    assert lab.choose_threshold(tmp_path, other, overwrite=True) == 0.6
    assert json.loads((tmp_path / "dev_threshold.json").read_text())["model"] == "/models/other"


# ------------------------------------------------------------------ 10: records independent of the batch size
def test_item10_beam_traces_are_attributed_to_their_own_sample(tmp_path):
    runs = {}
    for size in ("1", "4"):
        cli.run(["pope", "--limit", "8", "--no-progress", "--method", "memvr", "--num-beams", "2",
                 "--batch-size", size, "--output", str(tmp_path / size)])
        runs[size] = read_answers(tmp_path / size / "answers.jsonl")
        assert json.loads((tmp_path / size / "run.json").read_text())["batch_size"] == int(size)
    assert runs["1"] == runs["4"]
    traces = [r["memvr"]["trigger_layers"] for r in runs["4"]]
    assert all(len(per_pass) == 2 for trace in traces for per_pass in trace)   # one entry per beam row
    assert any(layer is not None for trace in traces for per_pass in trace for layer in per_pass)


def test_item10_the_same_seed_samples_the_same_answers_at_any_batch_size(tmp_path):
    texts = {}
    for size in ("1", "4"):
        cli.run(["chair", "--limit", "8", "--max-new-tokens", "6", "--no-progress", "--do-sample", "--seed", "0",
                 "--temperature", "5", "--batch-size", size, "--output", str(tmp_path / size)])
        texts[size] = [r["text"] for r in read_answers(tmp_path / size / "answers.jsonl")]
    assert texts["1"] == texts["4"]
    # and a run interrupted after three answers resumes, at another batch size, with the same answers
    answers = tmp_path / "1" / "answers.jsonl"
    answers.write_text("".join(answers.read_text().splitlines(keepends=True)[:3]))
    (tmp_path / "1" / "scores.json").unlink()
    cli.run(["chair", "--limit", "8", "--max-new-tokens", "6", "--no-progress", "--do-sample", "--seed", "0",
             "--temperature", "5", "--batch-size", "3", "--output", str(tmp_path / "1")])
    assert [r["text"] for r in read_answers(answers)] == texts["4"]
    assert json.loads((tmp_path / "1" / "run.json").read_text())["batch_size"] == [1, 3]


# ------------------------------------------------------------------ 13: damaged checkpoints, missing paths
def test_item13_damaged_checkpoints_and_missing_paths_are_one_error_line(tmp_path, capsys, tiny_llava_dir):
    command = ["mme", *QUICK, "--output", str(tmp_path / "out")]
    assert cli.main([*command, "--model", str(tmp_path / "nowhere")]) == 2
    error_line(capsys, f"--model {tmp_path / 'nowhere'} does not exist")
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_llava_dir, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert cli.main([*command, "--model", str(damaged)]) == 2
    error_line(capsys, f"cannot load the checkpoint {damaged}", "damaged or incomplete")
    (damaged / "config.json").write_text("{not json")
    for recipe in ([], ["--recipe", "llava-hf"]):
        assert cli.main([*command, "--model", str(damaged), *recipe]) == 2
        error_line(capsys, f"{damaged / 'config.json'} is not valid JSON")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ 14: Ctrl-C
def test_item14_ctrl_c_says_where_it_stopped_and_the_rerun_resumes(tmp_path):
    out = tmp_path / "run"
    command = ["pope", "--limit", "400", "--batch-size", "1", "--no-progress", "--output", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    # a shell without job control starts background jobs with SIGINT ignored, and Python keeps an ignored
    # SIGINT ignored: give the child the default disposition, so Python installs its KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, "-m", "hallupatch.eval", *command], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    answers = out / "answers.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if answers.exists() and answers.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"interrupted in {out} after ") and "of 400 question(s)" in last
    assert "rerun the same command to resume" in last
    done = len(read_answers(answers))
    assert 3 <= done < 400
    seen = []
    from hallupatch.eval import models

    real = models.LlavaHFBackend.generate

    def counting(self, questions, max_new_tokens):
        seen.extend(q.qid for q in questions)
        if len(seen) > 6:
            raise KeyboardInterrupt   # stop again soon: the point is what the rerun skips
        return real(self, questions, max_new_tokens)

    models.LlavaHFBackend.generate = counting
    try:
        with pytest.raises(harness.RunInterrupted):
            cli.run(command)
    finally:
        models.LlavaHFBackend.generate = real
    finished = read_answers(answers)
    ids = [r["question_id"] for r in finished]
    assert len(ids) == len(set(ids)) == done + 6   # nothing lost, nothing doubled
    assert not set(seen[:6]) & set(ids[:done])      # finished questions were not asked again


# ------------------------------------------------------------------ 15: typos
def test_item15_typos_get_the_nearest_valid_name(tmp_path, capsys):
    out = ["--output", str(tmp_path / "out")]
    assert cli.main(["mme", *out, "--method", "memrv"]) == 2
    error_line(capsys, "unknown method 'memrv' (did you mean 'memvr'?)")
    assert cli.main(["mme", *out, "--method", "none,nnoe"]) == 2
    error_line(capsys, "(did you mean 'none'?)")
    assert cli.main(["mme", *out, "--method", "memvr+dloa"]) == 2
    error_line(capsys, "(did you mean 'dola'?)")
    assert cli.main(["mme", *out, "--preset", "memvr-mme-lava"]) == 2
    error_line(capsys, "(did you mean 'memvr-mme-llava'?)")
    for argv, hint in ((["mmee"], "did you mean 'mme'?"), (["mme", "--recipe", "llava-fh"], "did you mean 'llava-hf'?")):
        with pytest.raises(SystemExit) as stop:
            cli.main([*argv, *out])
        assert stop.value.code == 2
        assert hint in capsys.readouterr().err
    from hallupatch.eval import models

    with pytest.raises(ValueError, match="did you mean 'qwen-vl'"):
        models.load_backend(str(tmp_path), recipe="qwen-lv")
    from hallupatch.lab.__main__ import main as lab_main

    with pytest.raises(SystemExit) as stop:
        lab_main(["write", "mmee", "--out", str(tmp_path / "w")])
    assert stop.value.code == 2 and "did you mean 'mme'?" in capsys.readouterr().err


def test_item3_an_empty_answers_file_or_a_damaged_run_json_without_answers_blocks_nothing(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "answers.jsonl").write_text('{"question_id": "cut mid-wri')   # killed before its first answer ended
    prepare_output(out, {"method": "none"})
    assert json.loads((out / "run.json").read_text()) == {"method": "none"}
    (out / "run.json").write_text("{damaged")
    prepare_output(out, {"method": "memvr"})
    assert json.loads((out / "run.json").read_text()) == {"method": "memvr"}
