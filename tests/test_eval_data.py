"""Benchmark data loading: the official layouts, the `datasets` layout, and every error message."""
import json

import pytest
from PIL import Image

from hallupatch.eval.harness import check_unique
from hallupatch.testing.mme_sample import IMAGES_PER_SUBTASK, QUESTIONS, write_mme_sample
from hallupatch.eval.data import DataError
from hallupatch.eval.tasks.mme import load_mme, load_mme_dataset, load_mme_folder
from hallupatch.eval.tasks.pope import load_pope


def _img(path, color=(10, 20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), color).save(path)


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_mme_folder_both_layouts_in_official_order(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    # flat layout (as released for e.g. code_reasoning)
    _img(root / "code_reasoning" / "0001.png")
    _write(root / "code_reasoning" / "0001.txt", "Is this python? Please answer yes or no.\tYes\nIs this C? Please answer yes or no.\tNo\n")
    # nested layout (as released for artwork, celebrity, landmark, posters, scene)
    _img(root / "artwork" / "images" / "10002.jpg")
    _write(root / "artwork" / "questions_answers_YN" / "10002.txt", "Q1? Please answer yes or no.\tNo\r\nQ2?\tYes\r\n\n")
    (root / "eval_tool").mkdir()  # not a subtask
    qs = load_mme(tmp_path)  # the parent of the release folder works too
    assert [q.qid for q in qs] == [
        "artwork/10002.jpg#0", "artwork/10002.jpg#1", "code_reasoning/0001.png#0", "code_reasoning/0001.png#1",
    ]
    assert [q.answer for q in qs] == ["No", "Yes", "Yes", "No"]
    assert qs[0].image_id == "artwork/10002.jpg" and qs[0].image_name == "10002.jpg"
    assert qs[1].question == "Q2?"
    assert qs[2].source.endswith("0001.txt:1")
    assert qs[0].load_image().size == (8, 6)


def test_bundled_sample_is_deterministic_and_loads(tmp_path):
    a, b = write_mme_sample(tmp_path / "a"), write_mme_sample(tmp_path / "b")
    qa, qb = load_mme_folder(a), load_mme_folder(b)
    assert len(qa) == len(QUESTIONS) * IMAGES_PER_SUBTASK * 2
    assert {q.group for q in qa} >= {"existence", "scene", "commonsense_reasoning"}
    assert (a / "scene" / "images").is_dir() and (a / "scene" / "questions_answers_YN").is_dir()
    for x, y in zip(qa, qb):
        assert (x.qid, x.question, x.answer) == (y.qid, y.question, y.answer)
        assert open(x.image, "rb").read() == open(y.image, "rb").read()
    # one Yes and one No per image, as MME pairs them
    per_image = {}
    for q in qa:
        per_image.setdefault(q.image_id, []).append(q.answer)
    assert all(sorted(v) == ["No", "Yes"] for v in per_image.values())


def test_mme_folder_errors_name_path_and_line(tmp_path):
    with pytest.raises(DataError, match="MME data folder not found: .*nowhere"):
        load_mme_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no MME subtask folders in .*empty"):
        load_mme_folder(tmp_path / "empty")

    root = tmp_path / "missing_image"
    _write(root / "count" / "0007.txt", "Q?\tYes\n")
    with pytest.raises(DataError, match=r"count[/\\]0007\.txt: image not found: no 0007\.<jpg"):
        load_mme_folder(root)

    root = tmp_path / "bad_line"
    _img(root / "count" / "1.jpg")
    _write(root / "count" / "1.txt", "Q?\tYes\nno tab here\n")
    with pytest.raises(DataError, match=r"count[/\\]1\.txt:2: expected 'question<TAB>Yes\|No'"):
        load_mme_folder(root)

    root = tmp_path / "bad_answer"
    _img(root / "count" / "1.jpg")
    _write(root / "count" / "1.txt", "Q?\tMaybe\n")
    with pytest.raises(DataError, match=r"1\.txt:1: the answer must be Yes or No, got 'Maybe'"):
        load_mme_folder(root)

    root = tmp_path / "no_images_dir"
    _write(root / "scene" / "questions_answers_YN" / "1.txt", "Q?\tYes\n")
    with pytest.raises(DataError, match="has questions_answers_YN/ but no images/ folder"):
        load_mme_folder(root)


def _mme_dataset(rows):
    import datasets

    features = datasets.Features({
        "question_id": datasets.Value("string"), "image": datasets.Image(), "question": datasets.Value("string"),
        "answer": datasets.Value("string"), "category": datasets.Value("string"),
    })
    return datasets.Dataset.from_list(rows, features=features)


def _row(qid, question, answer, category, color=(1, 2, 3)):
    return {"question_id": qid, "image": Image.new("RGB", (5, 4), color), "question": question, "answer": answer,
            "category": category}


def test_mme_dataset_save_to_disk_and_parquet(tmp_path):
    rows = [
        _row("code_reasoning/0020.png", "Is it python? Please answer yes or no.", "Yes", "code_reasoning"),
        _row("code_reasoning/0020.png", "Is it C? Please answer yes or no.", "No", "code_reasoning"),
        _row("existence/000000006040.jpg", "Is there a train? Please answer yes or no.", "Yes", "existence", (9, 9, 9)),
        _row("existence/000000006040.jpg", "Is there a bed? Please answer yes or no.", "No", "existence", (9, 9, 9)),
    ]
    ds = _mme_dataset(rows)
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "pq" / "test-00000-of-00001.parquet"))
    for path in (tmp_path / "saved", tmp_path / "pq"):
        qs = load_mme(path)
        assert [q.qid for q in qs] == [
            "existence/000000006040.jpg#0", "existence/000000006040.jpg#1",
            "code_reasoning/0020.png#0", "code_reasoning/0020.png#1",
        ]  # official subtask order, dataset order within
        assert qs[0].image_name == "000000006040.jpg" and qs[0].group == "existence"
        assert qs[0].load_image().getpixel((0, 0)) == (9, 9, 9)
        assert qs[3].answer == "No"


def test_mme_dataset_errors(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"question_id": "a/1.png", "question": "Q?"}]).save_to_disk(str(tmp_path / "cols"))
    with pytest.raises(DataError, match=r"lacks column\(s\) \['image', 'answer', 'category'\]"):
        load_mme_dataset(tmp_path / "cols")
    rows = [_row("count/1.png", "Q?", "Yes", "count"), _row("count/1.png", "Q?", "No", "count")]
    rows[1]["image"] = None
    _mme_dataset(rows).save_to_disk(str(tmp_path / "noimage"))
    with pytest.raises(DataError, match=r"noimage row 1: no image"):
        load_mme_dataset(tmp_path / "noimage")
    rows = [_row("count/1.png", "Q?", "perhaps", "count")]
    _mme_dataset(rows).save_to_disk(str(tmp_path / "badanswer"))
    with pytest.raises(DataError, match=r"badanswer row 0: the answer must be Yes or No"):
        load_mme_dataset(tmp_path / "badanswer")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match=r"nothing: not a saved dataset .* no \.parquet or \.arrow files"):
        load_mme_dataset(tmp_path / "nothing")
    with pytest.raises(DataError, match="MME data not found: .*not/here/x"):
        load_mme(str(tmp_path / "not/here/x"))


def _pope(tmp_path, lines_by_split, images=("COCO_val2014_000000000001.jpg",)):
    for name in images:
        _img(tmp_path / "val2014" / name)
    for split, lines in lines_by_split.items():
        _write(tmp_path / f"coco_pope_{split}.json", "".join(line + "\n" for line in lines))
    return tmp_path


def _q(qid, label="yes", image="COCO_val2014_000000000001.jpg"):
    return json.dumps({"question_id": qid, "image": image, "text": f"Is there a dog {qid}?", "label": label})


def test_pope_load_splits(tmp_path):
    root = _pope(tmp_path, {"adversarial": [_q(1), _q(2, "no")], "random": [_q(1, "no")]})
    qs = load_pope(root)  # images found in DATA/val2014
    assert [q.qid for q in qs] == ["random/1", "adversarial/1", "adversarial/2"]  # official split order
    assert [q.answer for q in qs] == ["no", "yes", "no"]
    assert qs[1].question == "Is there a dog 1?" and qs[1].image_id == "COCO_val2014_000000000001.jpg"
    assert [q.qid for q in load_pope(root, splits=["adversarial"])] == ["adversarial/1", "adversarial/2"]
    assert [q.qid for q in load_pope(root / "coco_pope_random.json", root / "val2014")] == ["random/1"]


def test_pope_errors_name_path_and_line(tmp_path):
    root = _pope(tmp_path / "json", {"random": [_q(1), "{not json"]})
    with pytest.raises(DataError, match=r"coco_pope_random\.json:2: not valid JSON"):
        load_pope(root)
    root = _pope(tmp_path / "keys", {"random": [_q(1), _q(2), json.dumps({"question_id": 3, "text": "Q"})]})
    with pytest.raises(DataError, match=r"coco_pope_random\.json:3: a POPE question needs keys"):
        load_pope(root)
    root = _pope(tmp_path / "img", {"random": [_q(1, image="COCO_missing.jpg")]})
    with pytest.raises(DataError, match=r"coco_pope_random\.json:1: image not found: .*COCO_missing\.jpg"):
        load_pope(root)
    root = _pope(tmp_path / "label", {"random": [_q(1, label="unsure")]})
    with pytest.raises(DataError, match=r"coco_pope_random\.json:1: the answer must be Yes or No"):
        load_pope(root)
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="no POPE question files in"):
        load_pope(tmp_path / "none")
    root = _pope(tmp_path / "noimg", {"random": [_q(1)]}, images=())
    with pytest.raises(DataError, match="pass --image-folder"):
        load_pope(root)
    with pytest.raises(DataError, match="POPE image folder not found: .*elsewhere"):
        load_pope(root, tmp_path / "elsewhere")
    root = _pope(tmp_path / "split", {"random": [_q(1)]})
    with pytest.raises(DataError, match=r"POPE split\(s\) \['popular'\] not found"):
        load_pope(root, splits=["popular"])
    root = _pope(tmp_path / "dup", {"random": [_q(1), _q(1)]})
    with pytest.raises(DataError, match=r"coco_pope_random\.json:2: question id 'random/1' repeats .*:1"):
        check_unique(load_pope(root))


def test_more_dataset_and_pope_errors(tmp_path):
    import datasets

    good = _mme_dataset([_row("count/1.png", "Q?", "Yes", "count")])
    datasets.DatasetDict({"dev": good, "val": good}).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(DataError, match=r"dataset has splits \['dev', 'val'\]; expected a 'test' split"):
        load_mme_dataset(tmp_path / "splits")
    datasets.DatasetDict({"test": good, "val": good}).save_to_disk(str(tmp_path / "withtest"))
    assert [q.qid for q in load_mme_dataset(tmp_path / "withtest")] == ["count/1.png#0"]
    root = _pope(tmp_path / "twice", {"random": [_q(1)]})
    _write(root / "random.jsonl", _q(2) + "\n")
    with pytest.raises(DataError, match="two question files for POPE split 'random'"):
        load_pope(root)
    with pytest.raises(DataError, match="POPE data not found"):
        load_pope(tmp_path / "absent")


def test_pope_answers_whose_prompt_belongs_to_another_split_are_refused(tmp_path):
    from hallupatch.eval.data import Question
    from hallupatch.eval.data import match_llava_answers as load_external_answers

    questions = [Question(qid="random/1", group="random", image_id="x.jpg", image_name="x.jpg",
                          question="Is there a cat in the image?", answer="yes", image="x.jpg", source="t")]
    right = tmp_path / "right.jsonl"
    right.write_text(json.dumps({"question_id": 1, "prompt": "Is there a cat in the image?", "text": "Yes"}) + "\n")
    assert load_external_answers(right, questions) == {"random/1": "Yes"}
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text("\n" + json.dumps({"question_id": 1, "prompt": "Is there a dog in the image?", "text": "No"}) + "\n")
    with pytest.raises(DataError, match=r"wrong.jsonl:2: question '1' asks .*dog.* split 'random' asks .*cat"):
        load_external_answers(wrong, questions)


def test_region_records_errors_name_the_file_and_line(tmp_path):
    from hallupatch.eval.regcap import load_region_samples

    good = {"id": "r1", "image": "a.jpg", "bbox": [1, 2, 3, 4], "references": ["a dog"]}
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        load_region_samples(bad_json)
    bad_box = tmp_path / "box.jsonl"
    bad_box.write_text(json.dumps({**good, "bbox": [1, 2, "x", 4]}) + "\n")
    with pytest.raises(DataError, match=r"box.jsonl:1: bbox must be \[x, y, w, h\]"):
        load_region_samples(bad_box)
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([good, {**good, "id": "r2", "references": []}]))
    with pytest.raises(DataError, match=r"list.json: record 1: the region record lacks references"):
        load_region_samples(listed)
