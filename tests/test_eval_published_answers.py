"""Answers made elsewhere, in the published layouts (issue 10 §1): no images needed, and LLaVA's POPE
files (global ids in ``llava_pope_test.jsonl``) matched by split, image and question text."""
import json
import random
import shutil

import pytest

from hallupatch.eval import cli
from hallupatch.eval.data import DataError
from hallupatch.testing.mme_sample import write_mme_sample
from hallupatch.eval.scoring import POPE_SPLITS
from hallupatch.eval.tasks.mme import load_mme_folder

SUFFIX = "\nAnswer the question using a single word or phrase."
OBJECTS = ["dog", "cat", "car", "chair", "cup", "person"]
ANSWER_STYLES = ["Yes", "No", "No, there is not.", "yes. there is one", "There is no cat", "Yes, a dog, not a cat.", "not sure"]


def _pope_files(folder, first_id=(10000001, 20000001, 30000001)):
    """LLaVA's POPE layout: coco_pope_<split>.json labels (ids 1..n per split) and llava_pope_test.jsonl
    (global ids, the split as category, the question with LLaVA's suffix); returns the answers it expects."""
    rng = random.Random(3)
    llava_lines, labels = [], {}
    for split, start in zip(POPE_SPLITS, first_id):
        rows = []
        for i in range(12):
            image = f"COCO_val2014_{i // 3:012d}.jpg"
            text = f"Is there a {OBJECTS[(i + len(split)) % len(OBJECTS)]} in the image?"
            rows.append({"question_id": i + 1, "image": image, "text": text, "label": rng.choice(["yes", "no"])})
            llava_lines.append({"question_id": start + i, "image": image, "text": text + SUFFIX, "category": split})
        labels[split] = rows
        (folder / f"coco_pope_{split}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "llava_pope_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in llava_lines))
    label_of = {(q["category"], n % 12): labels[q["category"]][n % 12]["label"] for n, q in enumerate(llava_lines)}

    def text(n, q):  # mostly right, in the answer styles a model writes, sometimes anything
        if n % 3 == 2:
            return rng.choice(ANSWER_STYLES)
        return "Yes" if label_of[(q["category"], n % 12)] == "yes" else "No, there is not."

    answers = [{"question_id": q["question_id"], "prompt": q["text"], "text": text(n, q),
                "answer_id": f"x{n}", "model_id": "llava-v1.5-13b", "metadata": {}} for n, q in enumerate(llava_lines)]
    return labels, llava_lines, answers


def _eval_pope_reference(labels, answers):
    """LLaVA's llava/eval/eval_pope.py on one split: answers and labels zipped in file order."""
    preds = []
    for answer in answers:
        text = answer["text"]
        if text.find(".") != -1:
            text = text.split(".")[0]
        words = text.replace(",", "").split(" ")
        preds.append(0 if ("No" in words or "not" in words or "no" in words) else 1)
    truth = [0 if label["label"] == "no" else 1 for label in labels]
    tp = sum(p == 1 and t == 1 for p, t in zip(preds, truth))
    fp = sum(p == 1 and t == 0 for p, t in zip(preds, truth))
    tn = sum(p == 0 and t == 0 for p, t in zip(preds, truth))
    fn = sum(p == 0 and t == 1 for p, t in zip(preds, truth))
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return {"accuracy": (tp + tn) / len(preds), "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall), "yes_ratio": preds.count(1) / len(preds)}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_llava_pope_layout_all_splits_without_images_equals_eval_pope(tmp_path):
    labels, llava_questions, answers = _pope_files(tmp_path)
    by_split = {split: [a for a, q in zip(answers, llava_questions) if q["category"] == split] for split in POPE_SPLITS}
    shuffled = list(answers)
    random.Random(0).shuffle(shuffled)             # matched by content, not by position
    scores = cli.run(["pope", "--answers", str(_write_jsonl(tmp_path / "answers.jsonl", shuffled)),
                      "--data", str(tmp_path), "--output", str(tmp_path / "out")])
    assert list(scores["splits"]) == list(POPE_SPLITS) and scores["answered"] == scores["questions"] == 36
    for split in POPE_SPLITS:
        expected = _eval_pope_reference(labels[split], by_split[split])
        for metric, value in expected.items():
            assert scores["splits"][split][metric] == pytest.approx(value, abs=1e-12), (split, metric)


def test_llava_pope_question_file_option_and_errors(tmp_path):
    data = tmp_path / "pope"
    data.mkdir()
    labels, llava_questions, answers = _pope_files(data)
    elsewhere = tmp_path / "questions.jsonl"
    shutil.move(str(data / "llava_pope_test.jsonl"), elsewhere)
    answers_file = _write_jsonl(tmp_path / "a.jsonl", answers)
    # one split loaded, answers of all three: the others match no loaded label
    with pytest.raises(DataError, match="split 'random'.*matches no unanswered question.*splits \\['adversarial', 'popular'\\]"):
        cli.run(["pope", "--answers", str(answers_file), "--data", str(data), "--question-file", str(elsewhere),
                 "--splits", "popular", "adversarial", "--output", str(tmp_path / "o1")])
    scores = cli.run(["pope", "--answers", str(answers_file), "--data", str(data), "--question-file", str(elsewhere),
                      "--output", str(tmp_path / "o2")])
    assert scores["answered"] == 36
    wrong_prompt = [dict(answers[0], prompt="Is there a zebra in the image?")]
    with pytest.raises(DataError, match="prompt 'Is there a zebra in the image\\?' is not question 10000001"):
        cli.run(["pope", "--answers", str(_write_jsonl(tmp_path / "w.jsonl", wrong_prompt)), "--data", str(data),
                 "--question-file", str(elsewhere), "--output", str(tmp_path / "o3")])
    unknown = [dict(answers[0], question_id=99)]
    with pytest.raises(DataError, match="question_id 99 is not in"):
        cli.run(["pope", "--answers", str(_write_jsonl(tmp_path / "u.jsonl", unknown)), "--data", str(data),
                 "--question-file", str(elsewhere), "--output", str(tmp_path / "o4")])
    twice = [answers[0], answers[0]]
    with pytest.raises(DataError, match="matches no unanswered question"):
        cli.run(["pope", "--answers", str(_write_jsonl(tmp_path / "t.jsonl", twice)), "--data", str(data),
                 "--question-file", str(elsewhere), "--output", str(tmp_path / "o5")])
    with pytest.raises(ValueError, match="--question-file .* use it with --answers"):
        cli.run(["pope", "--data", str(data), "--question-file", str(elsewhere), "--output", str(tmp_path / "o6")])
    assert cli.main(["pope", "--answers", str(answers_file), "--data", str(data), "--question-file",
                     str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o7")]) == 2


def test_pope_answers_with_the_per_split_ids_still_need_no_images(tmp_path):
    labels, _, _ = _pope_files(tmp_path)
    (tmp_path / "llava_pope_test.jsonl").unlink()
    answers = [{"question_id": row["question_id"], "text": "yes" if i % 3 else "no"} for i, row in enumerate(labels["random"])]
    scores = cli.run(["pope", "--answers", str(_write_jsonl(tmp_path / "a.jsonl", answers)), "--data", str(tmp_path),
                      "--splits", "random", "--output", str(tmp_path / "out")])
    expected = _eval_pope_reference(labels["random"], answers)
    assert scores["splits"]["random"]["f1"] == pytest.approx(expected["f1"], abs=1e-12)


def test_mme_answers_need_no_images(tmp_path):
    full = write_mme_sample(tmp_path / "full" / "MME_Benchmark_release_version")
    bare = tmp_path / "bare" / "MME_Benchmark_release_version"
    shutil.copytree(full, bare, ignore=shutil.ignore_patterns("*.png", "*.jpg"))
    assert not list(bare.rglob("*.png")) and not list(bare.rglob("*.jpg"))
    questions = load_mme_folder(full)
    llava = [{"question_id": q.image_id, "prompt": q.question + SUFFIX, "text": ANSWER_STYLES[i % len(ANSWER_STYLES)]}
             for i, q in enumerate(questions)]
    answers = _write_jsonl(tmp_path / "llava_mme.jsonl", llava)
    with_images = cli.run(["mme", "--answers", str(answers), "--data", str(full), "--output", str(tmp_path / "a")])
    without = cli.run(["mme", "--answers", str(answers), "--data", str(bare), "--output", str(tmp_path / "b")])
    assert without["subtasks"] == with_images["subtasks"] and without["answered"] == len(questions)
    with pytest.raises(DataError, match="image not found"):
        load_mme_folder(bare)                       # answering questions still needs the images
