"""MemVR on the llama family, checked against the independent float64 reference."""
import pytest
import torch

import hallupatch
from hallupatch.testing.tiny import tiny_image
from memvr_reference import double_copy, llava_inputs_embeds, memvr_reference

PROMPTS = [
    "USER: <image>\nwhat is in the picture ? ASSISTANT:",
    "USER: <image>\nis there a dog in the image ? please answer yes or no . ASSISTANT:",
    "USER: <image>\nhow many people ? ASSISTANT:",
    "USER: <image>\ndescribe the scene in detail . what color is the car on the left ? ASSISTANT:",
]
WINDOW = dict(starting_layer=0, ending_layer=5)  # checked layers 1..4 of the 6-layer tiny model


def one_sample(processor, index):
    return processor(text=PROMPTS[index], images=tiny_image(index), return_tensors="pt")


def reference_for(model, inputs, **knobs):
    embeds, memory = llava_inputs_embeds(model, inputs.input_ids[0], inputs.pixel_values)
    lm = double_copy(model.language_model)
    return memvr_reference(
        lm, embeds, memory, ratio=knobs["retracing_ratio"], threshold=knobs["entropy_threshold"],
        start=knobs["starting_layer"], end=knobs["ending_layer"],
    )


def thresholds_by_trigger_layer(entropies, margin=0.01):
    """For each checked layer k that can be the first to exceed some threshold, one such threshold
    at least ``margin`` away from every entropy (so float32 vs float64 noise cannot flip it)."""
    chosen = {}
    layers = sorted(entropies)
    for i, k in enumerate(layers):
        below = max([entropies[j] for j in layers[:i]], default=0.0)
        if entropies[k] - below > 2 * margin:
            chosen[k] = (below + entropies[k]) / 2
    return chosen


@pytest.mark.parametrize("sample", [0, 1])
def test_forward_logits_match_float64_reference(llava, sample):
    model, processor = llava
    inputs = one_sample(processor, sample)
    knobs = dict(retracing_ratio=0.5, **WINDOW)
    _, _, entropies = reference_for(model, inputs, entropy_threshold=2.0, **knobs)
    cases = thresholds_by_trigger_layer(entropies)
    assert cases, f"the tiny model gives no separable entropies: {entropies}"
    cases[None] = 1.5  # never triggers: normalised entropy is at most 1
    vanilla = model(**inputs).logits[0]
    for expected_layer, threshold in cases.items():
        ref_logits, ref_trigger, _ = reference_for(model, inputs, entropy_threshold=threshold, **knobs)
        assert ref_trigger == expected_layer
        hallupatch.apply(model, "memvr", entropy_threshold=threshold, **knobs)
        logits = model(**inputs).logits[0]
        trace = hallupatch.get_trace(model)
        hallupatch.remove(model)
        assert trace.passes[0].trigger_layer == [expected_layer]
        torch.testing.assert_close(logits.double(), ref_logits, rtol=1e-4, atol=1e-4)
        if expected_layer is None:
            assert torch.equal(logits, vanilla)
        else:
            assert (logits - vanilla).abs().max() > 1e-3, "retracing must change the logits"
        recorded = trace.passes[0].entropies[0]
        for layer, value in recorded.items():
            assert value == pytest.approx(entropies[layer], abs=1e-4)


def test_trace_records_every_pass_and_agrees_with_threshold(llava):
    model, processor = llava
    inputs = one_sample(processor, 0)
    hallupatch.apply(model, "memvr", entropy_threshold=0.6, retracing_ratio=0.3, **WINDOW)
    model.generate(**inputs, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    trace = hallupatch.get_trace(model)
    assert len(trace.passes) == 4 and trace.passes[0].is_prefill and not trace.passes[1].is_prefill
    for p in trace.passes:
        entropies = p.entropies[0]
        fired = [layer for layer, h in sorted(entropies.items()) if h > 0.6]
        assert p.trigger_layer[0] == (fired[0] if fired else None)
        if fired:  # checking stops once the sample has triggered in this pass
            assert max(entropies) == fired[0]
    assert trace.to_dict()["passes"][0]["trigger_layer"] == trace.passes[0].trigger_layer


def test_batch_with_left_padding_equals_each_prompt_alone(llava):
    model, processor = llava
    knobs = dict(entropy_threshold=0.7, retracing_ratio=0.4, **WINDOW)
    hallupatch.apply(model, "memvr", **knobs)
    singles = []
    for i in range(4):
        inputs = one_sample(processor, i)
        out = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        singles.append((out[0, inputs.input_ids.shape[1]:].tolist(), hallupatch.get_trace(model).trigger_layers()[0]))
    batch = processor(text=PROMPTS, images=[tiny_image(i) for i in range(4)], return_tensors="pt", padding=True)
    assert processor.tokenizer.padding_side == "left"
    assert len({len(processor.tokenizer(p).input_ids) for p in PROMPTS}) == 4, "prompts must differ in length"
    out = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    batch_triggers = hallupatch.get_trace(model).trigger_layers()
    fired_somewhere = False
    for i, (tokens, triggers) in enumerate(singles):
        assert out[i, batch.input_ids.shape[1]:].tolist() == tokens
        assert batch_triggers[i] == triggers
        fired_somewhere |= any(t is not None for t in triggers)
    assert fired_somewhere


def test_padded_forward_logits_equal_single_forward(llava):
    """Entropy at each sample's last real position, means over real positions only: right padding in a
    plain forward changes nothing per sample."""
    model, processor = llava
    processor.tokenizer.padding_side = "right"
    batch = processor(text=PROMPTS[:2], images=[tiny_image(0), tiny_image(1)], return_tensors="pt", padding=True)
    assert not batch.attention_mask.all()
    seen_triggers = set()
    for threshold in (0.0, 0.5, 0.6, 0.7, 0.8, 0.9):
        hallupatch.apply(model, "memvr", entropy_threshold=threshold, retracing_ratio=0.5, **WINDOW)
        batched = model(**batch).logits
        batch_triggers = hallupatch.get_trace(model).passes[0].trigger_layer
        for i in range(2):
            alone = model(**one_sample(processor, i)).logits[0]
            assert batch_triggers[i] == hallupatch.get_trace(model).passes[0].trigger_layer[0]
            seen_triggers.add(batch_triggers[i])
            torch.testing.assert_close(batched[i, : alone.shape[0]], alone, rtol=1e-4, atol=1e-5)
    assert len(seen_triggers) >= 3, "thresholds should move the trigger across layers"


def test_text_only_prompt_after_image_sees_no_stale_memory(llava, tiny_llava_dir):
    from conftest import load_llava

    model, processor = llava
    untouched, _ = load_llava(tiny_llava_dir)
    text = processor.tokenizer(["USER: what is a dog ? ASSISTANT:"], return_tensors="pt")
    hallupatch.apply(model, "memvr", entropy_threshold=0.0, retracing_ratio=0.9, **WINDOW)
    model.generate(**one_sample(processor, 0), max_new_tokens=3, do_sample=False)
    assert hallupatch.get_trace(model).trigger_layers()[0][0] is not None
    patched_out = model.generate(**text, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    plain_out = untouched.generate(**text, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(patched_out.sequences, plain_out.sequences)
    for a, b in zip(patched_out.logits, plain_out.logits):
        assert torch.equal(a, b)
    assert hallupatch.get_trace(model).trigger_layers() == [[None] * 5]


def test_remove_and_patched_block_restore_bit_identical_outputs(llava, tiny_llava_dir):
    from conftest import load_llava

    model, processor = llava
    untouched, _ = load_llava(tiny_llava_dir)
    inputs = one_sample(processor, 1)
    expected = untouched(**inputs).logits
    hooks_before = _hook_count(model)
    with hallupatch.patched(model, "memvr", entropy_threshold=0.0, retracing_ratio=0.5, **WINDOW) as same:
        assert same is model
        assert not torch.equal(model(**inputs).logits, expected)
    assert torch.equal(model(**inputs).logits, expected)
    assert _hook_count(model) == hooks_before
    hallupatch.apply(model, "memvr", entropy_threshold=0.0, **WINDOW)
    assert hallupatch.remove(model) is model
    assert torch.equal(model(**inputs).logits, expected)
    hallupatch.remove(model)  # no-op on an unpatched model
    assert torch.equal(model(**inputs).logits, expected)


def test_apply_twice_keeps_only_the_last_configuration(llava, tiny_llava_dir):
    from conftest import load_llava

    model, processor = llava
    fresh, _ = load_llava(tiny_llava_dir)
    inputs = one_sample(processor, 2)
    hallupatch.apply(model, "memvr", entropy_threshold=0.0, retracing_ratio=0.9, **WINDOW)
    hooks_once = _hook_count(model)
    hallupatch.apply(model, "memvr", entropy_threshold=0.0, retracing_ratio=0.2, **WINDOW)
    assert _hook_count(model) == hooks_once
    hallupatch.apply(fresh, "memvr", entropy_threshold=0.0, retracing_ratio=0.2, **WINDOW)
    assert torch.equal(model(**inputs).logits, fresh(**inputs).logits)


def test_family_defaults_and_config_object(llava):
    model, _ = llava
    defaults = hallupatch.MemVRConfig()
    assert (defaults.retracing_ratio, defaults.entropy_threshold, defaults.starting_layer, defaults.ending_layer) == (
        0.12, 0.75, 5, 16)
    hallupatch.apply(model, **WINDOW)
    config = model._hallupatch.configs["memvr"]
    assert (config.retracing_ratio, config.entropy_threshold) == (0.12, 0.75)
    hallupatch.apply(model, "memvr", config=hallupatch.MemVRConfig(starting_layer=1, ending_layer=4), retracing_ratio=0.3)
    config = model._hallupatch.configs["memvr"]
    assert (config.starting_layer, config.ending_layer, config.retracing_ratio) == (1, 4, 0.3)


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
