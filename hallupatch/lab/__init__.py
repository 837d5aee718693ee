"""The lab: a synthetic world of shape scenes with a planted language prior, a tiny llava-hf model
trained on it and shipped with the package, and writers of its data in benchmarks' official layouts.

    from hallupatch.lab import load_lab_model, write_pope
    model, processor = load_lab_model()          # the shipped checkpoint, offline
    write_pope("lab-pope", split="test")         # coco_pope_{random,popular,adversarial}.json + images/
"""
from hallupatch.lab.card import verify_checkpoint, write_model_card
from hallupatch.lab.model import (
    CHECKPOINT_DIR, SHIPPED_CHECKPOINTS, build_model, build_processor, load_lab_model, save_checkpoint,
)
from hallupatch.lab.world import (
    OBJECTS, PAIRS, PARTNER_OF, SPLITS, Scene, make_scene, render, scenes,
)

__all__ = [
    "CHECKPOINT_DIR", "SHIPPED_CHECKPOINTS", "build_model", "build_processor", "load_lab_model", "save_checkpoint",
    "verify_checkpoint", "write_model_card",
    "OBJECTS", "PAIRS", "PARTNER_OF", "SPLITS", "Scene", "make_scene", "render", "scenes",
]
