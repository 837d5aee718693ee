"""The model card of a lab checkpoint: what it is, how it was trained and the sha256 of every file.

A card is the folder's ``README.md`` in the Hugging Face model-card convention (YAML front matter, then
text), written and read with ``huggingface_hub``'s ``ModelCard``. Its ``sha256`` metadata lists every
other file of the folder, so :func:`verify_checkpoint` can tell that the weights are the ones the card
describes (the tests run it on every shipped checkpoint, :data:`hallupatch.lab.model.SHIPPED_CHECKPOINTS`).
``python -m hallupatch.lab train`` writes one into every checkpoint it finishes.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Union

CARD_FILE = "README.md"


def file_hashes(folder: Union[str, Path]) -> Dict[str, str]:
    """``{file name: sha256 hex}`` of every file in ``folder`` but the card itself, by name."""
    hashes = {}
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and path.name != CARD_FILE:
            digest = hashlib.sha256()
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            hashes[path.name] = digest.hexdigest()
    return hashes


def training_command(config: Dict, threads: int) -> str:
    """The ``python -m hallupatch.lab train`` command line that trains with ``config`` and ``threads``."""
    from hallupatch.lab.train import TrainConfig   # not at the top: train.py imports this module

    parts = ["python -m hallupatch.lab train --out DIR"]
    if config == asdict(TrainConfig.quick(config.get("seed", 0))):
        parts.append("--quick")
    else:
        defaults = asdict(TrainConfig())
        for field in ("vision_steps", "language_steps"):
            if config.get(field) != defaults[field]:
                parts.append(f"--{field.replace('_', '-')} {config[field]}")
        fixed = sorted(k for k in defaults if k not in ("seed", "vision_steps", "language_steps")
                       and config.get(k) != defaults[k])
        if fixed:
            parts.append(f"(and TrainConfig {', '.join(f'{k}={config.get(k)!r}' for k in fixed)} from Python)")
    parts.insert(1, f"--seed {config.get('seed', 0)} --threads {threads}")
    return " ".join(parts)


def _parameters(weights: Path) -> int:
    from safetensors import safe_open

    count = 0
    with safe_open(str(weights), framework="pt") as f:
        for name in f.keys():
            shape = f.get_slice(name).get_shape()
            size = 1
            for dim in shape:
                size *= dim
            count += size
    return count


def write_model_card(folder: Union[str, Path]) -> Path:
    """Write ``folder/README.md`` for the lab checkpoint in ``folder`` (a ``python -m hallupatch.lab
    train`` output: its ``training.json`` says how it was trained) and return its path. Rewriting it after
    a file changed records the new hashes: run it only on weights you mean to ship."""
    from huggingface_hub import ModelCard, ModelCardData

    # train.py writes a card at the end of each training, so it is imported here, not at the top
    from hallupatch.lab.train import LOG_FILE
    from hallupatch.lab.model import PATCH_SIZE, TEXT_HIDDEN, TEXT_LAYERS, VISION_HIDDEN, VISION_LAYERS

    folder = Path(folder)
    log_path = folder / LOG_FILE
    if not log_path.is_file():
        raise FileNotFoundError(f"no {LOG_FILE} in {folder}: a model card describes a finished lab training "
                                "(python -m hallupatch.lab train --out DIR writes both)")
    log = json.loads(log_path.read_text(encoding="utf-8"))
    config, threads = log["config"], log["threads"]
    seed = config.get("seed", 0)
    hashes = file_hashes(folder)
    command = training_command(config, threads)
    final = {stage: loss for stage, loss in (log.get("final_loss") or {}).items() if loss is not None}
    losses = ", ".join(f"{stage} {loss:.4f}" for stage, loss in final.items()) or "not recorded"
    seconds = log.get("wall_seconds")
    wall = f"{seconds:.0f} s ({seconds / 60:.1f} min)" if seconds is not None else "not recorded"
    parameters = _parameters(folder / "model.safetensors") if (folder / "model.safetensors").is_file() else None
    data = ModelCardData(
        library_name="transformers", pipeline_tag="image-text-to-text",
        tags=["llava", "hallupatch", "synthetic-data", "hallucination"],
        seed=seed, threads=threads, wall_seconds=log.get("wall_seconds"), training_command=command,
        sha256=hashes,
    )
    rows = "\n".join(f"| `{name}` | {(folder / name).stat().st_size} | `{digest}` |" for name, digest in hashes.items())
    size = f"{parameters / 1e6:.2f}M parameters, " if parameters else ""
    text = f"""
# hallupatch lab model (seed {seed})

A tiny llava-hf `LlavaForConditionalGeneration` ({size}stored in float16): a {VISION_LAYERS}-layer CLIP vision
tower of width {VISION_HIDDEN} on {PATCH_SIZE} px patches and a {TEXT_LAYERS}-layer LLaMA decoder of width {TEXT_HIDDEN},
with the lab's word-level tokenizer, trained by hallupatch on its synthetic world of shape scenes
(`hallupatch.lab`).

## What it is for

It hallucinates for a known reason: in training, a trigger object brings its partner in most scenes and
some labelled objects are not drawn, so the language model learned to guess an unseen partner. It is the
built-in model of `python -m hallupatch.eval` (no `--model`) and of `python -m hallupatch.eval lab`, which
compares decoding-time mitigation methods on it, and the model of the tests. It knows nothing of real
images or language: it is an instrument for measuring methods, not a model to use.

## How it was trained

    {command}

seed {seed}, {threads} torch CPU thread(s) (results depend on the thread count), wall time {wall};
final mean loss (last 50 steps): {losses}.
`{LOG_FILE}` holds the settings and every step's loss.

## Files

The sha256 of every file in this folder (also in the metadata above, `sha256`):
`hallupatch.lab.verify_checkpoint(folder)` recomputes them and names any file that differs.

| file | bytes | sha256 |
|---|---:|---|
{rows}
"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{text}")
    path = folder / CARD_FILE
    path.write_text(str(card), encoding="utf-8")
    return path


def card_hashes(folder: Union[str, Path]) -> Dict[str, str]:
    """The ``sha256`` metadata of ``folder``'s model card (``FileNotFoundError`` without a card,
    ``ValueError`` for a card without file hashes)."""
    from huggingface_hub import ModelCard

    path = Path(folder) / CARD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no model card in {folder} ({CARD_FILE}); write one with "
                                "hallupatch.lab.write_model_card(folder)")
    hashes = ModelCard.load(path).data.to_dict().get("sha256")
    if not isinstance(hashes, dict) or not hashes:
        raise ValueError(f"{path} lists no file hashes (its metadata has no sha256 mapping); rewrite it with "
                         "hallupatch.lab.write_model_card(folder)")
    return {str(k): str(v) for k, v in hashes.items()}


def verify_checkpoint(folder: Union[str, Path]) -> Dict[str, str]:
    """Recompute the sha256 of every file in ``folder`` and compare them with its model card; returns
    the hashes, or raises ``ValueError`` naming each file that differs, is missing or is not in the card."""
    expected, found = card_hashes(folder), file_hashes(folder)
    problems: List[str] = []
    changed = [name for name in expected if name in found and found[name] != expected[name]]
    missing = [name for name in expected if name not in found]
    unlisted = [name for name in found if name not in expected]
    for what, names in (("changed", changed), ("missing", missing), ("not in the card", unlisted)):
        if names:
            problems.append(f"{what}: {', '.join(names)}")
    if problems:
        raise ValueError(f"{folder} is not the checkpoint its model card describes ({'; '.join(problems)}): "
                         "these are not the shipped weights")
    return found
