"""`python -m hallupatch.lab train`: end to end, resumable to the same weights, loss on the right tokens."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hallupatch.lab import load_lab_model
from hallupatch.lab.model import build_model, build_processor
from hallupatch.lab.train import MODEL_INPUTS, ReadoutProbes, TrainConfig, language_batch, language_losses, sequence_loss, train

ROOT = Path(__file__).resolve().parent.parent


def _run(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "hallupatch.lab", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def test_train_quick_writes_a_loadable_checkpoint(tmp_path):
    result = _run("train", "--quick", "--out", str(tmp_path / "ckpt"), "--no-progress")
    assert result.returncode == 0, result.stderr
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "training.json"} <= files
    assert "train_state.pt" not in files
    assert all(t.dtype == torch.float16 for t in load_file(tmp_path / "ckpt" / "model.safetensors").values())
    model, processor = load_lab_model(tmp_path / "ckpt")
    assert type(model).__name__ == "LlavaForConditionalGeneration" and model.config.pad_token_id is not None
    from hallupatch.lab import infer, world

    answers = infer.generate(model, processor, [world.make_scene("test", 0).image()], ["Describe the image."])
    assert isinstance(answers[0], str)


def test_a_killed_run_resumes_to_the_same_weights(tmp_path):
    config = TrainConfig.quick()
    straight = train(tmp_path / "straight", config, progress=False)
    train(tmp_path / "killed", config, progress=False, stop_after=3)  # stops as a kill would, after a checkpoint at 2
    assert (tmp_path / "killed" / "train_state.pt").is_file() and not (tmp_path / "killed" / "config.json").exists()
    resumed = train(tmp_path / "killed", config, progress=False)
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="other settings"):
        train(tmp_path / "other", config, progress=False, stop_after=2)
        train(tmp_path / "other", TrainConfig.quick(seed=1), progress=False)


def test_sequence_loss_is_on_the_answer_tokens():
    """Against transformers' own label merge and loss (a token mean, so compared one sequence at a time):
    each sequence's loss is the mean over its answer tokens, the batch loss the mean over sequences."""
    processor = build_processor()
    model = build_model(processor)
    batch = language_batch(processor, step=0, batch_size=6)
    with torch.no_grad():
        ours = sequence_loss(model, batch)
        rows = [{k: v[i:i + 1] for k, v in batch.items()} for i in range(6)]
        singles = torch.stack([sequence_loss(model, row) for row in rows])
        hf = torch.stack([model(**{k: row[k] for k in (*MODEL_INPUTS, "labels")}).loss for row in rows])
    assert torch.allclose(singles, hf, atol=1e-5)
    assert torch.allclose(ours, singles.mean(), atol=1e-5)
    assert (batch["labels"] != -100).sum() < batch["attention_mask"].sum() / 10  # answers only


def test_cli_errors_are_one_line_and_exit_2(tmp_path):
    result = _run("train")
    assert result.returncode == 2 and result.stderr.startswith("error:") and "Traceback" not in result.stderr
    result = _run("train", "--out", str(tmp_path), "--threads", "0")
    assert result.returncode == 2 and result.stderr.strip().startswith("error: threads")
    result = _run("measure", "--model", str(tmp_path / "missing"))
    assert result.returncode == 2 and "error: no lab checkpoint" in result.stderr
    with pytest.raises(TypeError):
        train(tmp_path, config={"vision_steps": 1})


def test_readout_probe_targets_and_position():
    """The probes' targets are the asked object and the drawn objects; they read the residual at the
    last prompt position (the one that predicts the answer), recomputed here from the row's end."""
    from hallupatch.lab import world

    processor = build_processor()
    tok = processor.tokenizer
    batch = language_batch(processor, step=1, batch_size=8)
    yes_no = {tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")}
    objects = tok.convert_tokens_to_ids(list(world.OBJECTS))  # one token per object
    for j, (ids, labels, asked, visible) in enumerate(zip(batch["input_ids"], batch["labels"], batch["asked"],
                                                          batch["visible"])):
        scene = world.make_scene("train", 8 + j)
        assert visible.tolist() == [float(o in scene.visible) for o in world.OBJECTS]
        answer = [int(t) for t in labels[labels != -100]]
        in_prompt = [int(t) for t, target in zip(ids, labels) if int(t) in objects and int(target) == -100]
        if answer[0] in yes_no:
            assert in_prompt == [objects[int(asked)]]
        else:
            assert int(asked) == -1 and in_prompt == []
    model = build_model(processor)
    torch.manual_seed(0)
    probes = ReadoutProbes(model.config.text_config.hidden_size, layer=2)
    with torch.no_grad():
        _, readout = language_losses(model, probes, batch)
        hidden = model(**{k: batch[k] for k in MODEL_INPUTS}, output_hidden_states=True).hidden_states[2].double()
    # left padding: every row ends with its answer tokens, so the answer is predicted from position
    # length - answer tokens - 1 of the expanded sequence
    answer_lengths = (batch["labels"] != -100).sum(1)
    position = hidden.shape[1] - answer_lengths - 1
    h = hidden[torch.arange(8), position]
    w_v, b_v = probes.visible.weight.double(), probes.visible.bias.double()
    w_a, b_a = probes.asked.weight.double(), probes.asked.bias.double()
    expected = torch.nn.functional.binary_cross_entropy_with_logits(h @ w_v.T + b_v, batch["visible"].double())
    rows = batch["asked"] >= 0
    expected = expected + torch.nn.functional.cross_entropy((h @ w_a.T + b_a)[rows], batch["asked"][rows])
    assert torch.allclose(readout.double(), expected, atol=1e-5)
