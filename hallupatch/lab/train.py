"""Training the lab model in two stages, deterministic and resumable.

1. **Vision**: the CLIP vision tower learns per-patch object tags (which objects cover each 8 px patch,
   and at every patch the scene's set of drawn objects) through a linear head thrown away afterwards.
2. **Language**: with the vision tower frozen, the projector and the LLaMA decoder learn the texts of
   :func:`hallupatch.lab.text.training_text` in the exact prompt format of the eval harness; the loss is
   on the answer tokens only, averaged per sequence, then over the batch.

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
from hallupatch.lab.model import build_model, build_processor, save_checkpoint

STATE_FILE = "train_state.pt"
LOG_FILE = "training.json"


@dataclass(frozen=True)
class TrainConfig:
    """The knobs of one training run (all recorded in ``training.json``)."""

    vision_steps: int = 2000
    language_steps: int = 1500
    batch_size: int = 32
    vision_lr: float = 2e-3
    language_lr: float = 2e-3
    warmup: int = 50
    checkpoint_every: int = 100
    seed: int = 0
    answer_relay: bool = True

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


def language_batch(processor, step: int, batch_size: int, seed: int = 0,
                   answer_relay: bool = False) -> Dict[str, torch.Tensor]:
    """Language step ``step``: left-padded (as at inference: transformers 4.40's llava merge needs it) ``input_ids``/``attention_mask``, ``pixel_values`` and
    ``labels`` (``-100`` except on the answer tokens and the closing EOS).

    ``answer_relay``: on yes/no questions, the answer is also the target at every prompt position from
    the asked object's token to the end of the prompt. Generation never reads those positions' outputs;
    the targets make the model compute the answer next to the object's words and pass it on token by token
    to the answer position. Without them the answer position learned to attend to the fixed suffix only
    and yes/no stayed at chance (1400 steps).
    """
    tokenizer = processor.tokenizer
    scenes = [world.make_scene("train", step * batch_size + j) for j in range(batch_size)]
    shape_ids = set(tokenizer.convert_tokens_to_ids(list(world.SHAPES) + list(world.OBJECTS))) - {tokenizer.unk_token_id}
    rows, labels = [], []
    for j, scene in enumerate(scenes):
        rng = np.random.default_rng([world.WORLD_SEED, 99, seed, step, j])
        question, answer = lab_text.training_text(scene, rng)
        prompt_ids = tokenizer(lab_text.prompt(question))["input_ids"]
        answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        row_labels = [-100] * len(prompt_ids) + answer_ids
        if answer_relay and answer in ("yes", "no"):
            shape_positions = [i for i, t in enumerate(prompt_ids) if t in shape_ids]
            for k in range(shape_positions[-1] + 1, len(prompt_ids)):
                row_labels[k] = answer_ids[0]  # the output at position k - 1 predicts the answer
        rows.append(prompt_ids + answer_ids)
        labels.append(row_labels)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    label_ids = torch.tensor([[-100] * (width - len(lab)) + lab for lab in labels])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": label_ids,
            "pixel_values": _pixels(processor, scenes)}


def sequence_loss(model, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy on the labelled tokens, averaged per sequence, then over the batch.

    The model's forward expands the single ``<image>`` token into the image features; the labels are
    expanded the same way (``-100`` over the image positions) to line up with its logits.
    """
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"])
    logits = out.logits
    image_id = model.config.image_token_index
    labels = batch["labels"]
    extra = logits.shape[1] - labels.shape[1]
    expanded = []
    for row_ids, row_labels in zip(batch["input_ids"], labels):
        where = int((row_ids == image_id).nonzero()[0])
        expanded.append(torch.cat([row_labels[:where], torch.full((extra + 1,), -100), row_labels[where + 1:]]))
    targets = torch.stack(expanded)[:, 1:]
    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none", ignore_index=-100
    ).view(targets.shape)
    mask = (targets != -100).float()
    return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


class _TagHead(torch.nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden, 2 * len(world.OBJECTS))

    def forward(self, model, pixel_values):
        hidden = model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-1][:, 1:]
        return self.linear(hidden)


def _save_state(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


@torch.enable_grad()  # also when called under torch.no_grad()
def train(out: Union[str, Path], config: Optional[TrainConfig] = None, threads: int = 1,
          progress: bool = True, stop_after: Optional[int] = None) -> Path:
    """Train the lab model into ``out`` (a ``from_pretrained`` folder) and return the path.

    Resumes from ``out/train_state.pt`` when a previous run left one (same config required).
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
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE_FILE
    torch.set_num_threads(threads)
    processor = build_processor()
    model = build_model(processor, seed=config.seed)
    model.train()
    head = _TagHead(model.config.vision_config.hidden_size)
    torch.manual_seed(config.seed)
    head.linear.reset_parameters()
    total = config.vision_steps + config.language_steps
    done, losses, elapsed = 0, {"vision": [], "language": []}, 0.0
    saved = None
    if state_path.is_file():
        saved = torch.load(state_path, weights_only=False)
        if saved["config"] != asdict(config) or saved["threads"] != threads:
            raise ValueError(
                f"{state_path} was written by a run with other settings ({saved['config']}, threads={saved['threads']}); "
                "use another --out or delete it"
            )
        model.load_state_dict(saved["model"])
        head.load_state_dict(saved["head"])
        done, losses, elapsed = saved["done"], saved["losses"], saved["elapsed"]
    elif (out / "config.json").is_file() and (out / LOG_FILE).is_file():
        return out  # finished earlier

    def make_optimizer(stage: str):
        if stage == "vision":
            params = list(model.vision_tower.parameters()) + list(head.parameters())
            lr, steps = config.vision_lr, config.vision_steps
        else:
            params = list(model.multi_modal_projector.parameters()) + list(model.language_model.parameters())
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
            loss = sequence_loss(model, language_batch(processor, step, config.batch_size, config.seed,
                                                       config.answer_relay))
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
                "model": model.state_dict(), "head": head.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "losses": losses, "elapsed": time.time() - started,
            })
    bar.close()
    model.eval()
    save_checkpoint(model, processor, out)
    log = {"config": asdict(config), "threads": threads, "wall_seconds": round(time.time() - started, 1),
           "final_loss": {k: (float(np.mean(v[-50:])) if v else None) for k, v in losses.items()}, "losses": losses}
    (out / LOG_FILE).write_text(json.dumps(log) + "\n", encoding="utf-8")
    state_path.unlink()
    return out
