"""apply()/remove() through PEFT's PeftModel and torch.compile (issue 21, item 11).

The reference for a PEFT-wrapped model is the same weights without the wrapper (``merge_and_unload()``)
patched the plain way; for a compiled model, the eager model patched the plain way.
"""
import copy

import pytest
import torch

import hallupatch
from hallupatch.testing.families import tiny_text_decoder
from hallupatch.testing.tiny import tiny_image, tiny_llava

peft = pytest.importorskip("peft")

# every sample retraces in every checked layer; the SiLU adapter makes s_k = mean|W_in| / mean|Z| matter,
# so a LoRA delta on up_proj that hallupatch ignored would change the result
KNOBS = dict(method="memvr", entropy_threshold=0.0, starting_layer=0, ending_layer=3, adapter_activation="silu")
LORA = dict(r=4, target_modules=["q_proj", "up_proj"], init_lora_weights=False)  # random A and B: a real delta


def llava_inputs(processor):
    return processor(text=["<image>\nUSER: what is here ASSISTANT:"], images=[tiny_image(0)], return_tensors="pt")


def patched_logits(model, inputs):
    hallupatch.apply(model, **KNOBS)
    try:
        return model(**inputs).logits
    finally:
        hallupatch.remove(model)


@pytest.mark.parametrize("merged", [False, True], ids=["adapters", "merged-adapters"])
def test_peft_llava_is_patched_through_the_wrapper(merged):
    model, processor = tiny_llava(seed=0)
    inputs = llava_inputs(processor)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**LORA))
    reference_model = copy.deepcopy(wrapped).merge_and_unload()
    if merged:
        wrapped.merge_adapter()
    plain = wrapped(**inputs).logits
    expected = patched_logits(reference_model, inputs)

    assert hallupatch.apply(wrapped, **KNOBS) is wrapped
    got = wrapped(**inputs).logits
    assert not torch.allclose(expected, plain, atol=1e-3)  # the patch changes this model's output
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    generated = wrapped.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3
    assert hallupatch.get_trace(wrapped).trigger_layers() == [[1, 1, 1]]  # every step: after layer 1 (starting_layer is exclusive)

    hallupatch.remove(wrapped)
    assert torch.equal(wrapped(**inputs).logits, plain)


def test_peft_llama_with_explicit_visual_tokens():
    model = tiny_text_decoder("llama", seed=1)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**LORA))
    reference_model = copy.deepcopy(wrapped).merge_and_unload()
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    memory = torch.randn(6, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    plain = wrapped(input_ids=ids).logits

    hallupatch.apply(reference_model, **KNOBS)
    hallupatch.set_visual_memory(reference_model, memory)
    expected = reference_model(input_ids=ids).logits

    hallupatch.apply(wrapped, **KNOBS)  # refused as an unsupported architecture before
    hallupatch.set_visual_memory(wrapped, memory)
    torch.testing.assert_close(wrapped(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, plain, atol=1e-3)
    hallupatch.remove(wrapped)
    assert torch.equal(wrapped(input_ids=ids).logits, plain)


def test_peft_prompt_learning_is_refused_with_what_works():
    model = tiny_text_decoder("llama", seed=1)
    wrapped = peft.get_peft_model(model, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(TypeError, match="prompt learning.*LoRA"):
        hallupatch.apply(wrapped, **KNOBS)
    assert not hasattr(model, "_hallupatch")


def test_apply_after_compiling_and_warming_up_patches_the_compiled_model():
    model, processor = tiny_llava(seed=0)
    inputs = llava_inputs(processor)
    plain = model(**inputs).logits
    expected = patched_logits(copy.deepcopy(model), inputs)

    compiled = torch.compile(model, backend="eager")  # dynamo's tracing, without a C++ toolchain
    torch.testing.assert_close(compiled(**inputs).logits, plain)   # warmed up: code compiled without hooks
    assert hallupatch.apply(compiled, **KNOBS) is compiled
    torch.testing.assert_close(compiled(**inputs).logits, expected, atol=1e-5, rtol=1e-5)
    generated = compiled.generate(**inputs, max_new_tokens=2, do_sample=False)   # raised StopIteration
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 2
    assert hallupatch.get_trace(compiled).trigger_layers() == [[1, 1]]

    hallupatch.remove(compiled)
    torch.testing.assert_close(compiled(**inputs).logits, plain)   # compiled code with hooks is discarded


def test_patch_then_compile_after_another_instance_was_compiled():
    """TorchDynamo shares compiled code between instances of a class and does not check hooks: a patched
    model compiled after an unpatched one of the same class must not run the unpatched code."""
    first, processor = tiny_llava(seed=0)
    inputs = llava_inputs(processor)
    torch.compile(first, backend="eager")(**inputs)
    second, _ = tiny_llava(seed=0)
    expected = patched_logits(copy.deepcopy(second), inputs)
    hallupatch.apply(second, **KNOBS)
    torch.testing.assert_close(torch.compile(second, backend="eager")(**inputs).logits, expected,
                               atol=1e-5, rtol=1e-5)
