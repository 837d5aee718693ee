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
