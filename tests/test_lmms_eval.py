"""hallupatch as an lmms-eval model: lmms-eval's own CLI runs the lab's local MME and POPE tasks through the
plug-in, and its answers and scores must equal ``python -m hallupatch.eval`` on the same questions.

Needs the ``lmms`` extra (``pip install -e ".[lmms]"``); skipped only when lmms-eval is not importable.
lmms-eval's CLI logs a model that fails to load and still exits 0, so every check reads its output files.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason="the lmms extra is not installed (pip install -e '.[lmms]')")

import torch  # noqa: E402

import hallupatch  # noqa: E402
from hallupatch.eval import cli, models  # noqa: E402
from hallupatch.lab.model import CHECKPOINT_DIR  # noqa: E402
from hallupatch.lmms.tasks import POPE_SPLITS, write_lab_tasks  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LAB = str(CHECKPOINT_DIR)
# MemVR retracing in every pass with a strong ratio: it changes some of the lab's answers, so a plug-in that
# did not apply the method would fail the comparison
KNOBS = {"starting_layer": 0, "ending_layer": 5, "entropy_threshold": 0.0, "retracing_ratio": 0.6}
MME_IMAGES, POPE_QUESTIONS = 8, 10


def _hallupatch_eval(benchmark: str, data: Path, out: Path, max_new_tokens: int) -> dict:
    """``python -m hallupatch.eval <benchmark> --method none,memvr`` at batch size 1 (the CLI's own code)."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in KNOBS.items()]
    return cli.run([benchmark, "--model", LAB, "--data", str(data), "--method", "none,memvr", *flags,
                    "--max-new-tokens", str(max_new_tokens), "--batch-size", "1", "--device", "cpu",
                    "--output", str(out), "--no-progress"])


def _answers(folder: Path) -> dict:
    rows = [json.loads(line) for line in (folder / "answers.jsonl").read_text().splitlines() if line.strip()]
    return {r["question_id"]: r for r in rows}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The lmms-eval run (batch size 4, through the plug-in) and hallupatch.eval's runs on the same questions."""
    assert "hallupatch" in [ep.name for ep in entry_points(group="lmms_eval.models")], \
        "lmms-eval is installed but hallupatch's entry point is not: pip install -e '.[lmms]'"
    root = tmp_path_factory.mktemp("lmms")
    tasks = write_lab_tasks(root / "tasks", mme_images=MME_IMAGES, pope_questions=POPE_QUESTIONS)
    model_args = ",".join([f"pretrained={LAB}", "method=memvr", *(f"{k}={v}" for k, v in KNOBS.items())])
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    command = [sys.executable, "-m", "lmms_eval", "--model", "hallupatch", "--model_args", model_args,
               "--tasks", "hallupatch_lab_mme,hallupatch_lab_mme_choice,hallupatch_lab_pope",
               "--include_path", str(tasks), "--batch_size", "4", "--device", "cpu",
               "--output_path", str(root / "lmms_out"), "--log_samples"]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    log = (done.stdout + done.stderr)[-3000:]
    assert done.returncode == 0, log
    results = sorted((root / "lmms_out").rglob("*_results.json"))
    assert results, f"lmms-eval wrote no results (it exits 0 when the model fails to load):\n{log}"
    samples = {}
    for path in results[-1].parent.glob("*_samples_*.jsonl"):
        task = path.stem.split("_samples_", 1)[1]
        samples[task] = {row["doc_id"]: row for row in map(json.loads, path.read_text().splitlines())}
    ours = root / "hallupatch_eval"
    return {
        "tasks": tasks,
        "lmms": json.loads(results[-1].read_text())["results"],
        "samples": samples,
        "mme": _hallupatch_eval("mme", tasks / "data" / "mme", ours / "mme", 16),
        "mme_dir": ours / "mme",
        "pope": _hallupatch_eval("pope", tasks / "data" / "pope_files", ours / "pope", 128),
        "pope_dir": ours / "pope",
    }


def _dataset(runs, name):
    import datasets

    return datasets.load_from_disk(str(runs["tasks"] / "data" / name))


def test_mme_answers_and_scores_equal_hallupatch_eval(runs):
    memvr = {(r["image_id"], r["question"]): r["text"] for r in _answers(runs["mme_dir"] / "memvr").values()}
    rows = _dataset(runs, "mme")["test"]
    samples = runs["samples"]["hallupatch_lab_mme"]
    assert len(samples) == len(rows) == 2 * MME_IMAGES == len(memvr)
    for doc_id, sample in samples.items():
        row = rows[doc_id]
        assert sample["filtered_resps"] == memvr[(row["question_id"], row["question"])], row["question"]
    ours = runs["mme"]["methods"]["memvr"]
    lmms_score = runs["lmms"]["hallupatch_lab_mme"]["mme_perception_score,none"]
    assert lmms_score == pytest.approx(ours["perception"], abs=1e-9)


def test_pope_answers_and_scores_equal_hallupatch_eval(runs):
    memvr, plain = _answers(runs["pope_dir"] / "memvr"), _answers(runs["pope_dir"] / "none")
    data = _dataset(runs, "pope")
    changed = 0
    for split in POPE_SPLITS:
        samples = runs["samples"][f"hallupatch_lab_pope_{split}"]
        assert len(samples) == POPE_QUESTIONS
        for doc_id, sample in samples.items():
            qid = data[split][doc_id]["question_id"]
            assert sample["filtered_resps"] == memvr[qid]["text"], qid
            changed += memvr[qid]["text"] != plain[qid]["text"]
        lmms = runs["lmms"][f"hallupatch_lab_pope_{split}"]
        ours = runs["pope"]["methods"]["memvr"]["splits"][split]
        for lmms_name, our_name in (("accuracy", "accuracy"), ("precision", "precision"), ("recall", "recall"),
                                    ("f1_score", "f1")):
            assert lmms[f"pope_{lmms_name},none"] == pytest.approx(ours[our_name], abs=1e-9), (split, lmms_name)
        # lmms-eval's pope_yes_ratio is the ground truth's share of "yes" (POPE's own is the answers')
        truth = [data[split][i]["answer"] for i in range(len(data[split]))]
        assert lmms["pope_yes_ratio,none"] == pytest.approx(truth.count("yes") / len(truth))
    assert changed > 0, "MemVR changed no answer: the comparison would not show that the plug-in applied it"


def test_multiple_choice_loglikelihood_is_the_patched_models_prefill(runs):
    """Yes/No by loglikelihood: each one-token choice's loss is -log p(choice) of the patched model's last
    prompt position, recomputed here with one plain forward pass per question (batch size 1)."""
    backend = models.load_backend(LAB, device="cpu")
    tokenizer = backend.processor.tokenizer
    rows = _dataset(runs, "mme")["test"]
    samples = runs["samples"]["hallupatch_lab_mme_choice"]
    hallupatch.apply(backend.model, "memvr", **KNOBS)
    correct = 0
    with torch.no_grad():
        for doc_id, sample in samples.items():
            row = rows[doc_id]
            question = row["question"].replace(" Please answer yes or no.", "") + \
                "\nAnswer the question using a single word or phrase."
            assert sample["input"] == question
            image = models.expand_to_square(row["image"].convert("RGB"), backend.background)
            inputs = backend.processor(text=[backend.recipe.template.format(question=question)], images=[image],
                                       return_tensors="pt")
            logprobs = torch.log_softmax(backend.model(**inputs).logits[0, -1].double(), dim=-1)
            losses = []
            for choice, (loss, greedy) in zip(("Yes", "No"), sample["filtered_resps"]):
                token, = tokenizer(choice, add_special_tokens=False).input_ids
                assert float(loss) == pytest.approx(-float(logprobs[token]), abs=1e-4), (doc_id, choice)
                assert (greedy == "True") == (int(logprobs.argmax()) == token)
                losses.append(float(loss))
            correct += ("Yes", "No")[losses.index(min(losses))] == row["answer"]
    assert runs["lmms"]["hallupatch_lab_mme_choice"]["acc,none"] == pytest.approx(correct / len(samples))


# --------------------------------------------------------------------------- the model class, in process
from lmms_eval.api.instance import Instance  # noqa: E402

from hallupatch.engine import get_patch  # noqa: E402
from hallupatch.lab import questions as lab_questions  # noqa: E402
from hallupatch.lmms.model import HallupatchLMM, decoding_for  # noqa: E402

SHORT = "\nAnswer the question using a single word or phrase."


@pytest.fixture(scope="module")
def lab_docs():
    """Four lab MME questions (two images), as lmms-eval documents and contexts."""
    qs = lab_questions.mme_questions("test", 2)
    return [{"image": q.scene.image(), "context": q.mme_text.replace(" Please answer yes or no.", "") + SHORT}
            for q in qs]


def _requests(lm, docs, continuations):
    lm.task_dict = {"lab": {"test": docs}}
    return [Instance("loglikelihood", (doc["context"], cont, lambda d: [d["image"]], i, "lab", "test"), idx=0,
                     metadata={"task": "lab", "doc_id": i, "repeats": 1})
            for i, doc in enumerate(docs) for cont in continuations]


def _inputs(backend, context, image, continuation=""):
    image = models.expand_to_square(image.convert("RGB"), backend.background)
    return backend.processor(text=[backend.recipe.template.format(question=context) + continuation],
                             images=[image], return_tensors="pt")


def test_loglikelihood_of_several_tokens_is_the_teacher_forced_loss(lab_docs):
    """Without a method, feeding the continuation step by step (batched, left-padded) gives the mean
    per-token loss of one teacher-forced forward pass over prompt + continuation, alone."""
    lm = HallupatchLMM(pretrained=LAB, batch_size=4, device="cpu")
    continuations = (" yes", " no square", " yes yes no")
    results = lm.loglikelihood(_requests(lm, lab_docs, continuations))
    tokenizer = lm.tokenizer
    with torch.no_grad():
        for k, result in enumerate(results):
            doc, cont = lab_docs[k // len(continuations)], continuations[k % len(continuations)]
            tokens = tokenizer(cont.strip(), add_special_tokens=False).input_ids
            logits = lm.model(**_inputs(lm.backend, doc["context"], doc["image"], cont)).logits[0].double()
            steps = torch.log_softmax(logits[-len(tokens) - 1:-1], dim=-1)
            expected = -float(steps[range(len(tokens)), tokens].mean())
            loss, greedy = result.text
            assert loss == pytest.approx(expected, abs=1e-4), (doc["context"], cont)
            assert greedy == all(int(steps[i].argmax()) == t for i, t in enumerate(tokens))


def test_loglikelihood_with_layer_contrast_scores_the_contrasted_distribution(lab_docs):
    """With dola the probabilities are the contrast's: recomputed from generate()'s first-step scores of
    the patched model, one question at a time; a token outside the contrast's plausibility set has loss inf."""
    lm = HallupatchLMM(pretrained=LAB, method="dola", candidate_layers="[2,4]", batch_size=4, device="cpu")
    assert get_patch(lm.model).configs["dola"].candidate_layers == [2, 4]  # the JSON list knob
    results = lm.loglikelihood(_requests(lm, lab_docs, (" yes", " no")))
    finite = 0
    with torch.no_grad():
        for k, result in enumerate(results):
            doc, word = lab_docs[k // 2], ("yes", "no")[k % 2]
            token, = lm.tokenizer(word, add_special_tokens=False).input_ids
            out = lm.model.generate(**_inputs(lm.backend, doc["context"], doc["image"]), max_new_tokens=1,
                                    do_sample=False, output_scores=True, return_dict_in_generate=True)
            expected = -float(torch.log_softmax(out.scores[0][0].double(), dim=-1)[token])
            loss, greedy = result.text
            assert loss == pytest.approx(expected, abs=1e-4), (doc["context"], word)
            assert greedy == (int(out.sequences[0, -1]) == token)
            finite += expected != float("inf")
    assert 0 < finite < len(results)  # both cases occur on these questions


@pytest.mark.parametrize("args, message", [
    ({"method": "memvr", "retracing_ratoi": 0.1}, "retracing_ratio"),   # a typo names the valid knobs
    ({"method": "none", "retracing_ratio": 0.1}, "no knobs"),
    ({"method": "memvrr"}, "unknown method"),
    ({"method": "memvr", "retracing_ratio": 2.0, "starting_layer": 0, "ending_layer": 5}, "retracing_ratio"),
    ({"batch_size": "auto"}, "batch_size"),
    ({"candidate_layers": "[2,", "method": "dola"}, "JSON"),
])
def test_model_args_are_validated(args, message):
    with pytest.raises(ValueError, match=message):
        HallupatchLMM(**{"pretrained": LAB, "device": "cpu", **args})


def test_pretrained_is_required():
    with pytest.raises(ValueError, match="pretrained=PATH"):
        HallupatchLMM()


def test_generation_kwargs_map_onto_decoding():
    greedy, max_new, until = decoding_for({"max_new_tokens": 16, "temperature": 0, "top_p": 1.0, "num_beams": 1,
                                           "do_sample": False, "until": "\n\n"})
    assert (greedy.do_sample, greedy.temperature, greedy.top_p, max_new, until) == (False, None, None, 16, ["\n\n"])
    sampled, max_new, until = decoding_for({"temperature": 0.7, "top_p": 0.9})
    assert (sampled.do_sample, sampled.temperature, sampled.top_p, max_new, until) == (True, 0.7, 0.9, None, [])


@pytest.mark.parametrize("architecture", ["llava", "llava_next", "llava_next_mistral", "vipllava", "idefics2"])
def test_every_processor_checkpoint_answers_batched_as_hallupatch_eval_alone(architecture, tiny_llava_dir, tmp_path):
    """Tiny checkpoints of every processor-based recipe, loaded by pretrained=PATH: batched answers (MemVR on)
    equal the eval harness's backend answering each question alone, and batched
    loglikelihoods equal those at batch size 1."""
    from hallupatch.eval.data import Question
    from hallupatch.testing.families import build_checkpoint
    from hallupatch.testing.tiny import tiny_image

    path = tiny_llava_dir if architecture == "llava" else build_checkpoint(tmp_path / architecture, architecture,
                                                                           num_layers=4)
    knobs = {"starting_layer": 0, "ending_layer": 3, "entropy_threshold": 0.0, "retracing_ratio": 0.5}
    # transformers 4.40's LLaVA-NeXT processor cannot batch images whose anyres grids differ (it does not pad
    # the tiles), in hallupatch.eval as here: one size for it, mixed sizes for the others
    sizes = (56, 56, 56) if architecture.startswith("llava_next") else (56, 28, 84)
    docs = [{"image": tiny_image(seed, size=size), "context": text} for seed, size, text in
            zip((1, 2, 3), sizes, ("what is here?", "is there a cat in the image?", "colour?"))]
    lm = HallupatchLMM(pretrained=str(path), method="memvr", batch_size=3, device="cpu", **knobs)
    lm.task_dict = {"lab": {"test": docs}}
    gen_kwargs = {"max_new_tokens": 6, "temperature": 0, "do_sample": False, "until": []}
    requests = [Instance("generate_until", (doc["context"], dict(gen_kwargs), lambda d: [d["image"]], i, "lab", "test"),
                         idx=0, metadata={"task": "lab", "doc_id": i, "repeats": 1}) for i, doc in enumerate(docs)]
    answers = lm.generate_until(requests)

    reference = models.load_backend(str(path), device="cpu")
    reference.recipe = dataclasses.replace(reference.recipe, question_style="as_is")
    expected = []
    with hallupatch.patched(reference.model, "memvr", **knobs):
        for i, doc in enumerate(docs):
            question = Question(str(i), "lab", str(i), str(i), doc["context"], "", image=lambda d=doc: d["image"])
            expected.append(reference.generate([question], 6)[0]["text"])
    assert answers == expected and any(answers), answers
    assert lm.backend.recipe.name == models.detect_recipe(str(path))

    continuations = (" yes", " a cat")
    batched = [r.text for r in lm.loglikelihood(_requests(lm, docs, continuations))]
    lm.batch_size_per_device = 1
    alone = [r.text for r in lm.loglikelihood(_requests(lm, docs, continuations))]
    assert [g for _, g in batched] == [g for _, g in alone]
    assert [loss for loss, _ in batched] == pytest.approx([loss for loss, _ in alone], abs=1e-4)
