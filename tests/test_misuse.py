"""Misuse of the public API (issue 11): every refusal says what to do, nothing is silently ignored."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hallupatch

WINDOW = dict(starting_layer=0, ending_layer=3)


def tiny_llama(seed=0):
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, max_position_embeddings=128, pad_token_id=0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 1.0 / p.shape[-1] ** 0.5)
    return model


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("config, error, message", [
    (dict(retracing_ratio=0.5), TypeError, r"MemVRConfig \(for 'memvr'\)"),
    (hallupatch.DoLaConfig(), TypeError, r"does not belong to method 'memvr'.*MemVRConfig"),
    ([hallupatch.MemVRConfig(**WINDOW), hallupatch.MemVRConfig(**WINDOW)], ValueError, "two MemVRConfig objects"),
])
def test_config_that_does_not_belong_to_the_method_is_refused(config, error, message):
    model = tiny_llama()
    with pytest.raises(error, match=message):
        hallupatch.apply(model, "memvr", config=config)
    assert getattr(model, "_hallupatch", None) is None and hook_count(model) == 0


def test_config_of_the_other_method_names_both_expected_classes():
    model = tiny_llama()
    with pytest.raises(TypeError, match=r"MemVRConfig \(for 'memvr'\), DoLaConfig \(for 'dola'\)"):
        hallupatch.apply(model, "memvr+dola", config=[hallupatch.MemVRConfig(**WINDOW), "high"])
    with pytest.raises(TypeError, match=r"DoLaConfig \(for 'dola'\)"):
        hallupatch.apply(model, "dola", config=hallupatch.MemVRConfig(**WINDOW))
    hallupatch.apply(model, "memvr+dola", config=[hallupatch.DoLaConfig(candidate_layers=[0]),
                                                   hallupatch.MemVRConfig(retracing_ratio=0.3, **WINDOW)])
    assert model._hallupatch.configs["memvr"].retracing_ratio == 0.3
    assert model._hallupatch.configs["dola"].candidate_layers == [0]


@pytest.mark.parametrize("seed", [2**64, 2**70, -1])
def test_dola_seed_outside_the_generator_range_is_refused_at_apply(seed):
    with pytest.raises(ValueError, match=r"0 <= seed < 2\*\*64"):
        hallupatch.apply(tiny_llama(), "dola", candidate_layers=[0, 2], layer_prior=[0.0, 1.0], seed=seed)


def test_largest_dola_seed_generates():
    model = hallupatch.apply(tiny_llama(), "dola", candidate_layers=[0, 2], layer_prior=[0.0, 1.0], seed=2**64 - 1)
    with pytest.warns(UserWarning, match="repetition_penalty"):
        out = model.generate(torch.tensor([[5, 17, 33]]), max_new_tokens=2, do_sample=False)
    assert out.shape == (1, 5)


def test_early_exit_logits_explains_wrong_arguments():
    import numpy as np

    model = tiny_llama()
    ids = torch.tensor([[5, 17, 33]])
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
        expected = model.lm_head(model.model.norm(hidden[2]))
        assert torch.equal(hallupatch.early_exit_logits(model, hidden, np.int64(2)), expected)
        with pytest.raises(TypeError, match="layer must be an int hidden-state index in \\[0, 4\\].*float"):
            hallupatch.early_exit_logits(model, hidden, 2.0)
        with pytest.raises(TypeError, match="layer must be an int"):
            hallupatch.early_exit_logits(model, hidden, "2")
        with pytest.raises(ValueError, match=r"model's hidden size 32 \(\.\.\., 32\); got shape \(1, 3, 16\)"):
            hallupatch.early_exit_logits(model, torch.zeros(1, 3, 16), 2)
        with pytest.raises(TypeError, match="torch.from_numpy"):
            hallupatch.early_exit_logits(model, hidden[2].numpy(), 2)
        out = model.generate(ids, max_new_tokens=2, do_sample=False, output_hidden_states=True,
                             return_dict_in_generate=True)
        with pytest.raises(TypeError, match=r"one hidden-state tuple per generated step.*out.hidden_states\[step\]"):
            hallupatch.early_exit_logits(model, out.hidden_states, 2)
        assert torch.equal(hallupatch.early_exit_logits(model, out.hidden_states[1], 2),
                           model.lm_head(model.model.norm(out.hidden_states[1][2])))
        with pytest.raises(ValueError, match="has 3 entries; this model's output_hidden_states tuple has 5"):
            hallupatch.early_exit_logits(model, hidden[:3], 2)


def test_patched_block_on_a_patched_model_restores_the_previous_patch():
    model = tiny_llama()
    ids = torch.tensor([[5, 17, 33, 8]])
    memory = torch.randn(6, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        vanilla = model(ids).logits
        hallupatch.apply(model, "memvr", entropy_threshold=0.0, retracing_ratio=0.4, **WINDOW)
        hallupatch.set_visual_memory(model, memory)
        before = model(ids).logits
        assert not torch.equal(before, vanilla)
        hooks = hook_count(model)
        with hallupatch.patched(model, "dola", candidate_layers=[0, 2]):
            assert list(model._hallupatch.methods) == ["dola"]
            hallupatch.set_visual_memory(model, None)
        assert list(model._hallupatch.methods) == ["memvr"] and hook_count(model) == hooks
        assert model._hallupatch.configs["memvr"].retracing_ratio == 0.4
        assert torch.equal(model(ids).logits, before), "the previous config and its visual memory are back"
        with pytest.raises(RuntimeError, match="inside"):
            with hallupatch.patched(model, "memvr", retracing_ratio=0.9, **WINDOW):
                raise RuntimeError("inside")
        assert torch.equal(model(ids).logits, before)
        hallupatch.remove(model)
        with hallupatch.patched(model, "memvr", **WINDOW):
            pass
        assert getattr(model, "_hallupatch", None) is None and hook_count(model) == 0
        assert torch.equal(model(ids).logits, vanilla)


# -- captured visual tokens live for one top-level call --------------------------------------------------
MEMVR_ALWAYS = dict(entropy_threshold=0.0, retracing_ratio=0.9, starting_layer=0, ending_layer=5)
TEXT_ONLY = "USER: what is a dog ? ASSISTANT:"
GENERATE = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)


def assert_same_generation(a, b):
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits):
        assert torch.equal(x, y)


def test_failed_generate_after_the_projector_ran_leaves_no_image_behind(llava, tiny_llava_dir):
    from conftest import load_llava
    from hallupatch.testing.tiny import tiny_image

    model, processor = llava
    untouched, _ = load_llava(tiny_llava_dir)
    two_images = processor(text="USER: <image>\nwhat is this ? ASSISTANT:", images=[tiny_image(0), tiny_image(1)],
                           return_tensors="pt")
    hallupatch.apply(model, "memvr", **MEMVR_ALWAYS)
    with pytest.raises(ValueError, match="number of image"):
        model.generate(**two_images, max_new_tokens=2)   # the projector runs, then the merge refuses
    with pytest.raises(ValueError, match="number of image"):
        model(**two_images)
    text = processor.tokenizer([TEXT_ONLY], return_tensors="pt")
    assert_same_generation(model.generate(**text, **GENERATE), untouched.generate(**text, **GENERATE))
    assert hallupatch.get_trace(model).trigger_layers() == [[None] * 4]


def test_projector_run_by_hand_is_no_image_of_the_next_prompt(llava, tiny_llava_dir):
    from conftest import load_llava
    from hallupatch.testing.tiny import tiny_image

    model, processor = llava
    untouched, _ = load_llava(tiny_llava_dir)
    hallupatch.apply(model, "memvr", **MEMVR_ALWAYS)
    pixels = processor(text="<image>", images=tiny_image(2), return_tensors="pt").pixel_values
    features = model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    model.multi_modal_projector(features)   # e.g. extracting image features
    text = processor.tokenizer([TEXT_ONLY], return_tensors="pt")
    assert_same_generation(model.generate(**text, **GENERATE), untouched.generate(**text, **GENERATE))
    assert torch.equal(model(**text).logits, untouched(**text).logits)


# -- empty and all-zero visual memory ----------------------------------------------------------------
@pytest.mark.parametrize("tokens, message", [
    (torch.zeros(1, 5, 32), r"sample 0's visual tokens are all zero \(mean \|Z\| = 0\)"),
    (torch.zeros(1, 0, 32), "sample 0's visual tokens are empty"),
    ([torch.randn(4, 32), torch.zeros(3, 32)], "sample 1's visual tokens are all zero"),
    ([torch.full((2, 32), float("nan"))], "sample 0's visual tokens are not all finite"),
])
def test_user_given_empty_or_zero_memory_is_refused(tokens, message):
    model = hallupatch.apply(tiny_llama(), "memvr", **WINDOW)
    with pytest.raises(ValueError, match=message):
        hallupatch.set_visual_memory(model, tokens)
    assert model._hallupatch.explicit_memory is None


def test_captured_all_zero_image_is_skipped_and_said_so(llava, tiny_llava_dir):
    from conftest import load_llava
    from hallupatch.testing.tiny import tiny_image

    model, processor = llava
    untouched, _ = load_llava(tiny_llava_dir)
    for m in (model, untouched):   # a projector whose output is all zero
        m.multi_modal_projector.linear_2.weight.zero_()
        m.multi_modal_projector.linear_2.bias.zero_()
    inputs = processor(text="USER: <image>\nwhat is this ? ASSISTANT:", images=tiny_image(0), return_tensors="pt")
    hallupatch.apply(model, "memvr", **MEMVR_ALWAYS)
    out = model.generate(**inputs, **GENERATE)
    assert all(torch.isfinite(step).all() for step in out.logits)
    assert_same_generation(out, untouched.generate(**inputs, **GENERATE))
    trace = hallupatch.get_trace(model)
    assert trace.trigger_layers() == [[None] * 4]
    assert all(p.skipped == ["visual memory is all zero (mean |Z| = 0): not retraced"] for p in trace.passes)
    assert trace.to_dict()["passes"][0]["skipped"] == trace.passes[0].skipped


# -- MemVR is per forward pass: generate() warns where a pass covers many positions -------------------------
def memvr_warnings(model, **kwargs):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.generate(torch.tensor([[5, 17, 33]]), max_new_tokens=3, do_sample=False, **kwargs)
    return [w for w in caught if "MemVR decides per forward pass" in str(w.message)]


def test_generate_without_cache_or_with_an_assistant_warns_once():
    model = hallupatch.apply(tiny_llama(), "memvr", **WINDOW)
    hallupatch.set_visual_memory(model, torch.randn(6, 32))
    assert memvr_warnings(model) == []
    no_cache = memvr_warnings(model, use_cache=False)
    assert len(no_cache) == 1 and "use_cache=False" in str(no_cache[0].message)
    assert no_cache[0].filename == __file__, "the warning points at the caller of generate()"
    assisted = memvr_warnings(model, assistant_model=tiny_llama(seed=1))
    assert len(assisted) == 1 and "assisted generation" in str(assisted[0].message)
    assert memvr_warnings(model, prompt_lookup_num_tokens=2, min_new_tokens=3)[0].filename == __file__


# -- gradient checkpointing recomputes layers: refused -------------------------------------------------
def test_gradient_checkpointing_in_training_is_refused_at_apply_and_at_forward():
    ids = torch.tensor([[5, 17, 33, 8]])
    model = tiny_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    with pytest.raises(ValueError, match="gradient checkpointing in training mode.*model.eval()"):
        hallupatch.apply(model, "memvr", **WINDOW)
    assert getattr(model, "_hallupatch", None) is None and hook_count(model) == 0
    model.eval()
    hallupatch.apply(model, "memvr", entropy_threshold=0.0, **WINDOW)
    hallupatch.set_visual_memory(model, torch.randn(6, 32))
    model.train()   # turned on after apply: refused when the model is called
    with torch.enable_grad():
        with pytest.raises(ValueError, match="gradient_checkpointing_disable"):
            model(ids, labels=ids, use_cache=False).loss.backward()
        model.gradient_checkpointing_disable()
        model(ids, labels=ids, use_cache=False).loss.backward()   # without checkpointing: trains
    assert hallupatch.get_trace(model).passes[0].trigger_layer == [1]


# -- generation modes that widen the batch --------------------------------------------------------------
def test_contrastive_search_retraces_every_candidate_with_its_samples_memory():
    """Each candidate row of contrastive search is one cached decoding step of its sequence: the logits
    generate() reports for step t equal a cached step-by-step forward of the chosen tokens, alone."""
    model = hallupatch.apply(tiny_llama(), "memvr", entropy_threshold=0.0, retracing_ratio=0.5, **WINDOW)
    hallupatch.set_visual_memory(model, torch.randn(6, 32, generator=torch.Generator().manual_seed(4)))
    ids = torch.tensor([[5, 17, 33, 8]])
    out = model.generate(ids, penalty_alpha=0.6, top_k=3, max_new_tokens=4, output_logits=True,
                         return_dict_in_generate=True)
    widened = hallupatch.get_trace(model).passes[1]
    assert len(widened.trigger_layer) == 3 and widened.trigger_layer == [1, 1, 1]
    step = model(ids, use_cache=True)
    torch.testing.assert_close(out.logits[0], step.logits[:, -1], rtol=0, atol=0)
    for t in range(1, 4):
        step = model(out.sequences[:, ids.shape[1] + t - 1:ids.shape[1] + t], past_key_values=step.past_key_values,
                     use_cache=True)
        torch.testing.assert_close(out.logits[t], step.logits[:, -1], rtol=1e-5, atol=1e-5)
        assert hallupatch.get_trace(model).passes[-1].trigger_layer == [1]
    hallupatch.remove(model)
    assert not torch.allclose(model(out.sequences).logits[:, -1], step.logits[:, -1], atol=1e-3)


def test_beams_and_return_sequences_repeat_the_explicit_memory_per_row():
    model = hallupatch.apply(tiny_llama(), "memvr", entropy_threshold=0.0, retracing_ratio=0.5, **WINDOW)
    memory = torch.randn(6, 32, generator=torch.Generator().manual_seed(5))
    ids = torch.tensor([[5, 17, 33, 8]])
    kwargs = dict(num_beams=3, num_return_sequences=2, max_new_tokens=3, do_sample=False)
    hallupatch.set_visual_memory(model, memory)
    once = model.generate(ids, **kwargs)
    hallupatch.set_visual_memory(model, [memory] * 3)   # already one entry per beam row
    assert torch.equal(model.generate(ids, **kwargs), once)
    assert hallupatch.get_trace(model).passes[0].trigger_layer == [1, 1, 1]
    hallupatch.set_visual_memory(model, [memory] * 2)
    with pytest.raises(ValueError, match="one entry per sample"):
        model.generate(ids, **kwargs)


# -- copies and pickles of a patched model ----------------------------------------------------------
DOLA = dict(candidate_layers=[0, 2], layer_prior=[0.3, 0.7], seed=7)


def dola_generate(model, ids):
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="repetition_penalty")
        return model.generate(ids, max_new_tokens=4, do_sample=False)


def test_deepcopy_with_layer_contrast_is_an_independent_patched_model():
    import copy

    ids = torch.tensor([[5, 17, 33, 8]])
    model = hallupatch.apply(tiny_llama(), "dola", **DOLA)
    expected = dola_generate(model, ids)
    original_trace = hallupatch.get_trace(model, "dola")
    layers = original_trace.layers()
    twin = copy.deepcopy(model)
    patch = twin._hallupatch
    assert patch is not model._hallupatch and patch.model is twin and patch.parts.lm_head is twin.lm_head
    assert patch.configs["dola"].to_dict() == model._hallupatch.configs["dola"].to_dict()
    with torch.no_grad():
        twin.lm_head.weight.mul_(-1.0)
    reference = tiny_llama()
    with torch.no_grad():
        reference.lm_head.weight.mul_(-1.0)
    hallupatch.apply(reference, "dola", **DOLA)
    assert torch.equal(dola_generate(twin, ids), dola_generate(reference, ids))
    assert hallupatch.get_trace(model, "dola") is original_trace and original_trace.layers() == layers
    assert torch.equal(dola_generate(model, ids), expected), "the original reads its own weights"
    hallupatch.remove(twin)
    assert model._hallupatch is not None and hook_count(model) > 0 and hook_count(twin) == 0


def test_deepcopy_with_memvr_and_explicit_memory_works_on_its_own_copy_of_the_memory():
    import copy

    ids = torch.tensor([[5, 17, 33, 8]])
    model = hallupatch.apply(tiny_llama(), "memvr", entropy_threshold=0.0, retracing_ratio=0.5, **WINDOW)
    memory = torch.randn(6, 32, generator=torch.Generator().manual_seed(6))
    hallupatch.set_visual_memory(model, memory)
    expected = model(ids).logits
    twin = copy.deepcopy(model)
    assert torch.equal(twin(ids).logits, expected)
    assert hallupatch.get_trace(twin).passes[0].trigger_layer == [1]
    copied = twin._hallupatch.explicit_memory[0]
    assert torch.equal(copied, memory) and copied.data_ptr() != memory.data_ptr()
    hallupatch.set_visual_memory(twin, None)
    assert torch.equal(model(ids).logits, expected), "the original keeps its memory"
    hallupatch.remove(model)
    assert torch.equal(twin(ids).logits, model(ids).logits), "the copy without memory is the plain model"


def test_pickled_patched_model_loads_patched_and_remove_gives_the_plain_model(llava):
    import io
    import pickle

    from hallupatch.testing.tiny import tiny_image

    model, processor = llava
    inputs = processor(text="USER: <image>\nwhat is this ? ASSISTANT:", images=tiny_image(1), return_tensors="pt")
    vanilla = model(**inputs).logits
    hallupatch.apply(model, "memvr+dola", config=[hallupatch.MemVRConfig(**MEMVR_ALWAYS),
                                                   hallupatch.DoLaConfig(candidate_layers=[0, 2])])
    expected = model.generate(**inputs, **GENERATE)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert loaded._hallupatch.model is loaded
    assert_same_generation(loaded.generate(**inputs, **GENERATE), expected)
    assert hallupatch.get_trace(loaded).trigger_layers()[0] == [1] * 4
    again = pickle.loads(pickle.dumps(hallupatch.remove(loaded)))
    assert getattr(again, "_hallupatch", None) is None and hook_count(again) == 0
    assert torch.equal(again(**inputs).logits, vanilla)
