"""Caption benchmarks as harness tasks: data layouts, seeded image samples, --answers formats, clear errors."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from caption_data import CHAIR_IMAGES, REGIONS, write_chair_data, write_phd_data, write_regcap_data  # noqa: E402

from hallupatch.eval.data import DataError, read_id_text_answers  # noqa: E402
from hallupatch.eval.tasks.chair import CHAIR_PROMPT, chair_table, load_chair, read_chair_answers, score_chair_pairs  # noqa: E402
from hallupatch.eval.tasks.phd import load_phd_questions, phd_table, score_phd_answers  # noqa: E402
from hallupatch.eval.tasks.regcap import load_regcap, regcap_table  # noqa: E402


def test_chair_data_sample_and_scoring(tmp_path):
    root = write_chair_data(tmp_path / "coco")
    data = load_chair(root, num_images=3, seed=1)
    assert len(data.questions) == 3 and set(data.image_ids) <= set(CHAIR_IMAGES)
    assert data.image_ids == load_chair(root, num_images=3, seed=1).image_ids  # seeded
    q = data.questions[0]
    assert q.question == CHAIR_PROMPT and Path(q.image).is_file() and q.qid == str(data.image_ids[0])
    everything = load_chair(root, num_images=None)
    assert everything.image_ids == sorted(CHAIR_IMAGES)
    assert everything.ground_truth[15] == {"person", "bus"}

    answers = tmp_path / "captions.jsonl"
    answers.write_text("\n".join(json.dumps(r) for r in [
        {"image_id": 11, "caption": "A man and his dog on a bench."},  # bench hallucinated
        {"image_id": 14, "caption": "A road."},
    ]))
    scores, details = score_chair_pairs(read_chair_answers(answers), everything.ground_truth)
    assert scores["CHAIRs"] == pytest.approx(1 / 2)
    assert scores["CHAIRi"] == pytest.approx(1 / 3)
    assert scores["Recall"] == pytest.approx(2 / 2)  # image 11: person, dog of 2; image 14: none
    assert details[0]["hallucinated"] == [["bench", "bench"]]
    table = chair_table(scores)
    assert "CHAIRs" in table and "50.0" in table


def test_chair_errors(tmp_path):
    root = write_chair_data(tmp_path / "coco")
    (root / "val2014" / "COCO_val2014_000000000013.jpg").unlink()
    with pytest.raises(DataError, match="COCO_val2014_000000000013.jpg"):
        load_chair(root, num_images=None)
    load_chair(root, num_images=None, need_images=False)  # scoring outside answers needs no image
    with pytest.raises(DataError, match=r"\[99\]"):
        load_chair(root, image_ids=[11, 99])
    with pytest.raises(FileNotFoundError, match="captions_"):
        (root / "annotations" / "captions_val2014.json").unlink()
        load_chair(root, num_images=None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": 1, "caption": "x"}) + "\n")
    with pytest.raises(DataError, match="image_id"):
        read_chair_answers(bad)


def test_regcap_questions_and_answers(tmp_path):
    path = write_regcap_data(tmp_path / "refcocog")
    data = load_regcap(path, "llava-hf")
    assert [q.qid for q in data.questions] == ["r1", "r2", "r3"]
    # 64x48 image padded to 64x64 (8 px down): r1 box (4,4)-(24,24) -> [4/64, 12/64, 24/64, 32/64]
    assert data.questions[0].question.endswith("[0.06, 0.19, 0.38, 0.50]")
    assert "<box>" in load_regcap(path, "qwen-vl").questions[0].question
    answers = tmp_path / "answers.jsonl"
    answers.write_text("\n".join(json.dumps({"question_id": r["id"], "text": t}) for r, t in
                                 zip(REGIONS, ["a man in a shirt", "a dog and a cat", "a bus"])))
    preds = read_id_text_answers(answers)
    assert preds == {"r1": "a man in a shirt", "r2": "a dog and a cat", "r3": "a bus"}
    (tmp_path / "refcocog" / "images" / "b.jpg").unlink()
    with pytest.raises(DataError, match="b.jpg"):
        load_regcap(path, "llava-hf")
    assert len(load_regcap(path, None, need_images=False).samples) == 3
    with pytest.raises(DataError, match="not found"):
        load_regcap(tmp_path / "nothing", "llava-hf")


def test_regcap_table():
    table = regcap_table({"BLEU-4": 0.1, "METEOR": 0.2, "ROUGE-L": 0.3, "CIDEr": 1.5, "CHAIRs": 0.5,
                          "CHAIRi": None, "num_samples": 3})
    assert "150.0" in table and "n/a" in table


def test_phd_questions_and_scores(tmp_path):
    root = write_phd_data(tmp_path / "phd")
    questions, meta = load_phd_questions(root)
    assert len(questions) == 14
    by = {q.qid: q for q in questions}
    assert by["base/1/yes"].image.endswith("val2014/COCO_val2014_000000000022.jpg")  # train2014 missing -> val2014
    assert by["icc/0/no"].question.startswith("There is a cat in the picture. In case there is an inconsistency")
    assert meta["ccs/2/no"] == ("ccs", "object")
    answers = {q.qid: ("Yes" if q.answer == "yes" else "No") for q in questions}
    answers["iac/0/no"] = "Yes"
    scores = score_phd_answers(questions, meta, answers)
    assert scores["overall"]["yes_recall"] == 1 and scores["overall"]["no_recall"] == pytest.approx(6 / 7)
    assert scores["groups"]["iac/object"]["phd_index"] == pytest.approx(2 * 1 * 0 / 1)
    assert "overall" in phd_table(scores)
    with pytest.raises(DataError, match="has an answer"):
        score_phd_answers(questions, meta, {})
    partial = score_phd_answers(questions, meta, {"base/0/yes": "Yes", "base/0/no": "No"})
    assert (partial["answered"], partial["questions"]) == (2, 14) and partial["overall"]["phd_index"] == 1
    assert "(scored 2 of 14)" in phd_table(partial)
    (root / "images" / "CCS_images" / "0.png").unlink()
    with pytest.raises(FileNotFoundError, match="0.png"):
        load_phd_questions(root)


def test_chair_samples_val_images_but_takes_ground_truth_from_every_split(tmp_path):
    import json as _json

    from hallupatch.eval.tasks.chair import load_chair

    ann = tmp_path / "annotations"
    ann.mkdir()
    cats = [{"id": 18, "name": "dog"}, {"id": 17, "name": "cat"}]
    for split, ids in (("train2014", [1, 2, 3]), ("val2014", [10, 11])):
        images = [{"id": i, "file_name": f"COCO_{split}_{i:012d}.jpg"} for i in ids]
        anns = [{"image_id": i, "category_id": 18} for i in ids]
        (ann / f"instances_{split}.json").write_text(_json.dumps({"images": images, "annotations": anns, "categories": cats}))
        caps = [{"image_id": i, "caption": "a cat on the grass"} for i in ids]
        (ann / f"captions_{split}.json").write_text(_json.dumps({"images": images, "annotations": caps}))
    data = load_chair(tmp_path, num_images=None, need_images=False)
    assert data.image_ids == [10, 11], "the sample is drawn from the val images, as OPERA's chair_eval.py does"
    assert all(q.image.endswith(f"val2014/COCO_val2014_{int(q.qid):012d}.jpg") for q in data.questions)
    assert data.ground_truth[10] == {"dog", "cat"}  # instances + reference captions
    assert load_chair(tmp_path, image_ids=[2], need_images=False).image_ids == [2]  # a saved sample is kept
