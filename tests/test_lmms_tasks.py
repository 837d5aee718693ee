"""``python -m hallupatch.lmms tasks DIR``: the lab's MME and POPE as local lmms-eval task files and
``datasets`` folders (no lmms-eval needed to write them; running them is tests/test_lmms_eval.py)."""
from __future__ import annotations

from pathlib import Path

import datasets
import pytest

from hallupatch.eval.tasks.mme import load_mme, load_mme_folder
from hallupatch.eval.tasks.pope import load_pope
from hallupatch.lmms.__main__ import main
from hallupatch.lmms.tasks import POPE_SPLITS, write_lab_tasks


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return write_lab_tasks(tmp_path_factory.mktemp("lmms") / "tasks", mme_images=3, pope_questions=4)


def test_task_files_name_the_written_data(tasks):
    names = sorted(p.name for p in tasks.glob("*.yaml"))
    assert names == sorted(["hallupatch_lab_mme.yaml", "hallupatch_lab_mme_choice.yaml", "hallupatch_lab_pope.yaml"]
                           + [f"hallupatch_lab_pope_{s}.yaml" for s in POPE_SPLITS])
    for path in tasks.glob("*.yaml"):
        text = path.read_text()
        assert "@" not in text, path.name          # every template field filled in
        if "dataset_path" in text:
            data = text.split('dataset_path: "', 1)[1].split('"', 1)[0]
            assert Path(data).is_absolute() and Path(data).is_dir(), path.name
    assert 'test_split: "adversarial"' in (tasks / "hallupatch_lab_pope_adversarial.yaml").read_text()
    assert (tasks / "utils.py").read_text().count("from lmms_eval.tasks.") == 2  # lmms-eval's own scorers


def test_mme_dataset_has_lmms_lab_columns_and_the_folders_questions(tasks):
    mme = datasets.load_from_disk(str(tasks / "data" / "mme"))["test"]
    assert mme.column_names == ["question_id", "image", "question", "answer", "category"]
    folder = load_mme_folder(tasks / "data" / "mme_folder")
    assert [(r["question_id"], r["question"], r["answer"], r["category"]) for r in mme] == \
        [(q.image_id, q.question, q.answer, q.group) for q in folder]
    assert len(mme) == 6 and mme[0]["image"].size == folder[0].load_image().size
    # hallupatch.eval reads the same dataset folder: the questions of both runs are the same
    assert [(q.image_id, q.question, q.answer) for q in load_mme(tasks / "data" / "mme")] == \
        [(q.image_id, q.question, q.answer) for q in folder]


def test_pope_dataset_has_one_split_per_setting(tasks):
    pope = datasets.load_from_disk(str(tasks / "data" / "pope"))
    assert list(pope) == list(POPE_SPLITS)
    files = load_pope(tasks / "data" / "pope_files")
    for split in POPE_SPLITS:
        rows = pope[split]
        assert rows.column_names == ["id", "question_id", "question", "answer", "image_source", "image", "category"]
        assert [(r["question_id"], r["question"], r["answer"]) for r in rows] == \
            [(q.qid, q.question, q.answer) for q in files if q.group == split]
        assert set(rows["category"]) == {split} and len(rows) == 4


def test_command_line_refuses_bad_sizes(tmp_path, capsys):
    assert main(["tasks", str(tmp_path / "t"), "--mme-images", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "mme_images" in err and "Traceback" not in err
