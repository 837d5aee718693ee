"""Provenance of the shipped lab weights (issue 22, item 7): each shipped checkpoint folder has a model card
(README.md, Hugging Face convention) listing the sha256 of every file, and the tests notice when the
files are not the ones the card describes."""
import ast
import fnmatch
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from hallupatch.lab import SHIPPED_CHECKPOINTS, verify_checkpoint, write_model_card
from hallupatch.lab.card import CARD_FILE, card_hashes

ROOT = Path(__file__).resolve().parent.parent
LAB = ROOT / "hallupatch" / "lab"


def _front_matter(card: Path) -> str:
    text = card.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return text.split("---\n")[1]


@pytest.mark.parametrize("seed", sorted(SHIPPED_CHECKPOINTS))
def test_the_shipped_files_are_the_ones_their_card_lists(seed):
    folder = SHIPPED_CHECKPOINTS[seed]
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != CARD_FILE)
    # an independent re-computation, file by file
    recomputed = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    assert {"model.safetensors", "config.json", "tokenizer.json", "training.json"} <= set(recomputed)
    assert card_hashes(folder) == recomputed, f"{folder}: the files are not the shipped ones (rewrite the card " \
        "with hallupatch.lab.write_model_card only for weights you mean to ship)"
    assert verify_checkpoint(folder) == recomputed
    card = (folder / CARD_FILE).read_text(encoding="utf-8")
    table = dict(re.findall(r"^\| `([^`]+)` \| \d+ \| `([0-9a-f]{64})` \|$", card, flags=re.M))
    assert table == recomputed   # the text's table says what the metadata says
    front = _front_matter(folder / CARD_FILE)
    log = json.loads((folder / "training.json").read_text(encoding="utf-8"))
    assert re.search(rf"^seed: {seed}$", front, flags=re.M) and log["config"]["seed"] == seed
    assert re.search(rf"^threads: {log['threads']}$", front, flags=re.M)
    assert f"--seed {seed} --threads {log['threads']}" in card
    assert "library_name: transformers" in front


def test_a_modified_copy_is_caught(tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(SHIPPED_CHECKPOINTS[0], copy)
    verify_checkpoint(copy)
    weights = bytearray((copy / "model.safetensors").read_bytes())
    weights[-1] ^= 1   # one bit of one weight
    (copy / "model.safetensors").write_bytes(bytes(weights))
    (copy / "tokenizer.json").unlink()
    (copy / "extra.bin").write_bytes(b"x")
    with pytest.raises(ValueError) as err:
        verify_checkpoint(copy)
    message = str(err.value)
    assert "changed: model.safetensors" in message and "missing: tokenizer.json" in message
    assert "not in the card: extra.bin" in message and "config.json" not in message
    (copy / CARD_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="no model card"):
        verify_checkpoint(copy)


def test_a_card_needs_a_training_log(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="training.json"):
        write_model_card(tmp_path)


def test_setup_ships_every_file_of_every_shipped_checkpoint():
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    package_data = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "package_data"))
    patterns = package_data["hallupatch.lab"]
    assert package_data and fnmatch.fnmatch("seeds/seed1/README.md", next(p for p in patterns if p.startswith("seeds")))
    for folder in SHIPPED_CHECKPOINTS.values():
        for path in folder.iterdir():
            relative = path.relative_to(LAB).as_posix()
            # setuptools' package_data globs: '*' does not cross a '/'
            assert any(fnmatch.fnmatch(relative, p) and relative.count("/") == p.count("/") for p in patterns), relative


def test_training_writes_a_card_of_its_checkpoint(tmp_path):
    from hallupatch.lab.train import TrainConfig, train

    threads = torch.get_num_threads()
    try:
        out = train(tmp_path / "ckpt", TrainConfig.quick(seed=3), threads=1, progress=False)
    finally:
        torch.set_num_threads(threads)
    hashes = verify_checkpoint(out)
    assert "model.safetensors" in hashes and "train_state.pt" not in hashes
    card = (out / CARD_FILE).read_text(encoding="utf-8")
    assert "python -m hallupatch.lab train --out DIR --seed 3 --threads 1 --quick" in card
    assert re.search(r"^seed: 3$", _front_matter(out / CARD_FILE), flags=re.M)
