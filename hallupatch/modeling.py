"""Install hallupatch's drop-in modeling files into Qwen-VL-Chat / GLM-4V-9b checkpoint folders.

    python -m hallupatch.modeling install CHECKPOINT_DIR [--memvr-ratio R --memvr-threshold T
                                                          --memvr-start S --memvr-end E]
    python -m hallupatch.modeling restore CHECKPOINT_DIR

``install`` detects the family from ``config.json`` (``model_type`` ``"qwen"`` or ``"chatglm"``), keeps the
checkpoint's modeling file as ``<name>.orig`` (once: a second install never overwrites the backup), copies
our file over it and writes a ``"hallupatch"`` block into ``config.json`` (the previous ``config.json`` is
kept as ``config.json.orig``). The model then applies MemVR by itself when loaded with
``AutoModelForCausalLM.from_pretrained(CHECKPOINT_DIR, trust_remote_code=True)``. ``restore`` puts both
originals back.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from importlib.resources import files
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from torch import nn

MODELING_FILES = {"qwen": "modeling_qwen.py", "chatglm": "modeling_chatglm.py"}
BACKUP_SUFFIX = ".orig"


class InstallError(Exception):
    """A checkpoint folder that the installer refuses, with the reason and what to do."""


def apply_config_block(model: nn.Module, block: Dict[str, Any]) -> nn.Module:
    """Apply a ``config.json`` ``"hallupatch"`` block: ``{"method": "memvr", <knobs>...}`` (method defaults
    to ``"memvr"``; ``{"method": "none"}`` or ``{"enabled": false}`` leaves the model unpatched)."""
    import hallupatch

    if not isinstance(block, dict):
        raise ValueError(f'the "hallupatch" block of config.json must be an object like {{"method": "memvr"}}; got {block!r}')
    knobs = dict(block)
    method = knobs.pop("method", "memvr")
    if not knobs.pop("enabled", True) or method in (None, "none"):
        return model
    return hallupatch.apply(model, method=method, **knobs)


def detect_family(checkpoint: Union[str, Path]) -> str:
    """``"qwen"`` or ``"chatglm"`` from ``config.json``'s ``model_type``; :class:`InstallError` otherwise."""
    config_path = Path(checkpoint) / "config.json"
    if not config_path.is_file():
        raise InstallError(f"{config_path} does not exist: CHECKPOINT_DIR must be a Hugging Face checkpoint folder")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InstallError(f"{config_path} is not valid UTF-8 JSON ({error})") from None
    if not isinstance(config, dict):
        raise InstallError(
            f"{config_path} holds a JSON {type(config).__name__}, not an object: a Hugging Face config.json is "
            'an object like {"model_type": "qwen", ...}'
        )
    model_type = config.get("model_type")
    if model_type not in MODELING_FILES:
        raise InstallError(
            f"{config_path} has model_type {model_type!r}; the installer supports Qwen-VL-Chat (model_type 'qwen') "
            "and GLM-4V-9b (model_type 'chatglm'). For LLaVA use hallupatch.apply(model) directly."
        )
    return model_type


def dropin_source(family: str) -> Path:
    """Our modeling file for ``family``: from the installed ``hallupatch.dropin`` package, else the source
    checkout's ``modeling/`` folder."""
    if family not in MODELING_FILES:
        raise ValueError(f"family must be one of {sorted(MODELING_FILES)}; got {family!r}")
    name = MODELING_FILES[family]
    try:
        candidate = files("hallupatch.dropin").joinpath(name)
        if candidate.is_file():
            return Path(str(candidate))
    except ModuleNotFoundError:
        pass
    candidate = Path(__file__).resolve().parent.parent / "modeling" / name
    if not candidate.is_file():
        raise FileNotFoundError(f"hallupatch's drop-in {name} is neither in the hallupatch.dropin package nor at {candidate}")
    return candidate


def memvr_block(ratio: Optional[float] = None, threshold: Optional[float] = None, start: Optional[int] = None,
                end: Optional[int] = None) -> Dict[str, Any]:
    """The config block for MemVR; knobs left ``None`` take the family's published defaults at load time
    (:func:`install` validates the block against them)."""
    block: Dict[str, Any] = {"method": "memvr"}
    for key, value in (("retracing_ratio", ratio), ("entropy_threshold", threshold),
                       ("starting_layer", start), ("ending_layer", end)):
        if value is not None:
            block[key] = value
    return block


def check_block(block: Dict[str, Any], family: str) -> None:
    """Validate a config block as ``hallupatch.apply`` will at load time, with the family's published
    defaults for the knobs it leaves out (the checks that need the model's layer count wait until then)."""
    from hallupatch.api import build_configs
    from hallupatch.methods import parse_method
    from hallupatch.spec import registered_families

    if not isinstance(block, dict):
        raise ValueError(f'the "hallupatch" block must be an object like {{"method": "memvr"}}; got {block!r}')
    knobs = dict(block)
    method = knobs.pop("method", "memvr")
    if not knobs.pop("enabled", True) or method in (None, "none"):
        return
    defaults = next(spec.method_defaults for spec in registered_families() if spec.name == family)
    try:
        build_configs(parse_method(method), defaults, None, knobs, method)
    except TypeError as err:
        raise ValueError(str(err)) from None


def install(checkpoint: Union[str, Path], block: Optional[Dict[str, Any]] = None) -> Path:
    """Install our modeling file and the config block into ``checkpoint``; returns the installed file."""
    checkpoint = Path(checkpoint)
    family = detect_family(checkpoint)
    target = checkpoint / MODELING_FILES[family]
    if not target.is_file():
        raise InstallError(f"{target} does not exist: the folder is not a trust_remote_code {family} checkpoint")
    block = memvr_block() if block is None else block
    check_block(block, family)
    require_writable(checkpoint, [target, checkpoint / "config.json"])
    backup = target.with_name(target.name + BACKUP_SUFFIX)
    if not backup.exists():
        shutil.copy2(target, backup)
    config_path = checkpoint / "config.json"
    config_backup = config_path.with_name(config_path.name + BACKUP_SUFFIX)
    if not config_backup.exists():
        shutil.copy2(config_path, config_backup)
    shutil.copyfile(dropin_source(family), target)
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["hallupatch"] = block
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return target


def require_writable(checkpoint: Path, files_to_replace: List[Path]) -> None:
    """Refuse (before changing anything) a checkpoint folder or file that this user cannot write."""
    for path in [checkpoint, *files_to_replace]:
        if not os.access(path, os.W_OK):
            raise InstallError(
                f"{path} is read-only: the installer writes the modeling file, config.json and their "
                f"{BACKUP_SUFFIX} backups into the checkpoint folder; copy the checkpoint to a writable folder first"
            )


def restore(checkpoint: Union[str, Path]) -> List[Path]:
    """Put back the modeling file and ``config.json`` saved by :func:`install`; returns the restored files."""
    checkpoint = Path(checkpoint)
    family = detect_family(checkpoint)
    originals = (checkpoint / MODELING_FILES[family], checkpoint / "config.json")
    require_writable(checkpoint, [path for path in originals if path.exists()])
    restored = []
    for original in (checkpoint / MODELING_FILES[family], checkpoint / "config.json"):
        backup = original.with_name(original.name + BACKUP_SUFFIX)
        if backup.exists():
            shutil.move(str(backup), str(original))
            restored.append(original)
    if not restored:
        raise InstallError(f"nothing to restore in {checkpoint}: no {BACKUP_SUFFIX} backups (was it installed?)")
    return restored


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hallupatch.modeling", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    install_cmd = commands.add_parser("install", help="install the drop-in modeling file and MemVR config block")
    install_cmd.add_argument("checkpoint", type=Path)
    install_cmd.add_argument("--memvr-ratio", type=float, help="retracing_ratio in [0, 1] (default: family's)")
    install_cmd.add_argument("--memvr-threshold", type=float, help="entropy_threshold >= 0 (default: family's)")
    install_cmd.add_argument("--memvr-start", type=int, help="starting_layer, 0-based (default: family's)")
    install_cmd.add_argument("--memvr-end", type=int, help="ending_layer, 0-based (default: family's)")
    restore_cmd = commands.add_parser("restore", help="put the original modeling file and config.json back")
    restore_cmd.add_argument("checkpoint", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "install":
            if args.memvr_start is not None and args.memvr_end is not None and not args.memvr_start < args.memvr_end:
                raise ValueError(f"--memvr-start must be < --memvr-end; got {args.memvr_start} and {args.memvr_end}")
            block = memvr_block(args.memvr_ratio, args.memvr_threshold, args.memvr_start, args.memvr_end)
            target = install(args.checkpoint, block)
            print(f"installed hallupatch's {target.name} in {args.checkpoint} (original kept as {target.name}{BACKUP_SUFFIX}); "
                  f"config block: {json.dumps(block)}")
        else:
            for path in restore(args.checkpoint):
                print(f"restored {path}")
    except (InstallError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # e.g. a folder that turned read-only or a full disk while writing
        print(f"error: could not write into {args.checkpoint}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
