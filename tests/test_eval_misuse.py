"""The eval command line under misuse (issue 11): placement flags are honoured or refused, a bad --output
or unreadable input JSON is one ``error:`` line and exit status 2, never a traceback."""
import json
import os
from pathlib import Path

import pytest
import torch

from hallupatch.eval import cli
from hallupatch.eval.data import DataError, json_lines, read_json

QUICK = ["--limit", "2", "--max-new-tokens", "2", "--no-progress"]


def one_error_line(capsys, *needles):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def test_builtin_model_honours_dtype_and_device(tmp_path, mme_folder):
    scores = cli.run(["mme", "--data", str(mme_folder), "--output", str(tmp_path / "half"), "--dtype", "float16",
                      "--device", "cpu", *QUICK])
    assert scores["questions"] == 2
    assert json.loads((tmp_path / "half" / "run.json").read_text())["dtype"] == "float16"
    cli.run(["mme", "--data", str(mme_folder), "--output", str(tmp_path / "plain"), *QUICK])
    assert json.loads((tmp_path / "plain" / "run.json").read_text())["dtype"] == "float32"


@pytest.mark.parametrize("device, message", [
    ("tpu", "--device 'tpu' is not a torch device: use cpu, cuda or cuda:N"),
    ("xla-ish", "is not a torch device"),
    ("meta", "--device meta cannot be used on this machine"),
])
def test_unknown_or_unusable_device_is_one_error_line(tmp_path, capsys, device, message):
    assert cli.main(["mme", "--device", device, "--output", str(tmp_path / "out"), *QUICK]) == 2
    one_error_line(capsys, message)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_one_error_line(tmp_path, capsys, device):
    assert cli.main(["mme", "--device", device, "--output", str(tmp_path / "out"), *QUICK]) == 2
    one_error_line(capsys, f"--device {device} needs a CUDA GPU", "--device cpu")


def test_output_that_is_a_file_or_under_a_file_is_one_error_line(tmp_path, capsys):
    a_file = tmp_path / "results.txt"
    a_file.write_text("not a folder\n")
    assert cli.main(["mme", "--output", str(a_file), *QUICK]) == 2
    one_error_line(capsys, f"--output {a_file} is a file, not a folder")
    assert cli.main(["mme", "--output", str(a_file / "deeper" / "run"), *QUICK]) == 2
    one_error_line(capsys, f"lies under the file {a_file}")
    assert a_file.read_text() == "not a folder\n"


def test_read_only_output_is_one_error_line(tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # a read-only folder as a non-root user sees it (root may write anywhere, so the check is simulated)
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    assert cli.main(["mme", "--output", str(locked / "run"), *QUICK]) == 2
    one_error_line(capsys, f"{locked} is not writable")
    assert list(locked.iterdir()) == []


def test_write_failure_during_a_run_is_one_error_line(tmp_path, capsys, monkeypatch):
    from hallupatch.eval import store

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "out" / "run.tmp"))

    monkeypatch.setattr(store, "prepare_output", refuse)
    monkeypatch.setattr("hallupatch.eval.harness.prepare_output", refuse)
    assert cli.main(["mme", "--output", str(tmp_path / "out"), *QUICK]) == 2
    one_error_line(capsys, "run.tmp: Permission denied")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="file modes do not stop root")
def test_read_only_output_by_file_mode(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert cli.main(["mme", "--output", str(locked / "run"), *QUICK]) == 2
        one_error_line(capsys, "is not writable")
    finally:
        locked.chmod(0o755)


# -- input JSON that cannot be read ---------------------------------------------------------------------
def test_non_utf8_and_deeply_nested_json_are_data_errors(tmp_path):
    latin = tmp_path / "latin1.json"
    latin.write_bytes('{"caption": "caf\u00e9"}'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.json: not UTF-8 text \(byte 16"):
        read_json(latin)
    lines = tmp_path / "answers.jsonl"
    lines.write_bytes(b'{"question_id": "a", "text": "yes"}\n{"question_id": "b", "text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"answers.jsonl:2: not UTF-8 text"):
        list(json_lines(lines))
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(DataError, match="nested.json: JSON nested too deeply"):
        read_json(nested)
    deep_line = tmp_path / "deep.jsonl"
    deep_line.write_text('{"a": ' + "[" * 200_000 + "]" * 200_000 + "}\n")
    with pytest.raises(DataError, match=r"deep.jsonl:1: JSON nested too deeply"):
        list(json_lines(deep_line))


@pytest.mark.parametrize("content", [b'[{"question_id": "x", "text": "n\xf6"}]', ("[" * 200_000 + "]" * 200_000).encode()],
                         ids=["latin-1", "nested"])
def test_unreadable_answers_file_on_the_command_line_is_one_error_line(tmp_path, capsys, mme_folder, content):
    answers = tmp_path / "answers.json"
    answers.write_bytes(content)
    assert cli.main(["mme", "--answers", str(answers), "--data", str(mme_folder), "--output", str(tmp_path / "o")]) == 2
    one_error_line(capsys, str(answers))


def test_load_backend_refuses_an_unusable_device_before_loading(tmp_path):
    from hallupatch.eval import models

    with pytest.raises(ValueError, match="--device 'tpu' is not a torch device"):
        models.load_backend(str(tmp_path / "no-checkpoint"), recipe="llava-hf", device="tpu")
