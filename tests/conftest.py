"""Shared fixtures: tiny random-weight checkpoints, saved and reloaded through ``from_pretrained``."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hallupatch.testing.tiny import build_tiny_llava_checkpoint

TINY_LAYERS = 6


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    return build_tiny_llava_checkpoint(tmp_path_factory.mktemp("tiny-llava"), seed=0, num_layers=TINY_LAYERS)


@pytest.fixture(scope="session")
def backend(tiny_llava_dir):
    """The eval harness's llava-hf backend on the shared tiny checkpoint (CPU)."""
    from hallupatch.eval import models

    return models.load_backend(str(tiny_llava_dir), device="cpu")


@pytest.fixture(scope="session")
def mme_folder(tmp_path_factory):
    """A synthetic MME folder in the released layout (read-only for the tests that share it)."""
    from hallupatch.testing.mme_sample import write_mme_sample

    return write_mme_sample(tmp_path_factory.mktemp("mme") / "MME_Benchmark_release_version")


def load_llava(path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
    return model, AutoProcessor.from_pretrained(path)


@pytest.fixture()
def llava(tiny_llava_dir):
    """A freshly loaded tiny llava-hf model and its processor."""
    return load_llava(tiny_llava_dir)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def launch_two_processes(eval_args, cwd):
    """``accelerate launch`` (two CPU processes) of ``python -m hallupatch.eval *eval_args``; the result."""
    pytest.importorskip("accelerate")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "-m", "hallupatch.eval", *eval_args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )
