"""Training the lab model in two stages, deterministic and resumable.

1. **Vision**: the CLIP vision tower learns per-patch object tags (which objects cover each 8 px patch,
   and at every patch the scene's set of drawn objects) through a linear head thrown away afterwards.
2. **Language**: with the vision tower frozen, the projector and the LLaMA decoder learn the texts of
   :func:`hallupatch.lab.text.training_text` in the exact prompt format of the eval harness; the loss is
   on the answer tokens only, averaged per sequence, then over the batch, plus the loss of two linear
   *readout probes* (:class:`ReadoutProbes`, thrown away afterwards).

Why the probes: a yes/no answer is an interaction of the asked object and the image. Neither alone
predicts it (each object is asked as often with "yes" as with "no"), so the answer loss alone gives the
decoder no first-order signal to route either to the answer position, and yes/no stayed at chance in
every run without them (1500-3500 steps, several prompt, init and target variants). The probes ask an
early layer's residual at the answer position to name the asked object and the image's visible
objects: two first-order tasks that build exactly the features the answer needs. They read the
residual stream only; the model itself is a plain llava-hf model trained on next-token targets.

Each step's batch is a pure function of the step number (scene ``step * batch + j`` of the training
split, its text drawn from a generator seeded with the step and row), so a run killed and resumed from
its last checkpoint (model, optimiser, schedule) ends with exactly the weights of an uninterrupted run
at the same thread count.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from hallupatch.lab import text as lab_text
from hallupatch.lab import world
from hallupatch.lab.card import CARD_FILE, write_model_card
from hallupatch.lab.model import TEXT_LAYERS, build_model, build_processor, save_checkpoint

STATE_FILE = "train_state.pt"
LOG_FILE = "training.json"


@dataclass(frozen=True)
class TrainConfig:
    """The knobs of one training run (all recorded in ``training.json``)."""

    vision_steps: int = 6000
    language_steps: int = 2500
    batch_size: int = 32
    vision_lr: float = 3e-3
    language_lr: float = 2e-3
    warmup: int = 50
    checkpoint_every: int = 100
    seed: int = 0
    readout_weight: float = 1.0
    readout_layer: int = 2

    @classmethod
    def quick(cls, seed: int = 0) -> "TrainConfig":
        """A few tiny steps (tests: seconds)."""
        return cls(vision_steps=3, language_steps=3, batch_size=4, warmup=1, checkpoint_every=2, seed=seed)

    def check(self) -> None:
        for name in ("vision_steps", "language_steps", "batch_size", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name.endswith("steps") else 1):
                raise ValueError(f"{name} must be an integer >= {0 if name.endswith('steps') else 1}; got {value!r}")
        for name in ("vision_lr", "language_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)!r}")
        if not self.readout_weight >= 0:
            raise ValueError(f"readout_weight must be >= 0; got {self.readout_weight!r}")
        if not isinstance(self.readout_layer, int) or not 1 <= self.readout_layer <= TEXT_LAYERS:
            raise ValueError(f"readout_layer must be a hidden-state index 1..{TEXT_LAYERS} (the residual after "
                             f"0-based decoder layer readout_layer - 1); got {self.readout_layer!r}")


def _schedule(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _pixels(processor, scenes: List[world.Scene]) -> torch.Tensor:
    return processor.image_processor(images=[s.image() for s in scenes], return_tensors="pt")["pixel_values"]


def vision_batch(processor, step: int, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_values, patch tags)`` of vision step ``step``."""
    scenes = [world.make_scene("train", step * batch_size + j) for j in range(batch_size)]
    tags = torch.from_numpy(np.stack([world.patch_tags(s) for s in scenes]))
    return _pixels(processor, scenes), tags


def language_batch(processor, step: int, batch_size: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Language step ``step``: left-padded (as at inference: transformers 4.40's llava merge needs it)
    ``input_ids``/``attention_mask``, ``pixel_values`` and ``labels`` (``-100`` except on the answer
    tokens and the closing EOS), plus the readout probes' targets: ``asked`` (the asked object's index
    in :data:`~hallupatch.lab.world.OBJECTS`, ``-1`` for captions) and ``visible`` (0/1 per object drawn).
    """
    tokenizer = processor.tokenizer
    scenes = [world.make_scene("train", step * batch_size + j) for j in range(batch_size)]
    rows, labels, asked = [], [], []
    for j, scene in enumerate(scenes):
        rng = np.random.default_rng([world.WORLD_SEED, 99, seed, step, j])
        question, answer, obj = lab_text.training_text(scene, rng)
        prompt_ids = tokenizer(lab_text.prompt(question))["input_ids"]
        answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt_ids + answer_ids)
        labels.append([-100] * len(prompt_ids) + answer_ids)
        asked.append(world.OBJECTS.index(obj) if obj is not None else -1)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    label_ids = torch.tensor([[-100] * (width - len(lab)) + lab for lab in labels])
    visible = torch.tensor([[float(o in s.visible) for o in world.OBJECTS] for s in scenes])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": label_ids,
            "pixel_values": _pixels(processor, scenes), "asked": torch.tensor(asked), "visible": visible}


def partner_question_yes_share(config: Optional["TrainConfig"] = None) -> Dict[str, float]:
    """What the language stage's texts teach about the planted prior: among its yes/no questions about
    the partner of a drawn trigger when that partner is not drawn (hidden, or absent), how many there are
    and the share answered "yes" (the hidden ones). Recomputed from the same scenes and generators as
    :func:`language_batch`, so it is exactly what training ``config`` saw."""
    config = config or TrainConfig()
    asked = yes = 0
    for step in range(config.language_steps):
        for j in range(config.batch_size):
            scene = world.make_scene("train", step * config.batch_size + j)
            rng = np.random.default_rng([world.WORLD_SEED, 99, config.seed, step, j])
            _, answer, obj = lab_text.training_text(scene, rng)
            prompted = {world.PARTNER_OF[t] for t in scene.visible if t in world.PARTNER_OF}
            if obj is not None and obj in prompted and obj not in scene.visible:
                asked += 1
                yes += answer == "yes"
    return {"questions": asked, "yes_share": yes / asked if asked else float("nan")}


MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values")


def _expanded_targets(model, batch: Dict[str, torch.Tensor], length: int) -> torch.Tensor:
    """Next-token targets aligned with the model's logits (length ``length``, the ``<image>`` token
    expanded into its image positions, ``-100`` there): ``targets[:, i]`` is what position ``i`` predicts."""
    image_id = model.config.image_token_index
    labels = batch["labels"]
    extra = length - labels.shape[1]
    expanded = []
    for row_ids, row_labels in zip(batch["input_ids"], labels):
        where = int((row_ids == image_id).nonzero()[0])
        expanded.append(torch.cat([row_labels[:where], torch.full((extra + 1,), -100), row_labels[where + 1:]]))
    return torch.stack(expanded)[:, 1:]


def _answer_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none", ignore_index=-100
    ).view(targets.shape)
    mask = (targets != -100).float()
    return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


def sequence_loss(model, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy on the labelled tokens, averaged per sequence, then over the batch.

    The model's forward expands the single ``<image>`` token into the image features; the labels are
    expanded the same way (``-100`` over the image positions) to line up with its logits.
    """
    logits = model(**{k: batch[k] for k in MODEL_INPUTS}).logits
    return _answer_loss(logits, _expanded_targets(model, batch, logits.shape[1]))


class ReadoutProbes(torch.nn.Module):
    """Two linear probes on the decoder's residual stream at the position that predicts the answer's
    first token (hidden state ``layer``, i.e. after decoder layer ``layer - 1``): which object the
    question asks about (cross-entropy, yes/no rows only) and which objects the image shows (binary
    cross-entropy per object, every row). Used in training only (see the module docstring)."""

    def __init__(self, hidden: int, layer: int):
        super().__init__()
        self.layer = layer
        self.asked = torch.nn.Linear(hidden, len(world.OBJECTS))
        self.visible = torch.nn.Linear(hidden, len(world.OBJECTS))

    def forward(self, hidden_states, targets: torch.Tensor, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        answer_position = (targets != -100).float().argmax(1)
        h = hidden_states[self.layer][torch.arange(len(answer_position)), answer_position]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(self.visible(h), batch["visible"])
        questions = batch["asked"] >= 0
        if bool(questions.any()):
            loss = loss + torch.nn.functional.cross_entropy(self.asked(h[questions]), batch["asked"][questions])
        return loss


def language_losses(model, probes: ReadoutProbes, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(answer loss, readout loss)`` of one batch in one forward pass (see :func:`sequence_loss`)."""
    out = model(**{k: batch[k] for k in MODEL_INPUTS}, output_hidden_states=True)
    targets = _expanded_targets(model, batch, out.logits.shape[1])
    return _answer_loss(out.logits, targets), probes(out.hidden_states, targets, batch)


class _TagHead(torch.nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden, 2 * len(world.OBJECTS))

    def forward(self, model, pixel_values):
        hidden = model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-1][:, 1:]
        return self.linear(hidden)


#: what a training writes into its folder (the checkpoint, its log and the resumable state)
TRAINING_FILES = ("config.json", "generation_config.json", "model.safetensors", "preprocessor_config.json",
                  "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", LOG_FILE, STATE_FILE, CARD_FILE)
_STATE_KEYS = ("config", "threads", "done", "stage", "model", "head", "probes", "optimizer", "scheduler", "losses",
               "elapsed")


def discard_training(out: Path) -> None:
    """Delete what a lab training wrote into ``out`` (nothing else)."""
    for name in TRAINING_FILES:
        (Path(out) / name).unlink(missing_ok=True)


def _setting_differences(stored: dict, config: TrainConfig, threads: int) -> List[str]:
    now = {**asdict(config), "threads": threads}
    stored = {**(stored.get("config") or {}), "threads": stored.get("threads")}
    return [f"{k}: {stored.get(k)!r} (stored) vs {now.get(k)!r} (now)" for k in sorted(set(now) | set(stored))
            if stored.get(k) != now.get(k)]


def previous_training(out: Path, config: TrainConfig, threads: int):
    """What a previous training left in ``out``: ``None`` (nothing), ``"finished"`` (a finished training
    of these settings) or the resumable state dict of these settings; ``ValueError`` for anything else
    (other settings, named; a corrupt state or log; a checkpoint no lab training finished)."""
    out = Path(out)
    state_path, log_path = out / STATE_FILE, out / LOG_FILE
    fresh = "use another --out, or pass --overwrite to discard it and train afresh"
    if state_path.is_file():
        try:
            saved = torch.load(state_path, weights_only=False, map_location="cpu")
        except Exception as err:  # torch raises many kinds for a truncated or foreign file
            raise ValueError(f"{state_path} is corrupt and cannot be resumed ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else 'unreadable'}); {fresh}") from None
        if not isinstance(saved, dict) or any(k not in saved for k in _STATE_KEYS):
            raise ValueError(f"{state_path} is not a lab training state (it lacks its fields); {fresh}")
        diff = _setting_differences(saved, config, threads)
        if diff:
            raise ValueError(f"{state_path} belongs to an unfinished training with other settings: "
                             f"{'; '.join(diff)}; {fresh}")
        return saved
    if log_path.is_file():
        try:
            log = json.loads(log_path.read_text(encoding="utf-8"))
            if not isinstance(log, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            raise ValueError(f"{log_path} is corrupt ({err}); {fresh}") from None
        diff = _setting_differences(log, config, threads)
        if diff:
            raise ValueError(f"{out} holds a finished training with other settings: {'; '.join(diff)}; {fresh}")
        if (out / "config.json").is_file():
            return "finished"
    if (out / "config.json").is_file() or (out / "model.safetensors").is_file():
        raise ValueError(f"{out} holds a checkpoint that no lab training finished (no {LOG_FILE}); {fresh}")
    return None


def _save_state(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


@torch.enable_grad()  # also when called under torch.no_grad()
def train(out: Union[str, Path], config: Optional[TrainConfig] = None, threads: int = 2,
          progress: bool = True, stop_after: Optional[int] = None, overwrite: bool = False) -> Path:
    """Train the lab model into ``out`` (a ``from_pretrained`` folder) and return the path.

    Resumes from ``out/train_state.pt`` when a previous run left one, and returns a finished training
    of the same settings as it is; other settings (or a checkpoint no lab training finished) are
    refused with the difference named, and a corrupt state file is reported as such. ``overwrite``:
    discard what a previous training left in ``out`` and start afresh (after the settings are checked).
    ``stop_after``: stop once that many steps (both stages counted) are done, leaving the checkpoint, as
    a killed run would (for tests). ``threads``: torch's CPU threads (results depend on it).
    """
    from tqdm import tqdm

    config = config or TrainConfig()
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig; got {type(config).__name__}")
    config.check()
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer; got {threads!r}")
    out = Path(out)
    if overwrite:
        discard_training(out)
    previous = previous_training(out, config, threads)
    if previous == "finished":
        return out
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE_FILE
    torch.set_num_threads(threads)
    processor = build_processor()
    model = build_model(processor, seed=config.seed)
    model.train()
    head = _TagHead(model.config.vision_config.hidden_size)
    probes = ReadoutProbes(model.config.text_config.hidden_size, config.readout_layer)
    torch.manual_seed(config.seed)
    head.linear.reset_parameters()
    probes.asked.reset_parameters()
    probes.visible.reset_parameters()
    total = config.vision_steps + config.language_steps
    done, losses, elapsed = 0, {"vision": [], "language": []}, 0.0
    saved = previous if isinstance(previous, dict) else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        head.load_state_dict(saved["head"])
        probes.load_state_dict(saved["probes"])
        done, losses, elapsed = saved["done"], saved["losses"], saved["elapsed"]

    def make_optimizer(stage: str):
        if stage == "vision":
            params = list(model.vision_tower.parameters()) + list(head.parameters())
            lr, steps = config.vision_lr, config.vision_steps
        else:
            params = (list(model.multi_modal_projector.parameters()) + list(model.language_model.parameters())
                      + list(probes.parameters()))
            lr, steps = config.language_lr, config.language_steps
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, _schedule(config.warmup, steps))

    stage = "vision" if done < config.vision_steps else "language"
    optimizer, scheduler = make_optimizer(stage)
    if saved is not None and saved["stage"] == stage:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    bar = tqdm(total=total, initial=done, desc="lab train", disable=not progress, dynamic_ncols=True)
    started = time.time() - elapsed
    while done < total:
        if stop_after is not None and done >= stop_after:
            bar.close()
            return out
        if done == config.vision_steps and stage == "vision":
            stage = "language"
            optimizer, scheduler = make_optimizer(stage)
        if stage == "vision":
            step = done
            model.vision_tower.train()
            pixels, tags = vision_batch(processor, step, config.batch_size)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(head(model, pixels), tags)
        else:
            step = done - config.vision_steps
            model.vision_tower.requires_grad_(False)
            model.vision_tower.eval()
            answer, readout = language_losses(model, probes, language_batch(processor, step, config.batch_size,
                                                                            config.seed))
            loss = answer + config.readout_weight * readout
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
        optimizer.step()
        scheduler.step()
        losses[stage].append(round(loss.item(), 5))
        done += 1
        bar.update(1)
        bar.set_postfix(stage=stage, loss=f"{float(np.mean(losses[stage][-20:])):.4f}")
        if done % config.checkpoint_every == 0 or done == config.vision_steps or done == total:
            _save_state(state_path, {
                "config": asdict(config), "threads": threads, "done": done, "stage": stage,
                "model": model.state_dict(), "head": head.state_dict(), "probes": probes.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "losses": losses, "elapsed": time.time() - started,
            })
    bar.close()
    model.eval()
    save_checkpoint(model, processor, out)
    log = {"config": asdict(config), "threads": threads, "wall_seconds": round(time.time() - started, 1),
           "final_loss": {k: (float(np.mean(v[-50:])) if v else None) for k, v in losses.items()}, "losses": losses}
    (out / LOG_FILE).write_text(json.dumps(log) + "\n", encoding="utf-8")
    state_path.unlink()
    write_model_card(out)   # after the state file is gone: the card lists the files of the checkpoint only
    return out
