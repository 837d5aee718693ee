"""hallupatch's methods on the Qwen2-VL / Qwen2.5-VL drop-ins, beyond the conformance suite: the visual memory
split per sample by image_grid_thw with a text-only row in the batch, MemVR switched on by the installed
config block, and the prefill's M-RoPE offsets surviving a second forward with its own cache (a contrastive
branch) between decoding steps."""
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import hallupatch
import tiny_qwen2_vl as tiny
from hallupatch.engine import get_patch
from qwen2_vl_fixtures import case_inputs, installed_checkpoint, load_model, load_processor

WINDOW = dict(starting_layer=0, ending_layer=3)


@pytest.fixture(scope="module", params=tiny.FAMILIES)
def loaded(request, tmp_path_factory):
    path = installed_checkpoint(tmp_path_factory.mktemp(request.param) / request.param, request.param)
    return path, load_model(path), load_processor(path)


def split_by_grid(model, inputs):
    """The vision tower's tokens per image (t*h*w/4 rows each), then per row by its images (written here from
    the processor's layout: each image is <|vision_start|><|image_pad|>..., in reading order)."""
    with torch.no_grad():
        tokens = model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    per_image = torch.split(tokens, (inputs["image_grid_thw"].prod(dim=1) // 4).tolist())
    start, pad = model.config.vision_start_token_id, model.config.image_token_id
    rows, k = [], 0
    for ids in inputs["input_ids"]:
        count = sum(1 for a, b in zip(ids[:-1].tolist(), ids[1:].tolist()) if a == start and b == pad)
        rows.append(torch.cat(per_image[k:k + count]) if count else None)
        k += count
    return rows


def test_memory_per_sample_and_text_only_row_never_retraced(loaded):
    path, model, processor = loaded
    _, batch = case_inputs(processor, "padded_batch")          # an image row and a text-only row, left-padded
    with torch.no_grad():
        plain = model(**batch).logits
    hallupatch.apply(model, "memvr", entropy_threshold=0.0, retracing_ratio=0.9, **WINDOW)   # any memory fires
    try:
        with torch.no_grad():
            patched = model(**batch).logits
        memory = get_patch(model).generation.visual_memory
        triggers = hallupatch.get_trace(model).passes[0].trigger_layer
    finally:
        hallupatch.remove(model)
    expected = split_by_grid(model, batch)
    assert expected[1] is None and memory[1] is None
    torch.testing.assert_close(memory[0], expected[0], rtol=0, atol=0)
    assert triggers == [WINDOW["starting_layer"] + 1, None]
    real = batch["attention_mask"].bool()
    assert torch.equal(patched[1, real[1]], plain[1, real[1]])          # the text-only row is untouched
    assert (patched[0, real[0]] - plain[0, real[0]]).abs().max() > 1e-3


def test_two_images_of_one_row_are_one_memory_in_order(loaded):
    path, model, processor = loaded
    _, inputs = case_inputs(processor, "two_images")
    hallupatch.apply(model, "memvr", entropy_threshold=float("inf"), **WINDOW)
    try:
        with torch.no_grad():
            model(**inputs)
        memory = get_patch(model).generation.visual_memory
    finally:
        hallupatch.remove(model)
    expected = split_by_grid(model, inputs)[0]
    assert memory[0].shape[0] == int(inputs["image_grid_thw"].prod(dim=1).sum()) // 4
    torch.testing.assert_close(memory[0], expected, rtol=0, atol=0)


def test_installed_block_applies_memvr_at_load(tmp_path):
    block = {"method": "memvr", "entropy_threshold": 0.0, "retracing_ratio": 0.5, **WINDOW}
    path = installed_checkpoint(tmp_path / "q", "qwen2_vl", block=block)
    model = load_model(path)
    assert get_patch(model).configs["memvr"].entropy_threshold == 0.0
    _, inputs = case_inputs(load_processor(path), "small_image")
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert hallupatch.get_trace(model).trigger_layers()[0][0] == WINDOW["starting_layer"] + 1


class SecondBranch(LogitsProcessor):
    """At every step, a forward of another (text-only) prompt with its own cache, as a contrastive branch does;
    the main scores are returned unchanged."""

    def __init__(self, model, inputs):
        self.model, self.inputs, self.cache = model, inputs, None

    def __call__(self, input_ids, scores):
        with torch.no_grad():
            if self.cache is None:
                out = self.model(**self.inputs, use_cache=True)
            else:
                length = self.cache.get_seq_length()
                mask = torch.ones(1, length + 1, dtype=torch.long)
                out = self.model(input_ids=torch.tensor([[65]]), attention_mask=mask, past_key_values=self.cache,
                                 cache_position=torch.tensor([length]), use_cache=True)
            self.cache = out.past_key_values
        return scores


def test_a_branch_with_its_own_cache_keeps_the_main_positions(loaded):
    path, model, processor = loaded
    _, main = case_inputs(processor, "two_images")
    _, branch = case_inputs(processor, "text_only")
    greedy = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        alone = model.generate(**main, **greedy)
        mixed = model.generate(**main, **greedy, logits_processor=LogitsProcessorList([SecondBranch(model, branch)]))
    assert torch.equal(alone.sequences, mixed.sequences)
    for a, b in zip(alone.scores, mixed.scores):
        assert torch.equal(a, b)


@pytest.mark.parametrize("task_name", ["pope", "chair"])
def test_benchmarks_run_with_the_qwen2_vl_recipe(task_name, tmp_path):
    """POPE and CHAIR on the lab's data through the detected recipe, unpatched and with MemVR: yes/no
    questions end with VLMEvalKit's suffix, caption prompts are asked as they are."""
    import json

    from hallupatch.eval import cli
    from hallupatch.eval.store import read_answers

    path = installed_checkpoint(tmp_path / "q", "qwen2_vl")
    out = tmp_path / task_name
    cli.run([task_name, "--model", str(path), "--limit", "4", "--batch-size", "2", "--max-new-tokens", "3",
             "--device", "cpu", "--output", str(out), "--no-progress", "--method", "none,memvr",
             "--starting-layer", "0", "--ending-layer", "3"])
    for method in ("none", "memvr"):
        folder = out / method
        run = json.loads((folder / "run.json").read_text())
        assert run["recipe"] == "qwen2-vl"
        prompts = [a["prompt"] for a in read_answers(folder / "answers.jsonl")]
        assert len(prompts) == 4
        if task_name == "pope":
            assert all(p.endswith("in the image? Please answer yes or no.") for p in prompts)
        else:
            assert set(prompts) == {"Please describe this image in detail."}
