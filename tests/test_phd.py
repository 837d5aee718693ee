"""PhD benchmark: data expansion per mode, context prompts, image layout, hand-computed PhD index."""
import json

import pytest

from hallupatch.eval.phd import CONTEXT_INSTRUCTION, load_phd, phd_index, phd_questions, score_phd

DATA = [
    {"image_id": "139", "task": "object", "yes_question": "Is there a dog?", "no_question": "Is there a cat?",
     "hitem": "cat", "gt": "dog", "subject": "animal",
     "context": {"iac": "The photo was taken on a sunny day.", "icc": "There is a cat on the sofa."}},
    {"image_id": "42", "task": "counting", "yes_question": "Are there two cups?",
     "no_question": "Are there three cups?", "hitem": "three", "gt": "two", "subject": "cup",
     "context": {"iac": "Cups are often used for tea.", "icc": "Three cups stand on the table."}},
    {"image_id": "0", "task": "object", "yes_question": "Is there a sausage in the banana peel?",
     "no_question": "Is there a banana in the banana peel?", "ccs_description": "A sausage in a banana peel."},
]

PREDICTIONS = {
    "base/0/yes": "Yes, there is a dog.", "base/0/no": "No.",
    "base/1/yes": "There are not three.", "base/1/no": "No, two.",
    "iac/0/yes": "Yes", "iac/0/no": "Yes, a cat.",
    "iac/1/yes": "yes", "iac/1/no": "NO",  # POPE parsing is case-sensitive: "NO" reads as yes
    "icc/0/yes": "No", "icc/0/no": "No", "icc/1/yes": "No", "icc/1/no": "no",
    "ccs/2/yes": "Yes", "ccs/2/no": "No",
}


def test_questions_per_mode_and_context_prompt():
    qs = phd_questions(DATA)
    assert [q.qid for q in qs] == [
        "base/0/yes", "base/0/no", "base/1/yes", "base/1/no",
        "iac/0/yes", "iac/0/no", "iac/1/yes", "iac/1/no",
        "icc/0/yes", "icc/0/no", "icc/1/yes", "icc/1/no",
        "ccs/2/yes", "ccs/2/no",
    ]
    by = {q.qid: q for q in qs}
    assert by["base/0/yes"].question == "Is there a dog?"
    assert by["iac/0/yes"].question == (
        "The photo was taken on a sunny day. In case there is an inconsistency between the context and the "
        "image content, you should follow the image. Is there a dog?")
    assert by["icc/1/no"].question == "Three cups stand on the table." + CONTEXT_INSTRUCTION + "Are there three cups?"
    assert by["base/1/no"].label == "no" and by["base/1/no"].task == "counting"
    assert by["base/0/yes"].image == "images/train2014/COCO_train2014_000000000139.jpg"
    assert by["ccs/2/yes"].image == "images/CCS_images/0.png"
    assert [q.qid for q in phd_questions(DATA, modes=["ccs"])] == ["ccs/2/yes", "ccs/2/no"]
    with pytest.raises(ValueError, match="valid"):
        phd_questions(DATA, modes=["sec"])


def test_missing_context_and_file(tmp_path):
    with pytest.raises(ValueError, match=r"context\['icc'\]"):
        phd_questions([{"image_id": "1", "task": "object", "yes_question": "a?", "no_question": "b?",
                        "context": {"iac": "x"}}], modes=["icc"])
    with pytest.raises(FileNotFoundError, match="data.json"):
        load_phd(tmp_path / "data.json")


def test_image_layout(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(DATA))
    qs = {q.qid: q for q in load_phd(path)}
    val = tmp_path / "images" / "val2014" / "COCO_val2014_000000000139.jpg"
    val.parent.mkdir(parents=True)
    val.write_bytes(b"x")
    assert qs["base/0/yes"].resolve_image(tmp_path) == val  # train2014 first, then val2014
    with pytest.raises(FileNotFoundError, match="COCO_val2014_000000000042.jpg"):
        qs["base/1/yes"].resolve_image(tmp_path)
    with pytest.raises(FileNotFoundError, match="CCS_images"):
        qs["ccs/2/yes"].resolve_image(tmp_path)


def test_phd_index_hand_computed():
    qs = phd_questions(DATA)
    scores = score_phd((q.mode, q.task, q.label, PREDICTIONS[q.qid]) for q in qs)
    g = scores["groups"]
    assert list(g) == ["base/counting", "base/object", "iac/counting", "iac/object",
                       "icc/counting", "icc/object", "ccs/object"]
    assert (g["base/object"]["yes_recall"], g["base/object"]["no_recall"], g["base/object"]["phd_index"]) == (1, 1, 1)
    # base/counting: the yes-question was answered "There are not three." -> no.
    assert (g["base/counting"]["yes_recall"], g["base/counting"]["no_recall"]) == (0, 1)
    assert g["base/counting"]["phd_index"] == 0
    # base pooled: yes 1/2, no 2/2 -> 2 * 0.5 * 1 / 1.5
    assert scores["modes"]["base"]["phd_index"] == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert (scores["modes"]["iac"]["yes_recall"], scores["modes"]["iac"]["no_recall"]) == (1, 0)
    assert (scores["modes"]["icc"]["yes_recall"], scores["modes"]["icc"]["no_recall"]) == (0, 1)
    assert scores["modes"]["ccs"]["phd_index"] == 1
    # overall: yes right 1 + 2 + 0 + 1 = 4 of 7, no right 2 + 0 + 2 + 1 = 5 of 7.
    o = scores["overall"]
    assert (o["yes_questions"], o["no_questions"]) == (7, 7)
    assert o["yes_recall"] == pytest.approx(4 / 7) and o["no_recall"] == pytest.approx(5 / 7)
    assert o["phd_index"] == pytest.approx(2 * (4 / 7) * (5 / 7) / (9 / 7))
    assert o["yes_ratio"] == pytest.approx(6 / 14)  # yes answers: base 1, iac 4, icc 0, ccs 1


def test_phd_index_edges():
    assert phd_index(0.0, 0.0) == 0.0
    assert phd_index(None, 1.0) is None
    assert phd_index(0.5, 0.25) == pytest.approx(1 / 3)
    only_yes = score_phd([("base", "object", "yes", "Yes")])
    assert only_yes["overall"]["no_recall"] is None and only_yes["overall"]["phd_index"] is None
    with pytest.raises(ValueError, match="yes or no"):
        score_phd([("base", "object", "maybe", "Yes")])


# ---------------------------------------------------------------- the older data.jsonl layout (region-caption paper)
def test_older_data_jsonl_layout_and_the_papers_per_task_mode_accuracy(tmp_path):
    import json as _json

    from hallupatch.eval import cli

    tasks = ["object_recognition", "counting"]
    rows = []
    for i in range(16):
        rows.append({"image_path": f"imgs/{i % 4}.jpg", "question": f"is there object {i} ?",
                     "answer": "yes" if i % 3 else "no", "task": tasks[i % 2],
                     "mode": ("neutral" if i < 8 else "misleading") + f"_v{i % 2}"})
    (tmp_path / "data.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in rows))
    texts = ["Yes", "No.", "no, not at all", "yes, there is"]
    answers = [{"question_id": f"{r['mode'].split('_')[0]}/{i}/{r['answer']}", "text": texts[i % 4]}
               for i, r in enumerate(rows)]
    (tmp_path / "answers.jsonl").write_text("".join(_json.dumps(a) + "\n" for a in answers))
    scores = cli.run(["phd", "--answers", str(tmp_path / "answers.jsonl"), "--data", str(tmp_path),
                      "--output", str(tmp_path / "out")])                       # no images needed
    # phd_eval_metric.py: track = task + "_" + mode up to "_", accuracy = right / (right + wrong)
    tracks = {}
    for row, answer in zip(rows, answers):
        text = answer["text"].split(".")[0] if "." in answer["text"] else answer["text"]
        words = text.replace(",", "").split(" ")
        pred = "no" if ("No" in words or "not" in words or "no" in words) else "yes"
        track = row["task"] + "_" + row["mode"].split("_")[0]
        right, total = tracks.get(track, (0, 0))
        tracks[track] = (right + (pred == row["answer"]), total + 1)
    for track, (right, total) in tracks.items():
        task, mode = track.rsplit("_", 1)
        assert scores["groups"][f"{mode}/{task}"]["accuracy"] == pytest.approx(right / total)
    assert list(scores["modes"]) == ["neutral", "misleading"] and scores["answered"] == 16
    misleading = [a for a in answers if a["question_id"].startswith("misleading/")]
    (tmp_path / "misleading.jsonl").write_text("".join(_json.dumps(a) + "\n" for a in misleading))
    only = cli.run(["phd", "--answers", str(tmp_path / "misleading.jsonl"), "--data", str(tmp_path / "data.jsonl"),
                    "--modes", "misleading", "--output", str(tmp_path / "m")])
    assert list(only["modes"]) == ["misleading"] and only["answered"] == only["questions"] == 8
    with pytest.raises(ValueError, match="belong to the older data.jsonl layout"):
        from hallupatch.eval.tasks.phd import load_phd_questions

        (tmp_path / "data.json").write_text("[]")
        load_phd_questions(tmp_path, ["neutral"])
