"""Install hallupatch's drop-in modeling files into checkpoint folders.

    python -m hallupatch.modeling install CHECKPOINT_DIR [--memvr-ratio R --memvr-threshold T
                                                          --memvr-start S --memvr-end E]
    python -m hallupatch.modeling restore CHECKPOINT_DIR

``install`` detects the family from ``config.json``'s ``model_type``:

* ``"qwen"`` (Qwen-VL-Chat) and ``"chatglm"`` (GLM-4V-9b) ship their own modeling file: it is kept as
  ``<name>.orig`` (once: a second install never overwrites the backup) and ours is copied over it.
* ``"qwen2_vl"`` and ``"qwen2_5_vl"`` (Qwen2-VL / Qwen2.5-VL hub checkpoints, which transformers 4.40 cannot
  load) get our model, configuration, image processor and processor files, and ``auto_map`` entries in
  ``config.json`` (AutoConfig, AutoModelForVision2Seq, AutoModelForCausalLM) and ``preprocessor_config.json``
  (AutoImageProcessor, AutoProcessor). Files the folder did not have are listed in ``hallupatch_install.json``.

Either way a ``"hallupatch"`` block goes into ``config.json`` (every edited file is first kept as
``<name>.orig``), so the model applies MemVR by itself when loaded with ``from_pretrained(CHECKPOINT_DIR,
trust_remote_code=True)``. No weight file is touched. ``restore`` puts the folder back byte for byte.
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

# families whose checkpoints ship a modeling file that ours replaces
MODELING_FILES = {"qwen": "modeling_qwen.py", "chatglm": "modeling_chatglm.py"}
# families whose hub checkpoints have no code (transformers >= 4.45 has them built in): the files we add, and
# the auto_map entries that point transformers 4.40 at them
QWEN2_VL_SHARED = ["configuration_qwen2_vl.py", "image_processing_qwen2_vl.py", "processing_qwen2_vl.py",
                   "modeling_qwen2_vl.py"]
HUB_NATIVE = {
    "qwen2_vl": {
        "files": QWEN2_VL_SHARED,
        "config": {"AutoConfig": "configuration_qwen2_vl.Qwen2VLConfig",
                   "AutoModelForVision2Seq": "modeling_qwen2_vl.Qwen2VLForConditionalGeneration",
                   "AutoModelForCausalLM": "modeling_qwen2_vl.Qwen2VLForConditionalGeneration"},
        "preprocessor": {"AutoImageProcessor": "image_processing_qwen2_vl.Qwen2VLImageProcessor",
                         "AutoProcessor": "processing_qwen2_vl.Qwen2VLProcessor"},
    },
    "qwen2_5_vl": {
        "files": QWEN2_VL_SHARED + ["modeling_qwen2_5_vl.py"],
        "config": {"AutoConfig": "configuration_qwen2_vl.Qwen2_5_VLConfig",
                   "AutoModelForVision2Seq": "modeling_qwen2_5_vl.Qwen2_5_VLForConditionalGeneration",
                   "AutoModelForCausalLM": "modeling_qwen2_5_vl.Qwen2_5_VLForConditionalGeneration"},
        "preprocessor": {"AutoImageProcessor": "image_processing_qwen2_vl.Qwen2VLImageProcessor",
                         "AutoProcessor": "processing_qwen2_vl.Qwen2_5_VLProcessor"},
    },
}
# the hallupatch family spec (patches/) that validates each model_type's config block
SPEC_NAMES = {"qwen": "qwen", "chatglm": "chatglm", "qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_vl"}
PREPROCESSOR_CONFIG = "preprocessor_config.json"
MANIFEST = "hallupatch_install.json"   # the files install added (restore deletes them)
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
    if model_type not in MODELING_FILES and model_type not in HUB_NATIVE:
        raise InstallError(
            f"{config_path} has model_type {model_type!r}; the installer supports Qwen-VL-Chat (model_type 'qwen'), "
            "GLM-4V-9b (model_type 'chatglm'), Qwen2-VL ('qwen2_vl') and Qwen2.5-VL ('qwen2_5_vl'). "
            "For LLaVA use hallupatch.apply(model) directly."
        )
    return model_type


def dropin_source(family: str) -> Path:
    """Our modeling file for ``family`` (``"qwen"`` or ``"chatglm"``), or the file named ``family`` (e.g.
    ``"modeling_qwen2_vl.py"``): from the installed ``hallupatch.dropin`` package, else the source checkout's
    ``modeling/`` folder."""
    names = set(MODELING_FILES.values()) | {name for spec in HUB_NATIVE.values() for name in spec["files"]}
    if family not in MODELING_FILES and family not in names:
        raise ValueError(f"family must be one of {sorted(MODELING_FILES)} or a drop-in file name; got {family!r}")
    name = MODELING_FILES.get(family, family)
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
    defaults = next(spec.method_defaults for spec in registered_families() if spec.name == SPEC_NAMES[family])
    try:
        build_configs(parse_method(method), defaults, None, knobs, method)
    except TypeError as err:
        raise ValueError(str(err)) from None


def install(checkpoint: Union[str, Path], block: Optional[Dict[str, Any]] = None) -> Path:
    """Install our modeling file(s) and the config block into ``checkpoint``; returns the model file."""
    checkpoint = Path(checkpoint)
    family = detect_family(checkpoint)
    block = memvr_block() if block is None else block
    if family in HUB_NATIVE:
        check_block(block, family)
        return install_hub_native(checkpoint, family, block)
    target = checkpoint / MODELING_FILES[family]
    if not target.is_file():
        raise InstallError(f"{target} does not exist: the folder is not a trust_remote_code {family} checkpoint")
    check_block(block, family)
    require_writable(checkpoint, [target, checkpoint / "config.json"])
    keep_original(target)
    shutil.copyfile(dropin_source(family), target)
    edit_json(checkpoint / "config.json", {"hallupatch": block})
    return target


def keep_original(path: Path) -> None:
    """Copy ``path`` to ``path.orig`` unless a backup exists already (a reinstall keeps the first original)."""
    backup = path.with_name(path.name + BACKUP_SUFFIX)
    if path.exists() and not backup.exists():
        shutil.copy2(path, backup)


def edit_json(path: Path, changes: Dict[str, Any], auto_map: Optional[Dict[str, str]] = None) -> None:
    """Back ``path`` up, set its top-level ``changes`` and merge ``auto_map`` into its ``"auto_map"``."""
    keep_original(path)
    payload = json.loads(path.read_text(encoding="utf-8"))
    payload.update(changes)
    if auto_map:
        payload["auto_map"] = {**payload.get("auto_map", {}), **auto_map}
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def install_hub_native(checkpoint: Path, family: str, block: Dict[str, Any]) -> Path:
    """Qwen2-VL / Qwen2.5-VL: add our files, the auto_map entries and the config block."""
    spec = HUB_NATIVE[family]
    preprocessor = checkpoint / PREPROCESSOR_CONFIG
    if not preprocessor.is_file():
        raise InstallError(f"{preprocessor} does not exist: a {family} hub checkpoint has one (the image processor's "
                           "settings); copy it from the model's hub page")
    targets = [checkpoint / name for name in spec["files"]]
    require_writable(checkpoint, [p for p in targets + [checkpoint / "config.json", preprocessor] if p.exists()])
    manifest_path = checkpoint / MANIFEST
    added = json.loads(manifest_path.read_text(encoding="utf-8"))["added"] if manifest_path.exists() else []
    for target in targets:
        if target.exists() and target.name not in added:
            keep_original(target)
        elif not target.exists():
            added.append(target.name)
    manifest_path.write_text(json.dumps({"added": sorted(set(added))}, indent=2) + "\n", encoding="utf-8")
    for target in targets:
        shutil.copyfile(dropin_source(target.name), target)
    edit_json(checkpoint / "config.json", {"hallupatch": block}, spec["config"])
    edit_json(preprocessor, {}, spec["preprocessor"])
    return checkpoint / spec["files"][-1]


def require_writable(checkpoint: Path, files_to_replace: List[Path]) -> None:
    """Refuse (before changing anything) a checkpoint folder or file that this user cannot write."""
    for path in [checkpoint, *files_to_replace]:
        if not os.access(path, os.W_OK):
            raise InstallError(
                f"{path} is read-only: the installer writes the modeling file, config.json and their "
                f"{BACKUP_SUFFIX} backups into the checkpoint folder; copy the checkpoint to a writable folder first"
            )


def restore(checkpoint: Union[str, Path]) -> List[Path]:
    """Put back every file saved by :func:`install` and delete the files it added; returns the paths restored
    or removed."""
    checkpoint = Path(checkpoint)
    family = detect_family(checkpoint)
    if family in HUB_NATIVE:
        originals = [checkpoint / name for name in HUB_NATIVE[family]["files"]]
        originals += [checkpoint / "config.json", checkpoint / PREPROCESSOR_CONFIG]
    else:
        originals = [checkpoint / MODELING_FILES[family], checkpoint / "config.json"]
    manifest_path = checkpoint / MANIFEST
    require_writable(checkpoint, [path for path in originals if path.exists()])
    changed = []
    if manifest_path.exists():
        for name in json.loads(manifest_path.read_text(encoding="utf-8"))["added"]:
            if (checkpoint / name).exists():
                (checkpoint / name).unlink()
                changed.append(checkpoint / name)
        manifest_path.unlink()
    for original in originals:
        backup = original.with_name(original.name + BACKUP_SUFFIX)
        if backup.exists():
            shutil.move(str(backup), str(original))
            changed.append(original)
    if not changed:
        raise InstallError(f"nothing to restore in {checkpoint}: no {BACKUP_SUFFIX} backups (was it installed?)")
    return changed


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hallupatch.modeling", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    install_cmd = commands.add_parser("install", help="install the drop-in modeling file(s) and the MemVR config block")
    install_cmd.add_argument("checkpoint", type=Path)
    install_cmd.add_argument("--memvr-ratio", type=float, help="retracing_ratio in [0, 1] (default: family's)")
    install_cmd.add_argument("--memvr-threshold", type=float, help="entropy_threshold >= 0 (default: family's)")
    install_cmd.add_argument("--memvr-start", type=int, help="starting_layer, 0-based (default: family's)")
    install_cmd.add_argument("--memvr-end", type=int, help="ending_layer, 0-based (default: family's)")
    restore_cmd = commands.add_parser("restore", help="put the checkpoint folder back as it was before install")
    restore_cmd.add_argument("checkpoint", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "install":
            if args.memvr_start is not None and args.memvr_end is not None and not args.memvr_start < args.memvr_end:
                raise ValueError(f"--memvr-start must be < --memvr-end; got {args.memvr_start} and {args.memvr_end}")
            block = memvr_block(args.memvr_ratio, args.memvr_threshold, args.memvr_start, args.memvr_end)
            target = install(args.checkpoint, block)
            kept = "edited files kept as <name>.orig" if detect_family(args.checkpoint) in HUB_NATIVE \
                else f"original kept as {target.name}{BACKUP_SUFFIX}"
            print(f"installed hallupatch's {target.name} in {args.checkpoint} ({kept}); "
                  f"config block: {json.dumps(block)}")
        else:
            for path in restore(args.checkpoint):
                print(f"restored {path}" if path.exists() else f"removed {path}")
    except (InstallError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # e.g. a folder that turned read-only or a full disk while writing
        print(f"error: could not write into {args.checkpoint}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
