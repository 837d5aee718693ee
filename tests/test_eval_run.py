"""End-to-end evaluation runs on tiny random LLaVA models (the embedded default and a saved
llava-hf checkpoint): both MME layouts, POPE, MemVR traces, batching, resume, sharding, --answers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import launch_two_processes
from hallupatch.engine import get_patch
from hallupatch.eval import cli, harness, models
from hallupatch.eval.tasks import get_task
from hallupatch.eval.scoring import parse_mme_answer, parse_pope_answer
from hallupatch.eval.store import StoreError, prepare_output, read_answers
from hallupatch.eval.data import DataError
from hallupatch.eval.tasks.mme import load_mme_folder

REPO = Path(__file__).resolve().parent.parent
LIMIT = "12"
TOKENS = "3"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models decode faster on one thread (and the CI machine's cores are shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def checkpoint(tiny_llava_dir):
    """The suite's shared tiny llava-hf checkpoint (tests/conftest.py), saved with save_pretrained."""
    return tiny_llava_dir


@pytest.fixture(scope="session")
def mme_dataset(tmp_path_factory, mme_folder):
    """The same sample as an lmms-lab/MME-style `datasets` dataset saved with save_to_disk."""
    import datasets

    rows = [
        {"question_id": q.image_id, "image": q.load_image(), "question": q.question, "answer": q.answer, "category": q.group}
        for q in load_mme_folder(mme_folder)
    ]
    features = datasets.Features({
        "question_id": datasets.Value("string"), "image": datasets.Image(), "question": datasets.Value("string"),
        "answer": datasets.Value("string"), "category": datasets.Value("string"),
    })
    path = tmp_path_factory.mktemp("mme_ds") / "MME"
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(path))
    return path


@pytest.fixture(scope="session")
def reference(tmp_path_factory, backend, mme_folder):
    """An uninterrupted single-process run at batch size 1: the result the other runs must reproduce."""
    out = tmp_path_factory.mktemp("ref")
    scores = cli.run(_args(mme_folder, out, "--batch-size", "1"), backend=backend)
    return out, scores


def _args(data, out, *extra):
    return ["mme", "--data", str(data), "--output", str(out), "--limit", LIMIT, "--max-new-tokens", TOKENS,
            "--no-progress", *extra]


def _files(out):
    """The run's files, with the batch sizes it used left out of run.json and scores.json (recorded, not results)."""
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in Path(out).rglob("*") if p.is_file()}
    for name, settings in (("run.json", lambda d: d), ("scores.json", lambda d: d.get("settings", {}))):
        if name in files:
            data = json.loads(files[name])
            settings(data).pop("batch_size", None)
            files[name] = json.dumps(data, sort_keys=True).encode()
    return {k: v for k, v in files.items() if not k.startswith("sample_data/")}


def test_synthetic_mme_sample_end_to_end(tmp_path, capsys, checkpoint, mme_folder):
    """All seven subtasks of the synthetic MME sample (the built-in default before the lab), one model."""
    scores = cli.run(["mme", "--model", str(checkpoint), "--data", str(mme_folder), "--output", str(tmp_path),
                      "--max-new-tokens", "2", "--batch-size", "8", "--no-progress"])
    printed = capsys.readouterr().out
    assert "perception" in printed and "cognition" in printed and "questions/s" in printed
    subtasks = scores["subtasks"]
    assert list(subtasks) == ["existence", "count", "position", "color", "scene", "commonsense_reasoning",
                              "numerical_calculation"]
    answers = read_answers(tmp_path / "answers.jsonl")
    assert len(answers) == scores["questions"] == 42
    # independent re-computation of every subtask score from the stored answers
    per = {}
    for a in answers:
        ok = parse_mme_answer(a["text"]) == a["answer"].lower()
        per.setdefault(a["group"], {}).setdefault(a["image_id"], []).append(ok)
    for name, images in per.items():
        results = [x for v in images.values() for x in v]
        expected = 100 * sum(results) / len(results) + 100 * sum(all(v) for v in images.values()) / len(images)
        assert subtasks[name]["score"] == pytest.approx(expected)
    assert scores["perception"] == pytest.approx(sum(subtasks[n]["score"] for n in list(subtasks)[:5]))
    assert scores["cognition"] == pytest.approx(sum(subtasks[n]["score"] for n in list(subtasks)[5:]))
    # the official tool's input: 3 images x 2 lines per subtask, image<TAB>question<TAB>gt<TAB>prediction
    lines = (tmp_path / "mme_tool" / "scene.txt").read_text().splitlines()
    assert len(lines) == 6 and all(len(line.split("\t")) == 4 for line in lines)
    assert lines[0].split("\t")[1].endswith("Please answer yes or no.")
    assert json.loads((tmp_path / "run.json").read_text())["model"] == str(Path(checkpoint).resolve())
    assert json.loads((tmp_path / "scores.json").read_text())["perception"] == pytest.approx(scores["perception"])


def test_main_job_command_in_a_subprocess(tmp_path):
    """The README's main job (`python -m hallupatch.eval lab`) on the shipped lab checkpoint, shortened."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "hallupatch.eval", "lab", "--limit", "6", "--no-progress"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    out = tmp_path / "hallupatch_output" / "lab"
    for benchmark in ("pope", "chair"):
        comparison = json.loads((out / benchmark / "comparison.json").read_text())
        assert comparison["questions"] == 6 and comparison["baseline"] == "none"
        assert json.loads((out / benchmark / "none" / "run.json").read_text())["model"] == "hallupatch-lab"
    assert (out / "lab.png").read_bytes()[:4] == b"\x89PNG" and "McNemar" in done.stdout


def test_the_benchmark_commands_default_to_the_lab(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "hallupatch.eval", "mme", "--limit", "4", "--no-progress"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "perception" in done.stdout
    from hallupatch.eval.embedded import builtin_model

    assert (tmp_path / "hallupatch_output" / f"mme-{builtin_model().name}-none" / "scores.json").exists()


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert cli.main(["phd", "--output", str(tmp_path)]) == 2   # mme, pope and chair have built-in data
    assert "error: PhD needs --data" in capsys.readouterr().err
    assert cli.main(["mme", "--data", str(tmp_path / "missing"), "--output", str(tmp_path)]) == 2
    assert "MME data not found" in capsys.readouterr().err
    assert cli.main(["mme", "--output", str(tmp_path), "--retracing-ratio", "0.2"]) == 2
    assert "--retracing-ratio is a knob of memvr, which --method none does not include" in capsys.readouterr().err


def test_llava_prompt_follows_the_published_recipe(backend, mme_folder):
    q = load_mme_folder(mme_folder)[0]
    assert backend.prompt(q) == q.question.replace(" Please answer yes or no.", "") + \
        "\nAnswer the question using a single word or phrase."
    assert backend.recipe.template.format(question="Q?") == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nQ? ASSISTANT:"
    )
    assert backend.recipe.max_new_tokens == 128
    qwen = models.RECIPES["qwen-vl"]
    assert qwen.template.format(image="/x.jpg", question="Q? Please answer yes or no.") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<img>/x.jpg</img>\nQ? Please answer yes or no.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert models.rewrite_question("Q?  Please answer yes or no.", "as_is") == "Q?  Please answer yes or no."


def test_family_detection_and_original_llava_message(tmp_path, checkpoint):
    assert models.detect_recipe(str(checkpoint)) == "llava-hf"
    for model_type, family in [("qwen", "qwen-vl"), ("chatglm", "glm-4v"), ("llava_llama", "llava")]:
        (tmp_path / model_type).mkdir()
        (tmp_path / model_type / "config.json").write_text(json.dumps({"model_type": model_type}))
        assert models.detect_recipe(str(tmp_path / model_type)) == family
    # liuhaotian/llava-v1.5-7b's config.json says model_type "llava" with the original repository's class
    (tmp_path / "original").mkdir()
    (tmp_path / "original" / "config.json").write_text(
        json.dumps({"model_type": "llava", "architectures": ["LlavaLlamaForCausalLM"]}))
    assert models.detect_recipe(str(tmp_path / "original")) == "llava"
    # LLaVA-NeXT's recipe follows its language model; llava-v1.6-34b (Yi vocabulary, ChatML) has none here
    for name, text_config, recipe in [("next-vicuna", {"model_type": "llama", "vocab_size": 32064}, "llava-next-vicuna"),
                                      ("next-mistral", {"model_type": "mistral", "vocab_size": 32064}, "llava-next-mistral"),
                                      ("next-yi", {"model_type": "llama", "vocab_size": 64000}, None)]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(
            {"model_type": "llava_next", "architectures": ["LlavaNextForConditionalGeneration"], "text_config": text_config}))
        if recipe is None:
            with pytest.raises(ValueError, match="llava-v1.6-34b uses ChatML"):
                models.detect_recipe(str(tmp_path / name))
        else:
            assert models.detect_recipe(str(tmp_path / name)) == recipe
    for model_type, recipe in [("vipllava", "vipllava"), ("idefics2", "idefics2")]:
        (tmp_path / model_type).mkdir()
        (tmp_path / model_type / "config.json").write_text(json.dumps({"model_type": model_type}))
        assert models.detect_recipe(str(tmp_path / model_type)) == recipe
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="cannot tell the model family"):
        models.detect_recipe(str(tmp_path / "gpt2"))
    try:
        import llava  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="original LLaVA repository.*pip install"):
            models.load_backend(str(tmp_path / "llava_llama"), device="cpu")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.detect_recipe(str(tmp_path))


def test_checkpoint_folder_and_dataset_layouts_agree_and_batching_changes_nothing(
    tmp_path, backend, mme_folder, mme_dataset, reference
):
    ref_out, ref_scores = reference
    folder = cli.run(_args(mme_folder, tmp_path / "folder", "--batch-size", "4"), backend=backend)
    dataset = cli.run(_args(mme_dataset, tmp_path / "dataset", "--batch-size", "4"), backend=backend)
    ref = read_answers(ref_out / "answers.jsonl")
    assert len(ref) == int(LIMIT)
    # batch 4 == batch 1, byte for byte
    assert (tmp_path / "folder" / "answers.jsonl").read_bytes() == (ref_out / "answers.jsonl").read_bytes()
    assert folder["subtasks"] == ref_scores["subtasks"]
    # the same questions and images from a `datasets` dataset give the same answers
    from_ds = read_answers(tmp_path / "dataset" / "answers.jsonl")
    assert [(a["question_id"], a["text"], a["prompt"]) for a in from_ds] == [
        (a["question_id"], a["text"], a["prompt"]) for a in ref
    ]
    assert dataset["subtasks"] == ref_scores["subtasks"]
    assert ref[0]["prompt"].endswith("?\nAnswer the question using a single word or phrase.")


def test_memvr_runs_and_records_its_trace(tmp_path, backend, mme_folder, reference):
    ref_out, _ = reference
    layers = ["--starting-layer", "0", "--ending-layer", "3"]
    cli.run(_args(mme_folder, tmp_path / "always", "--method", "memvr", "--entropy-threshold", "0",
                  "--retracing-ratio", "1.0", "--batch-size", "4", *layers), backend=backend)
    cli.run(_args(mme_folder, tmp_path / "always1", "--method", "memvr", "--entropy-threshold", "0",
                  "--retracing-ratio", "1.0", "--batch-size", "1", *layers), backend=backend)
    cli.run(_args(mme_folder, tmp_path / "never", "--method", "memvr", "--entropy-threshold", "1.5",
                  "--batch-size", "4", *layers), backend=backend)
    assert get_patch(backend.model) is None  # removed after the run
    always = read_answers(tmp_path / "always" / "answers.jsonl")
    never = read_answers(tmp_path / "never" / "answers.jsonl")
    plain = read_answers(ref_out / "answers.jsonl")
    for a in always:
        # threshold 0: every forward pass of the answer triggers after the first checked layer (1)
        assert a["memvr"] == {"passes": a["new_tokens"], "triggered_passes": a["new_tokens"],
                              "trigger_layers": [1] * a["new_tokens"]}
    for a in never:
        assert a["memvr"]["triggered_passes"] == 0 and a["memvr"]["passes"] == a["new_tokens"]
    # never triggering leaves the answers of the unpatched model; always retracing with alpha=1 changes some
    assert [a["text"] for a in never] == [a["text"] for a in plain]
    assert [a["text"] for a in always] != [a["text"] for a in plain]
    # MemVR answers and traces do not depend on the batch size either
    assert (tmp_path / "always" / "answers.jsonl").read_bytes() == (tmp_path / "always1" / "answers.jsonl").read_bytes()
    run = json.loads((tmp_path / "always" / "run.json").read_text())
    assert run["method"] == "memvr"
    assert run["knobs"] == {"entropy_threshold": 0.0, "retracing_ratio": 1.0, "starting_layer": 0, "ending_layer": 3}


def test_resume_after_interruption_gives_the_same_files(tmp_path, backend, mme_folder, reference, monkeypatch):
    ref_out, _ = reference
    out = tmp_path / "run"
    calls = {"n": 0}
    real = backend.generate

    def interrupted(questions, max_new_tokens):
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill")
        calls["n"] += 1
        return real(questions, max_new_tokens)

    monkeypatch.setattr(backend, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli.run(_args(mme_folder, out, "--batch-size", "2"), backend=backend)
    assert len(read_answers(out / "answers.jsonl")) == 4
    assert not (out / "scores.json").exists()
    with open(out / "answers.jsonl", "a") as f:  # and a half-written line, as a kill mid-write leaves
        f.write('{"question_id": "count/coun_000.png#0", "te')
    monkeypatch.setattr(backend, "generate", real)
    seen = []
    monkeypatch.setattr(backend, "generate", lambda qs, n: seen.extend(q.qid for q in qs) or real(qs, n))
    with pytest.warns(UserWarning, match="incomplete last line"):
        cli.run(_args(mme_folder, out, "--batch-size", "3"), backend=backend)
    assert len(seen) == int(LIMIT) - 4  # finished questions were skipped
    assert _files(out) == _files(ref_out)
    ids = [a["question_id"] for a in read_answers(out / "answers.jsonl")]
    assert len(ids) == len(set(ids)) == int(LIMIT)
    # rerunning a finished run answers nothing and changes nothing
    seen.clear()
    cli.run(_args(mme_folder, out), backend=backend)
    assert seen == [] and _files(out) == _files(ref_out)


def test_resume_with_other_settings_is_refused(tmp_path, backend, mme_folder, reference):
    ref_out, _ = reference
    with pytest.raises(StoreError, match=r"different settings(.|\n)*max_new_tokens: 3 \(stored\) vs 5 \(now\)"):
        cli.run(["mme", "--data", str(mme_folder), "--output", str(ref_out), "--limit", LIMIT,
                 "--max-new-tokens", "5", "--no-progress"], backend=backend)
    with pytest.raises(StoreError, match=r"method: 'none' \(stored\) vs 'memvr' \(now\)"):
        cli.run(_args(mme_folder, ref_out, "--method", "memvr", "--starting-layer", "0", "--ending-layer", "3"),
                backend=backend)


def test_every_shard_refuses_a_mismatched_resume_before_waiting_for_the_others(
        tmp_path, backend, mme_folder, reference, monkeypatch):
    ref_out, _ = reference

    def barrier():
        raise AssertionError("rank 1 reached the barrier: it would wait for a rank 0 that stopped")

    monkeypatch.setattr(harness, "current_process", lambda: harness.Distributed(rank=1, world=2, barrier=barrier))
    with pytest.raises(StoreError, match="different settings"):
        cli.run(["mme", "--data", str(mme_folder), "--output", str(ref_out), "--limit", LIMIT,
                 "--max-new-tokens", "5", "--no-progress"], backend=backend)


def test_two_shards_merge_into_the_single_process_result(tmp_path, backend, mme_folder, reference):
    ref_out, _ = reference
    settings = json.loads((ref_out / "run.json").read_text())
    questions = load_mme_folder(mme_folder)[: int(LIMIT)]
    out = tmp_path / "sharded"
    prepare_output(out, settings)
    shards = [harness.shard(questions, r, 2) for r in (0, 1)]
    assert sorted(q.qid for s in shards for q in s) == sorted(q.qid for q in questions)
    assert not set(q.qid for q in shards[0]) & set(q.qid for q in shards[1])
    harness.answer_questions(backend, questions, out, batch_size=4, max_new_tokens=int(TOKENS),
                            proc=harness.Distributed(0, 2), progress=False)
    with pytest.raises(StoreError, match=r"6 question\(s\) have no answer .*rerun the same command"):
        harness.finish(get_task("mme")(), questions, out, settings)
    harness.answer_questions(backend, questions, out, batch_size=4, max_new_tokens=int(TOKENS),
                            proc=harness.Distributed(1, 2), progress=False)
    assert sorted(p.name for p in out.glob("answers*.jsonl")) == ["answers.jsonl", "answers.rank1.jsonl"]
    scores = harness.finish(get_task("mme")(), questions, out, settings)
    assert sorted(p.name for p in out.glob("answers*.jsonl")) == ["answers.jsonl"]
    assert _files(out) == _files(ref_out)
    assert scores["perception"] == json.loads((ref_out / "scores.json").read_text())["perception"]


def test_scoring_answers_made_elsewhere(tmp_path, mme_folder, reference):
    ref_out, ref_scores = reference
    ours = read_answers(ref_out / "answers.jsonl")
    # our own answers.jsonl scores as the run scored it
    again = cli.run(["mme", "--answers", str(ref_out / "answers.jsonl"), "--data", str(mme_folder), "--limit", LIMIT,
                     "--output", str(tmp_path / "own")])
    assert again["subtasks"] == ref_scores["subtasks"]
    assert (tmp_path / "own" / "mme_tool" / "existence.txt").read_bytes() == \
        (ref_out / "mme_tool" / "existence.txt").read_bytes()
    # LLaVA's answer file: question_id names the image, matched through `prompt`, in any order
    texts = {a["question_id"]: ["Yes", "No", "yes, it is", "maybe"][i % 4] for i, a in enumerate(ours)}
    expected = get_task("mme")().score(load_mme_folder(mme_folder)[: int(LIMIT)], texts)[0]
    assert 0 < expected["perception"] < 400
    llava = tmp_path / "llava.jsonl"
    llava.write_text("".join(
        json.dumps({"question_id": a["image_id"], "prompt": a["prompt"], "text": texts[a["question_id"]]}) + "\n"
        for a in reversed(ours)
    ))
    scores = cli.run(["mme", "--answers", str(llava), "--data", str(mme_folder), "--limit", LIMIT,
                      "--output", str(tmp_path / "scored")])
    assert scores["subtasks"] == expected["subtasks"]
    # without prompts, an image's answers are taken in order
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(
        json.dumps({"question_id": a["image_id"], "text": texts[a["question_id"]]}) + "\n" for a in ours
    ))
    scores = cli.run(["mme", "--answers", str(plain), "--data", str(mme_folder), "--limit", LIMIT,
                      "--output", str(tmp_path / "plain")])
    assert scores["subtasks"] == expected["subtasks"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question_id": "existence/nope.png", "text": "yes"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: question 'existence/nope.png' matches no unanswered question"):
        cli.run(["mme", "--answers", str(bad), "--data", str(mme_folder), "--output", str(tmp_path / "x")])
    bad.write_text(json.dumps({"question_id": ours[0]["question_id"], "text": "yes"}) + "\n{oops\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        cli.run(["mme", "--answers", str(bad), "--data", str(mme_folder), "--output", str(tmp_path / "x")])
    bad.write_text(json.dumps({"question_id": ours[0]["question_id"]}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: an answer line needs 'question_id' and 'text'"):
        cli.run(["mme", "--answers", str(bad), "--data", str(mme_folder), "--output", str(tmp_path / "x")])
    with pytest.raises(DataError, match=r"answers file not found: .*none\.jsonl"):
        cli.run(["mme", "--answers", str(tmp_path / "none.jsonl"), "--data", str(mme_folder), "--output", str(tmp_path / "x")])


def test_pope_end_to_end(tmp_path, backend, mme_folder):
    images = tmp_path / "val2014"
    images.mkdir()
    qs = load_mme_folder(mme_folder)[:8:2]
    for q in qs:
        q.load_image().save(images / q.image_name)
    for split, labels in (("random", "yes no yes no"), ("adversarial", "no no yes yes")):
        lines = [json.dumps({"question_id": i + 1, "image": q.image_name, "text": q.question.split(" Please")[0],
                             "label": label}) for i, (q, label) in enumerate(zip(qs, labels.split()))]
        (tmp_path / f"coco_pope_{split}.json").write_text("\n".join(lines) + "\n")
    scores = cli.run(["pope", "--data", str(tmp_path), "--output", str(tmp_path / "out"), "--max-new-tokens", TOKENS,
                      "--batch-size", "4", "--no-progress"], backend=backend)
    assert list(scores["splits"]) == ["random", "adversarial"]
    answers = read_answers(tmp_path / "out" / "answers.jsonl")
    assert [a["question_id"] for a in answers][:2] == ["random/1", "random/2"]
    for split in ("random", "adversarial"):
        rows = [a for a in answers if a["group"] == split]
        correct = sum(parse_pope_answer(a["text"]) == a["answer"] for a in rows)
        assert scores["splits"][split]["accuracy"] == pytest.approx(correct / len(rows))
        assert scores["splits"][split]["questions"] == 4
    assert answers[0]["prompt"].endswith("\nAnswer the question using a single word or phrase.")


def test_accelerate_launch_two_processes_merge_into_the_single_process_result(tmp_path):
    pytest.importorskip("accelerate")
    args = ["mme", "--limit", "6", "--max-new-tokens", "2", "--batch-size", "2", "--no-progress"]
    cli.run([*args, "--output", str(tmp_path / "single")])
    done = launch_two_processes([*args, "--output", str(tmp_path / "sharded")], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on rank 0 of 2" in done.stdout  # really two processes, each with its shard
    assert _files(tmp_path / "sharded") == _files(tmp_path / "single")


def test_bad_numbers_are_refused_with_the_valid_range(tmp_path):
    for flag, message in (("--limit", "--limit must be >= 1"), ("--batch-size", "--batch-size must be >= 1"),
                          ("--max-new-tokens", "--max-new-tokens must be >= 1")):
        with pytest.raises(ValueError, match=message):
            cli.run(["mme", "--output", str(tmp_path / flag), flag, "0", "--no-progress"])
    with pytest.raises(ValueError, match="retracing_ratio must be in \\[0, 1\\]"):
        cli.run(["mme", "--output", str(tmp_path / "memvr"), "--method", "memvr", "--retracing-ratio", "2"])
