"""VCD, ICD and M3ID on the Qwen2-VL / Qwen2.5-VL drop-ins (tiny checkpoints), against a plain loop written
here: main and second branch as full forwards without cache, combined by each method's formula, argmax.
PAI and OPERA: tests/test_qwen2_vl_pai_opera.py."""
import json
import math

import pytest
import torch

import hallupatch
import tiny_qwen2_vl as tiny
from hallupatch import add_diffusion_noise, icd_prompt
from baselines_reference import greedy_loop
from qwen2_vl_fixtures import encode_rows, installed_checkpoint, loaded, render  # noqa: F401 (loaded: a fixture)

STEPS = 3
ROWS = {   # two image rows of different lengths (left-padded together)
    "one_image": [(84, 56, 5), "Is there a cat in the image?"],
    "two_images": [(56, 84, 3), (100, 70, 4), "Which is brighter?"],
}
SYSTEM = "You are a helpful assistant."
INSTRUCTION = "You are a confused object detector."


def encode(processor, rows):
    return encode_rows(processor, rows)


def last_logits(model, ids, mask, **images):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False, **images).logits[:, -1, :].float()


def contrast(main, branch, alpha=1.0, beta=0.1):
    """VCD / ICD: (1 + alpha) z - alpha z', -inf below log(beta) + max z."""
    out = (1 + alpha) * main - alpha * branch
    return out.masked_fill(main < math.log(beta) + main.max(-1, keepdim=True).values, -math.inf)


def m3id(main, branch, t, beta=0.1, lam=0.02):
    """M3ID: l_c + (1 - g) / g (l_c - l_u) on log-softmax, g = exp(-lam t), t = 1 at the first token."""
    g = math.exp(-lam * t)
    lc, lu = main.log_softmax(-1), branch.log_softmax(-1)
    out = lc + (1 - g) / g * (lc - lu)
    return out.masked_fill(main < math.log(beta) + main.max(-1, keepdim=True).values, -math.inf)


def reference(model, main, branch, combine, steps=STEPS):
    """Greedy tokens and combined scores of a plain loop: both branches re-run in full at every step, the
    step counted from 1, EOS banned (min_new_tokens, as in the generate() call)."""
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    return greedy_loop(lambda ids, mask, images: last_logits(model, ids, mask, **images), steps, main, branch,
                       combine, first_step=1, banned=eos)


def image_inputs(inputs, pixel_values=None):
    return {"pixel_values": inputs["pixel_values"] if pixel_values is None else pixel_values,
            "image_grid_thw": inputs["image_grid_thw"]}


def branch_case(method, model, processor, rows, seed=0):
    """(method knobs, generate() extras, the main and branch inputs of the reference, combine) for ``rows``."""
    texts, inputs = encode(processor, rows)
    main = (inputs["input_ids"], inputs["attention_mask"], image_inputs(inputs))
    if method == "vcd":
        torch.manual_seed(seed)
        noised = add_diffusion_noise(inputs["pixel_values"], 500)
        branch = (inputs["input_ids"], inputs["attention_mask"], image_inputs(inputs, noised))
        return {}, {"images_cd": noised}, inputs, main, branch, lambda z, zb, t: contrast(z, zb)
    if method == "icd":
        images = [image for row in rows for image in tiny.case_images(row)]   # the processor expands the pads
        disturbed = processor(text=[icd_prompt(t, INSTRUCTION, system=SYSTEM) for t in texts], images=images,
                              padding=True, return_tensors="pt")
        assert not torch.equal(disturbed["input_ids"], inputs["input_ids"])
        extras = {"input_ids_cd": disturbed["input_ids"], "attention_mask_cd": disturbed["attention_mask"]}
        branch = (disturbed["input_ids"], disturbed["attention_mask"], image_inputs(inputs))
        return {}, extras, inputs, main, branch, lambda z, zb, t: contrast(z, zb)
    plain = processor.tokenizer(render(processor, rows, with_image=False), padding=True, return_tensors="pt")
    branch = (plain["input_ids"], plain["attention_mask"], {})
    return {}, {}, inputs, main, branch, m3id


def run_method(model, method, inputs, extras):
    hallupatch.apply(model, method)
    try:
        with torch.no_grad():
            out = model.generate(**inputs, **extras, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
        from hallupatch.engine import get_patch
        trace = get_patch(model).methods[method].trace
    finally:
        hallupatch.remove(model)
    return out[:, inputs["input_ids"].shape[1]:], trace


@pytest.mark.parametrize("method", ["vcd", "icd", "m3id"])
def test_greedy_equals_the_plain_loop(loaded, method):
    model, processor = loaded
    _, extras, inputs, main, branch, combine = branch_case(method, model, processor, [ROWS["two_images"]])
    tokens, trace = run_method(model, method, inputs, extras)
    expected_tokens, expected_scores = reference(model, main, branch, combine)
    assert torch.equal(tokens, expected_tokens)
    for got, want in zip(trace.contrasted, expected_scores):
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), finite)
        torch.testing.assert_close(got[finite], want[finite], rtol=1e-4, atol=1e-4)


def test_m3id_branch_is_the_conversation_without_its_images(loaded):
    """The branch drops <|image_pad|> and its <|vision_start|>/<|vision_end|>: the chat template's text-only
    rendering of the same conversation, token for token."""
    model, processor = loaded
    rows = [ROWS["one_image"], ROWS["two_images"]]
    _, _, inputs, _, (ids, mask, _), _ = branch_case("m3id", model, processor, rows)
    hallupatch.apply(model, "m3id")
    try:
        from hallupatch.engine import get_patch
        from hallupatch.methods.two_branch import GenerateCall, image_free_prompt
        method = get_patch(model).methods["m3id"]
        prompt = image_free_prompt(method, GenerateCall(inputs["input_ids"], inputs["attention_mask"], None, None))
    finally:
        hallupatch.remove(model)
    for r in range(len(rows)):      # the same real tokens (the branch may keep more left padding)
        got = prompt.input_ids[r][prompt.attention_mask[r].bool()]
        assert torch.equal(got, ids[r][mask[r].bool()])
        assert not torch.isin(got, torch.tensor([model.config.vision_start_token_id, model.config.vision_end_token_id,
                                                  model.config.image_token_id])).any()


@pytest.mark.parametrize("method", ["vcd", "icd", "m3id"])
def test_left_padded_batch_equals_each_row_alone(loaded, method):
    model, processor = loaded
    rows = [ROWS["one_image"], ROWS["two_images"]]
    _, extras, inputs, _, _, _ = branch_case(method, model, processor, rows)
    assert (inputs["attention_mask"] == 0).any()          # the rows are padded
    batch_tokens, batch_trace = run_method(model, method, inputs, extras)
    patches = inputs["image_grid_thw"].prod(dim=1).tolist()    # per image: 1 in row 0, 2 in row 1
    for r, row in enumerate(rows):
        _, row_extras, row_inputs, _, _, _ = branch_case(method, model, processor, [row])
        if method == "vcd":     # the batch's own distorted patches of this row
            start = 0 if r == 0 else patches[0]
            row_extras = {"images_cd": extras["images_cd"][start:start + row_inputs["pixel_values"].shape[0]]}
        tokens, trace = run_method(model, method, row_inputs, row_extras)
        assert torch.equal(tokens[0], batch_tokens[r])
        for alone, batched in zip(trace.contrasted, batch_trace.contrasted):
            finite = torch.isfinite(alone[0])
            assert torch.equal(torch.isfinite(batched[r]), finite)
            torch.testing.assert_close(batched[r][finite], alone[0][finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["vcd", "icd", "m3id"])
def test_remove_is_bit_identical(loaded, method):
    model, processor = loaded
    _, extras, inputs, _, _, _ = branch_case(method, model, processor, [ROWS["two_images"]])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = last_logits(model, inputs["input_ids"], inputs["attention_mask"], **image_inputs(inputs))
    run_method(model, method, inputs, extras)
    after = last_logits(model, inputs["input_ids"], inputs["attention_mask"], **image_inputs(inputs))
    assert torch.equal(before, after)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    assert torch.equal(out.scores[0][0].float(), before[0])


@pytest.mark.parametrize("method, knobs, call, message", [
    # Qwen's flat patches have no batch dimension: one noise per row cannot be drawn from a seed
    ("vcd", {"noise_seed": 3}, lambda inputs: {}, "no batch dimension.*noise_seed=None"),
    ("vcd", {}, lambda inputs: {"do_sample": True, "num_return_sequences": 2}, "num_return_sequences=1"),
    ("m3id", {}, lambda inputs: {"pixel_values_videos": inputs["pixel_values"],
                                 "video_grid_thw": inputs["image_grid_thw"]}, "a video"),
], ids=["vcd noise seed on patches", "several return sequences", "videos"])
def test_what_the_branch_cannot_build_is_refused(loaded, method, knobs, call, message):
    model, processor = loaded
    _, inputs = encode(processor, [ROWS["one_image"]])
    with hallupatch.patched(model, method=method, **knobs):
        with pytest.raises(ValueError, match=message):
            model.generate(**inputs, **call(inputs), max_new_tokens=1)


def test_pope_runs_the_baselines_with_the_qwen2_vl_recipe(tmp_path):
    """The eval harness builds each method's branch for Qwen2-VL (ICD's disturbed prompt through the processor),
    PAI on the tiny decoder's depth, and OPERA's beam search."""
    from hallupatch.eval import cli
    from hallupatch.eval.store import read_answers

    path = installed_checkpoint(tmp_path / "q", "qwen2_vl")
    out = tmp_path / "pope"
    cli.run(["pope", "--model", str(path), "--limit", "2", "--batch-size", "2", "--max-new-tokens", "2",
             "--device", "cpu", "--output", str(out), "--no-progress", "--method", "vcd,icd,m3id,pai,opera",
             "--pai-end-layer", str(tiny.TEXT_LAYERS)])
    for method in ("vcd", "icd", "m3id", "pai", "opera"):
        assert len(read_answers(out / method / "answers.jsonl")) == 2
    settings = {m: json.loads((out / m / "run.json").read_text()) for m in ("pai", "opera")}
    assert settings["opera"]["decoding"]["num_beams"] == 5 and settings["pai"]["decoding"]["num_beams"] == 1
    assert settings["pai"]["knobs"] == {"end_layer": tiny.TEXT_LAYERS}
    assert all("opera_rollbacks" in answer for answer in read_answers(out / "opera" / "answers.jsonl"))
