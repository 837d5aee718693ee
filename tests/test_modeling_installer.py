"""``python -m hallupatch.modeling install|restore`` on tiny Qwen-VL-Chat / GLM-4V checkpoint folders."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tiny_remote
from hallupatch import modeling
from hallupatch.engine import get_patch

from remote_code_fixtures import load

REPO = Path(__file__).resolve().parent.parent
ORIGINAL_MARKER = "\n# the checkpoint's own file (test stand-in)\nORIGINAL_FILE = True\n"


def checkpoint_with_original(tmp_path, family):
    """A tiny checkpoint whose modeling file plays the checkpoint's original (ours plus a marker)."""
    path = tiny_remote.build_tiny_checkpoint(tmp_path / f"{family}_ckpt", family)
    target = path / tiny_remote.MODELING_FILES[family]
    target.write_text(target.read_text(encoding="utf-8") + ORIGINAL_MARKER, encoding="utf-8")
    return path, target


@pytest.mark.parametrize("family", ["qwen", "chatglm"])
def test_install_load_restore(tmp_path, family):
    path, target = checkpoint_with_original(tmp_path, family)
    original_text = target.read_text(encoding="utf-8")
    original_config = (path / "config.json").read_text(encoding="utf-8")

    code = modeling.main(["install", str(path), "--memvr-ratio", "0.2", "--memvr-threshold", "0.6",
                          "--memvr-start", "0", "--memvr-end", "3"])
    assert code == 0
    assert target.read_text(encoding="utf-8") == modeling.dropin_source(family).read_text(encoding="utf-8")
    assert (path / (target.name + ".orig")).read_text(encoding="utf-8") == original_text
    block = json.loads((path / "config.json").read_text(encoding="utf-8"))["hallupatch"]
    assert block == {"method": "memvr", "retracing_ratio": 0.2, "entropy_threshold": 0.6,
                     "starting_layer": 0, "ending_layer": 3}
    model = load(path)
    assert not hasattr(sys.modules[type(model).__module__], "ORIGINAL_FILE")
    config = get_patch(model).configs["memvr"]
    assert (config.retracing_ratio, config.entropy_threshold, config.starting_layer, config.ending_layer) == (0.2, 0.6, 0, 3)

    modeling.install(path, modeling.memvr_block(ratio=0.1, start=0, end=3))   # reinstall: backup kept
    assert (path / (target.name + ".orig")).read_text(encoding="utf-8") == original_text

    assert modeling.main(["restore", str(path)]) == 0
    assert target.read_text(encoding="utf-8") == original_text
    assert (path / "config.json").read_text(encoding="utf-8") == original_config
    assert not (path / (target.name + ".orig")).exists()
    model = load(path)
    assert getattr(sys.modules[type(model).__module__], "ORIGINAL_FILE") is True and get_patch(model) is None


def test_module_entry_point(tmp_path):
    path, _ = checkpoint_with_original(tmp_path, "qwen")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-m", "hallupatch.modeling", "install", str(path)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "installed" in run.stdout
    assert json.loads((path / "config.json").read_text())["hallupatch"] == {"method": "memvr"}   # family defaults


def test_refusals(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert modeling.main(["install", str(empty)]) == 2
    assert f"{empty / 'config.json'} does not exist" in capsys.readouterr().err

    llava = tmp_path / "llava"
    llava.mkdir()
    (llava / "config.json").write_text(json.dumps({"model_type": "llava"}))
    assert modeling.main(["install", str(llava)]) == 2
    err = capsys.readouterr().err
    assert "model_type 'llava'" in err and "'qwen'" in err and "'chatglm'" in err
    assert not (llava / "modeling_qwen.py").exists()

    no_code = tmp_path / "no_code"
    no_code.mkdir()
    (no_code / "config.json").write_text(json.dumps({"model_type": "chatglm"}))
    assert modeling.main(["install", str(no_code)]) == 2
    assert "modeling_chatglm.py does not exist" in capsys.readouterr().err

    path, _ = checkpoint_with_original(tmp_path, "chatglm")
    assert modeling.main(["install", str(path), "--memvr-ratio", "1.5"]) == 2
    assert "[0, 1]" in capsys.readouterr().err
    assert modeling.main(["install", str(path), "--memvr-start", "5", "--memvr-end", "3"]) == 2
    assert "--memvr-start must be < --memvr-end" in capsys.readouterr().err
    assert modeling.main(["restore", str(path)]) == 2   # nothing installed yet
    assert "no .orig backups" in capsys.readouterr().err


def test_config_block_without_hallupatch_says_what_to_do(tmp_path, monkeypatch):
    path = tiny_remote.build_tiny_checkpoint(tmp_path / "qwen_block", "qwen", hallupatch={"method": "memvr"})
    monkeypatch.setitem(sys.modules, "hallupatch.modeling", None)   # as if hallupatch were not installed
    with pytest.raises(ImportError, match="install it .* or remove the block"):
        load(path)


def test_config_json_that_is_not_an_object_is_one_error_line(tmp_path, capsys):
    listed = tmp_path / "listed"
    listed.mkdir()
    (listed / "config.json").write_text(json.dumps([{"model_type": "qwen"}]))
    assert modeling.main(["install", str(listed)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "holds a JSON list, not an object" in err
    (listed / "config.json").write_bytes(b'{"model_type": "qwen\xff"}')
    assert modeling.main(["restore", str(listed)]) == 2
    assert "is not valid UTF-8 JSON" in capsys.readouterr().err


def test_read_only_checkpoint_is_refused_before_anything_changes(tmp_path, capsys, monkeypatch):
    path, target = checkpoint_with_original(tmp_path, "qwen")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    real_access = os.access
    # a read-only folder (as a non-root user sees it; root may write anywhere, so the check is simulated)
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == path else real_access(p, mode))
    assert modeling.main(["install", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: {path} is read-only" in err and "writable folder" in err
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert modeling.main(["restore", str(path)]) == 2
    assert "is read-only" in capsys.readouterr().err


def test_write_failure_while_installing_is_one_error_line(tmp_path, capsys, monkeypatch):
    path, _ = checkpoint_with_original(tmp_path, "chatglm")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path / "modeling_chatglm.py.orig"))

    monkeypatch.setattr(modeling.shutil, "copy2", refuse)
    assert modeling.main(["install", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: could not write into {path}: ") and "Permission denied" in err


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="file modes do not stop root")
def test_read_only_checkpoint_by_file_mode(tmp_path, capsys):
    path, _ = checkpoint_with_original(tmp_path, "qwen")
    path.chmod(0o555)
    try:
        assert modeling.main(["install", str(path)]) == 2
        assert "is read-only" in capsys.readouterr().err
    finally:
        path.chmod(0o755)
