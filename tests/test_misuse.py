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
