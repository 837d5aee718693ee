"""The resumable answer store: partial lines, damaged lines, settings checks, merging shards."""
import json

import pytest

from hallupatch.eval.store import (
    AnswerWriter,
    StoreError,
    answers_path,
    finished_ids,
    merge_answers,
    prepare_output,
    read_answers,
)


def _rec(qid, text="yes"):
    return {"question_id": qid, "text": text}


def test_writer_appends_lines_and_reader_reads_them(tmp_path):
    path = tmp_path / "answers.jsonl"
    with AnswerWriter(path) as w:
        w.write([_rec("a"), _rec("b", "no")])
    with AnswerWriter(path) as w:
        w.write([_rec("c")])
    assert [r["question_id"] for r in read_answers(path)] == ["a", "b", "c"]
    assert path.read_text().count("\n") == 3


def test_partial_last_line_is_dropped_and_repaired(tmp_path):
    path = tmp_path / "answers.jsonl"
    full = json.dumps(_rec("a")) + "\n" + json.dumps(_rec("b")) + "\n"
    for partial in ('{"question_id": "c", "te', json.dumps(_rec("c"))):  # cut mid-line / before its line break
        path.write_text(full + partial)
        assert [r["question_id"] for r in read_answers(path)] == ["a", "b"]
        assert path.read_text().endswith(partial)  # reading alone changes nothing
        with pytest.warns(UserWarning, match="dropped an incomplete last line"):
            assert finished_ids(tmp_path, own_file=path) == {"a", "b"}
        assert path.read_text() == full
    # appending after a cut line starts on a fresh line
    path.write_text(full + '{"quest')
    with pytest.warns(UserWarning):
        with AnswerWriter(path) as w:
            w.write([_rec("c")])
    assert [r["question_id"] for r in read_answers(path)] == ["a", "b", "c"]


def test_damaged_line_in_the_middle_is_an_error_naming_path_and_line(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text(json.dumps(_rec("a")) + "\n" + "garbage\n" + json.dumps(_rec("b")) + "\n")
    with pytest.raises(StoreError, match=r"answers\.jsonl:2: not a valid answer line"):
        read_answers(path)
    path.write_text(json.dumps({"text": "no id"}) + "\n")
    with pytest.raises(StoreError, match=r"answers\.jsonl:1: not a valid answer line"):
        read_answers(path)


def test_settings_are_stored_and_a_different_resume_is_refused(tmp_path):
    out = tmp_path / "run"
    settings = {"method": "none", "knobs": {}, "max_new_tokens": 128}
    prepare_output(out, settings)
    assert json.loads((out / "run.json").read_text()) == settings
    prepare_output(out, dict(settings))  # same settings: resume
    (out / "answers.jsonl").write_text(json.dumps(_rec("a")) + "\n")  # answers to protect
    with pytest.raises(StoreError) as err:
        prepare_output(out, {"method": "memvr", "knobs": {"retracing_ratio": 0.2}, "max_new_tokens": 128})
    message = str(err.value)
    assert "different settings" in message and "--overwrite" in message and "another --output" in message
    assert "method: 'none' (stored) vs 'memvr' (now)" in message
    assert "knobs: {} (stored) vs {'retracing_ratio': 0.2} (now)" in message
    prepare_output(out, {"method": "memvr"}, overwrite=True)
    assert not (out / "answers.jsonl").exists()
    assert json.loads((out / "run.json").read_text()) == {"method": "memvr"}


def test_answers_without_settings_are_refused(tmp_path):
    (tmp_path / "answers.jsonl").write_text(json.dumps(_rec("a")) + "\n")
    with pytest.raises(StoreError, match="holds answers but no run.json"):
        prepare_output(tmp_path, {"method": "none"})
    (tmp_path / "run.json").write_text("{broken")
    with pytest.raises(StoreError, match=r"run\.json is not valid JSON"):
        prepare_output(tmp_path, {"method": "none"})


def test_merge_orders_dedupes_and_removes_rank_files(tmp_path):
    with AnswerWriter(answers_path(tmp_path, 0, 2)) as w:
        w.write([_rec("q0"), _rec("q2")])
    with AnswerWriter(answers_path(tmp_path, 1, 2)) as w:
        w.write([_rec("q3"), _rec("q1"), _rec("q2", "duplicate")])
    assert answers_path(tmp_path, 1, 2).name == "answers.rank1.jsonl"
    merged = merge_answers(tmp_path, ["q0", "q1", "q2", "q3"])
    assert list(merged) == ["q0", "q1", "q2", "q3"]
    assert merged["q2"]["text"] == "yes"  # the first record of an id wins
    assert [p.name for p in tmp_path.iterdir()] == ["answers.jsonl"]
    assert [r["question_id"] for r in read_answers(tmp_path / "answers.jsonl")] == ["q0", "q1", "q2", "q3"]
