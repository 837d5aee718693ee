"""Layer contrast inside plain ``generate()`` on the tiny LLaVA, checked step by step against an
independent float64 re-computation of DESIGN §4c from ``output_hidden_states`` and ``output_logits``."""
import math
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlavaForConditionalGeneration, LogitsProcessor, LogitsProcessorList

import hallupatch
from hallupatch.engine import get_patch
from hallupatch.methods.dola import tied_embeddings
from hallupatch.testing.tiny import build_tiny_llava_checkpoint, tiny_image

PROMPTS = [
    "USER: <image>\nwhat is in the picture? ASSISTANT:",
    "USER: <image>\nhow many dogs are there in this image? describe the scene. ASSISTANT:",
]
ALL = [0, 1, 2, 3]  # every hidden-state index below N = 4


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    path = build_tiny_llava_checkpoint(tmp_path_factory.mktemp("tiny_llava"), seed=0)
    from transformers import LlavaProcessor

    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    processor = LlavaProcessor.from_pretrained(path)
    return model, processor


@pytest.fixture(autouse=True)
def _unpatch(llava):
    yield
    hallupatch.remove(llava[0])


def _inputs(processor, prompts, seeds):
    return processor(text=list(prompts), images=[tiny_image(s) for s in seeds], return_tensors="pt", padding=True)


def _quiet_generate(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return model.generate(**kwargs)


# ---------------------------------------------------------------- the independent re-computation (float64, loops)
def _softmax(x):
    return torch.softmax(x.double(), -1)


def _ref_divergence(f, g):
    pf, pg = _softmax(f), _softmax(g)
    mix = (pf + pg) / 2
    v = f.shape[-1]
    kl_f = sum(mix[i] * (math.log(mix[i]) - math.log(pf[i])) for i in range(v)) / v
    kl_g = sum(mix[i] * (math.log(mix[i]) - math.log(pg[i])) for i in range(v)) / v
    return 0.5 * float(kl_f + kl_g)


def _ref_contrast(f, g):
    lf, lg = torch.log_softmax(f.double(), -1), torch.log_softmax(g.double(), -1)
    threshold = lf.max() + math.log(0.1)
    out = torch.full_like(lf, -math.inf)
    for i in range(lf.shape[0]):
        if lf[i] >= threshold:
            out[i] = lf[i] - lg[i]
    return out


def _ref_repetition_penalty(scores, previous_ids, penalty):
    out = scores.clone()
    for token in set(previous_ids):
        s = out[token]
        out[token] = s * penalty if s < 0 else s / penalty
    return out


def _ref_top_k(scores, k):
    threshold = torch.sort(scores, descending=True).values[k - 1]
    return torch.where(scores >= threshold, scores, torch.full_like(scores, -math.inf))


@torch.no_grad()
def _premature_logits(model, hidden_states, layer, row, norm=False):
    h = hidden_states[layer][row, -1].double()
    if norm:
        h = model.language_model.model.norm(h.float()).double()
    return h @ model.language_model.lm_head.weight.double().T


@torch.no_grad()
def _reference_steps(model, out, candidates, prompt_len, post=None, norm=False):
    """Per step and row: (divergences, argmax position, expected scores) from the generate() outputs."""
    n = model.config.text_config.num_hidden_layers
    steps = []
    for t, hidden_states in enumerate(out.hidden_states):
        rows = []
        for b in range(out.sequences.shape[0]):
            final = out.logits[t][b]
            # output_logits is the uncontrasted final logits: the final-norm hidden state through the LM head
            torch.testing.assert_close(final.double(), _premature_logits(model, hidden_states, n, b), rtol=1e-4, atol=1e-4)
            prem = [_premature_logits(model, hidden_states, k, b, norm) for k in candidates]
            d = [_ref_divergence(final, g) for g in prem]
            best = max(range(len(d)), key=lambda i: d[i])
            expected = _ref_contrast(final, prem[best])
            if post is not None:
                expected = post(expected, out.sequences[b, : prompt_len + t].tolist())
            rows.append((d, best, expected, prem))
        steps.append(rows)
    return steps


def _assert_scores_equal(actual, expected):
    actual = actual.double()
    assert torch.equal(torch.isinf(actual), torch.isinf(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(actual[finite], expected[finite], rtol=1e-4, atol=1e-4)


class Recorder(LogitsProcessor):
    def __init__(self):
        self.seen = []

    def __call__(self, input_ids, scores):
        self.seen.append(scores.clone())
        return scores


# ---------------------------------------------------------------- greedy and sampling agree with §4c at every step
@pytest.mark.parametrize("norm", [False, True])
def test_greedy_matches_recomputation_every_step(llava, norm):
    model, processor = llava
    inputs = _inputs(processor, PROMPTS, [0, 1])
    hallupatch.apply(model, method="dola", candidate_layers=ALL, early_exit_norm=norm)
    recorder = Recorder()
    out = model.generate(
        **inputs, max_new_tokens=5, do_sample=False, repetition_penalty=1.3,
        logits_processor=LogitsProcessorList([recorder]),
        return_dict_in_generate=True, output_scores=True, output_logits=True, output_hidden_states=True,
    )
    prompt_len = inputs["input_ids"].shape[1]
    steps = _reference_steps(model, out, ALL, prompt_len, post=lambda s, prev: _ref_repetition_penalty(s, prev, 1.3), norm=norm)
    trace = hallupatch.get_layer_trace(model)
    assert len(steps) == len(out.scores) == 5
    for t, rows in enumerate(steps):
        for b, (d, best, expected, _) in enumerate(rows):
            _assert_scores_equal(out.scores[t][b], expected)
            # a user processor sees the contrasted (and repetition-penalised) scores
            _assert_scores_equal(recorder.seen[t][b], expected)
            assert trace.layers()[b][t] == ALL[best]
            assert trace.divergences[t][:, b].double().tolist() == pytest.approx(d, rel=1e-3, abs=1e-8)
            assert not torch.equal(out.scores[t][b], out.logits[t][b].float())


def test_sampling_matches_recomputation_every_step(llava):
    model, processor = llava
    inputs = _inputs(processor, PROMPTS, [2, 3])
    hallupatch.apply(model, method="dola", candidate_layers=[1, 2, 3])
    torch.manual_seed(0)
    out = _quiet_generate(
        model, **inputs, max_new_tokens=6, do_sample=True, temperature=0.7, top_k=3,
        return_dict_in_generate=True, output_scores=True, output_logits=True, output_hidden_states=True,
    )
    steps = _reference_steps(model, out, [1, 2, 3], inputs["input_ids"].shape[1], post=lambda s, prev: _ref_top_k(s / 0.7, 3))
    for t, rows in enumerate(steps):
        for b, (_, _, expected, _) in enumerate(rows):
            _assert_scores_equal(out.scores[t][b], expected)
            assert torch.isfinite(expected[out.sequences[b, inputs["input_ids"].shape[1] + t]])
    # the same seed gives the same sample
    torch.manual_seed(0)
    again = _quiet_generate(model, **inputs, max_new_tokens=6, do_sample=True, temperature=0.7, top_k=3)
    assert torch.equal(again, out.sequences)


def test_prior_sampling_frequencies_match_softmax_of_softmax_plus_prior(llava):
    model, processor = llava
    prior = [1.0, 0.0, -1.0, 0.5]
    inputs = _inputs(processor, PROMPTS * 2, [0, 1, 2, 3])
    hallupatch.apply(model, method="dola", candidate_layers=ALL, layer_prior=prior)
    torch.manual_seed(1)
    steps_count = 40
    out = _quiet_generate(
        model, **inputs, max_new_tokens=steps_count, min_new_tokens=steps_count, do_sample=False,
        return_dict_in_generate=True, output_logits=True, output_hidden_states=True,
    )
    trace = hallupatch.get_layer_trace(model)
    observed = torch.zeros(4, dtype=torch.float64)
    expected = torch.zeros(4, dtype=torch.float64)
    variance = torch.zeros(4, dtype=torch.float64)
    pi = torch.tensor(prior, dtype=torch.float64)
    for t, hidden_states in enumerate(out.hidden_states):
        for b in range(4):
            final = out.logits[t][b]
            d = torch.tensor([_ref_divergence(final, _premature_logits(model, hidden_states, k, b)) for k in ALL])
            p = torch.softmax(torch.softmax(d, -1) + pi, -1)
            expected += p
            variance += p * (1 - p)
            observed[ALL.index(trace.layers()[b][t])] += 1
    assert observed.sum() == 4 * steps_count
    assert [trace.counts()[layer] for layer in ALL] == observed.long().tolist()
    tolerance = 4 * variance.sqrt() + 1
    assert torch.all((observed - expected).abs() <= tolerance), (observed, expected)
    # the prior matters: without it the argmax layer would be taken every time
    assert (observed > 0).sum() >= 3


def test_seeded_prior_draws_are_reproducible_and_batch_independent(llava):
    model, processor = llava
    hallupatch.apply(model, method="dola", candidate_layers=ALL, layer_prior=[0.0, 0.5, 0.0, 0.5], seed=7)
    batch = _inputs(processor, PROMPTS, [0, 1])
    _quiet_generate(model, **batch, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    batched = hallupatch.get_layer_trace(model).layers()
    _quiet_generate(model, **batch, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert hallupatch.get_layer_trace(model).layers() == batched
    for b in range(2):
        single = _inputs(processor, PROMPTS[b : b + 1], [b])
        _quiet_generate(model, **single, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert hallupatch.get_layer_trace(model).layers()[0] == batched[b]


def test_mapping_prior_draws_equal_the_list_prior_in_candidate_order(llava):
    model, processor = llava
    batch = _inputs(processor, PROMPTS, [0, 1])
    hallupatch.apply(model, method="dola", candidate_layers=ALL, layer_prior=[0.0, 0.5, 0.0, 0.5], seed=7)
    _quiet_generate(model, **batch, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    from_list = hallupatch.get_layer_trace(model).layers()
    # the mapping form, keys in another order (as estimate_layer_prior returns or layer_prob.json holds)
    hallupatch.apply(model, method="dola", candidate_layers=ALL, layer_prior={"3": 0.5, "0": 0.0, "1": 0.5, "2": 0.0}, seed=7)
    assert get_patch(model).methods["dola"].prior.tolist() == [0.0, 0.5, 0.0, 0.5]
    _quiet_generate(model, **batch, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert hallupatch.get_layer_trace(model).layers() == from_list
    with pytest.raises(ValueError, match="not candidates"):
        hallupatch.apply(model, method="dola", candidate_layers=[0, 1], layer_prior={0: 0.5, 1: 0.2, 2: 0.3})


# ---------------------------------------------------------------- batch == single
def test_batch_equals_single_for_contrast_decoding(llava):
    model, processor = llava
    hallupatch.apply(model, method="dola", candidate_layers=ALL)
    batch = _inputs(processor, PROMPTS, [0, 1])
    assert (batch["attention_mask"] == 0).any()  # the shorter prompt is left-padded
    out = _quiet_generate(model, **batch, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_scores=True)
    layers = hallupatch.get_layer_trace(model).layers()
    for b in range(2):
        single = _inputs(processor, PROMPTS[b : b + 1], [b])
        alone = _quiet_generate(model, **single, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_scores=True)
        new_batch = out.sequences[b, batch["input_ids"].shape[1]:]
        new_single = alone.sequences[0, single["input_ids"].shape[1]:]
        assert torch.equal(new_batch[: len(new_single)], new_single)
        assert hallupatch.get_layer_trace(model).layers()[0] == layers[b][: len(new_single)]
        for t in range(len(alone.scores)):
            _assert_scores_equal(out.scores[t][b], alone.scores[t][0].double())


# ---------------------------------------------------------------- memvr+dola, remove, warnings, errors
def test_memvr_plus_dola_contrasts_the_retraced_hidden_states(llava):
    model, processor = llava
    inputs = _inputs(processor, PROMPTS[:1], [0])
    knobs = dict(starting_layer=0, ending_layer=3, entropy_threshold=0.0, retracing_ratio=0.5)
    hallupatch.apply(model, method="memvr+dola", candidate_layers=ALL, **knobs)
    out = _quiet_generate(model, **inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                          output_scores=True, output_logits=True, output_hidden_states=True)
    assert any(layer is not None for layer in hallupatch.get_trace(model).trigger_layers()[0])
    steps = _reference_steps(model, out, ALL, inputs["input_ids"].shape[1])
    for t, rows in enumerate(steps):
        _assert_scores_equal(out.scores[t][0], rows[0][2])
    hallupatch.apply(model, method="dola", candidate_layers=ALL)
    plain = _quiet_generate(model, **inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                            output_hidden_states=True)
    assert not torch.equal(plain.hidden_states[1][3], out.hidden_states[1][3])  # retracing changed layer 3's input


def test_remove_restores_bit_identical_generation(llava):
    model, processor = llava
    inputs = _inputs(processor, PROMPTS, [0, 1])
    kwargs = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_scores=True)
    before = model.generate(**inputs, **kwargs)
    hallupatch.apply(model, method="dola", candidate_layers=ALL)
    patched = _quiet_generate(model, **inputs, **kwargs)
    assert not all(torch.equal(a, b) for a, b in zip(before.scores, patched.scores))
    hallupatch.remove(model)
    assert "_get_logits_processor" not in vars(model)
    after = model.generate(**inputs, **kwargs)
    assert torch.equal(before.sequences, after.sequences)
    assert all(torch.equal(a, b) for a, b in zip(before.scores, after.scores))


def test_repetition_penalty_warning_once(llava):
    model, processor = llava
    inputs = _inputs(processor, PROMPTS[:1], [0])
    hallupatch.apply(model, method="dola", candidate_layers=ALL)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.generate(**inputs, max_new_tokens=2)
        model.generate(**inputs, max_new_tokens=2)
    messages = [str(w.message) for w in caught if "repetition_penalty" in str(w.message)]
    assert len(messages) == 1 and "1.2" in messages[0]
    hallupatch.apply(model, method="dola", candidate_layers=ALL)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.generate(**inputs, max_new_tokens=2, repetition_penalty=1.2)
    assert not [w for w in caught if "repetition_penalty" in str(w.message)]


def test_beam_search_is_refused(llava):
    model, processor = llava
    hallupatch.apply(model, method="dola")
    with pytest.raises(ValueError, match="num_beams"):
        _quiet_generate(model, **_inputs(processor, PROMPTS[:1], [0]), max_new_tokens=2, num_beams=2)


@pytest.mark.parametrize(
    "knobs, error, message",
    [
        (dict(candidate_layers="middle"), ValueError, "'low', 'high'"),
        (dict(candidate_layers=[-1]), ValueError, ">= 0"),
        (dict(candidate_layers=[4, 5]), ValueError, "no premature layer"),
        (dict(candidate_layers=[0, 1], layer_prior=[1.0]), ValueError, "one weight per candidate"),
        (dict(layer_prior=[float("nan")]), ValueError, "finite"),
        (dict(layer_prior="/no/such/prior.json"), FileNotFoundError, "/no/such/prior.json"),
        (dict(early_exit_norm="yes"), ValueError, "early_exit_norm"),
        (dict(seed=-3), ValueError, "seed"),
        (dict(dola_layers="high"), TypeError, "candidate_layers"),
    ],
)
def test_bad_knobs_are_clear_errors(llava, knobs, error, message):
    with pytest.raises(error, match=message):
        hallupatch.apply(llava[0], method="dola", **knobs)
    assert get_patch(llava[0]) is None


def test_low_high_follow_tied_embeddings(llava):
    model, _ = llava
    hallupatch.apply(model, method="dola", candidate_layers="low")
    assert not tied_embeddings(get_patch(model).parts)
    assert get_patch(model).methods["dola"].candidates == [0]      # untied, N = 4: range(0, 2, 2)
    hallupatch.apply(model, method="dola", candidate_layers="high")
    assert get_patch(model).methods["dola"].candidates == [2]      # range(2, 4, 2)
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, tie_word_embeddings=True)
    tied = LlamaForCausalLM(config).eval()
    hallupatch.apply(tied, method="dola", candidate_layers="low")
    try:
        assert tied_embeddings(get_patch(tied).parts)
        assert get_patch(tied).methods["dola"].candidates == [2]   # tied: start 2 == N // 2
        ids = torch.tensor([[1, 5, 7, 9]])
        out = _quiet_generate(tied, input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert out.shape == (1, 7)
    finally:
        hallupatch.remove(tied)


@pytest.mark.parametrize("n", [2, 8, 32, 48])
@pytest.mark.parametrize("tie", [False, True])
def test_candidate_layers_on_real_llama_configs(n, tie):
    from hallupatch.spec import resolve
    from hallupatch.methods.dola import DoLaConfig

    config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=n,
                         num_attention_heads=1, tie_word_embeddings=tie)
    parts = resolve(LlamaForCausalLM(config))
    assert tied_embeddings(parts) is tie
    start = (2 if n > 2 else 1) if tie else 0
    low = [start] if start == n // 2 else list(range(start, n // 2 if n <= 40 else 20, 2))
    high = list(range(n // 2, n, 2)) if n <= 40 else list(range(n - 20, n, 2))
    assert DoLaConfig(candidate_layers="low").layers_for(parts) == low
    assert DoLaConfig(candidate_layers="high").layers_for(parts) == high
    assert DoLaConfig(candidate_layers=[0, n - 1, n]).layers_for(parts) == [0, n - 1]


def test_readme_example_runs(capsys):
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Layer contrast (DoLa) and layer priors", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "assistant" in printed and "[[" in printed


def test_without_cache_every_pass_is_a_prefill_but_decoding_is_unchanged(llava):
    model, processor = llava
    inputs = _inputs(processor, PROMPTS, [0, 1])
    hallupatch.apply(model, method="dola", candidate_layers=ALL, layer_prior=[0.2, 0.0, 0.4, 0.1], seed=5)
    kwargs = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_scores=True)
    cached = _quiet_generate(model, **inputs, **kwargs)
    cached_layers = hallupatch.get_layer_trace(model).layers()
    uncached = _quiet_generate(model, **inputs, use_cache=False, **kwargs)
    assert hallupatch.get_layer_trace(model).layers() == cached_layers
    assert len(cached_layers[0]) == len(cached.scores) == 5
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.scores, uncached.scores):
        _assert_scores_equal(a, b.double())


def test_shared_knob_and_separate_configs_for_memvr_plus_dola(llava):
    model, _ = llava
    with pytest.raises(ValueError, match=r"\['early_exit_norm'\] belong to several of the methods"):
        hallupatch.apply(model, method="memvr+dola", starting_layer=0, ending_layer=3, early_exit_norm=False)
    assert get_patch(model) is None
    hallupatch.apply(model, method="memvr+dola",
                     config=[hallupatch.MemVRConfig(starting_layer=0, ending_layer=3), hallupatch.DoLaConfig(candidate_layers=[1, 3])])
    configs = get_patch(model).configs
    assert configs["memvr"].early_exit_norm is True and configs["dola"].early_exit_norm is False
    assert get_patch(model).methods["dola"].candidates == [1, 3]


def test_premature_logits_ride_on_the_models_own_head_call(llava):
    model, processor = llava
    inputs = _inputs(processor, PROMPTS, [0, 1])
    calls = []
    handle = model.language_model.lm_head.register_forward_hook(lambda m, a, o: calls.append(tuple(a[0].shape)))
    try:
        hallupatch.apply(model, method="dola", candidate_layers=ALL)
        _quiet_generate(model, **inputs, max_new_tokens=3, do_sample=False)
    finally:
        handle.remove()
    # one head call per forward pass, holding the model's rows plus 4 candidates x 2 samples
    # (the prefill's rows are the prompt with the image token expanded into the image's patches)
    assert len(calls) == 3 and calls[1:] == [(2 + 8, 64), (2 + 8, 64)]
    assert calls[0][0] - 8 > 2 * inputs["input_ids"].shape[1] and (calls[0][0] - 8) % 2 == 0


def test_head_not_called_as_module_falls_back_to_own_projection():
    # llama with pretraining_tp > 1 computes its logits from slices of the head's weight
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, pretraining_tp=2, pad_token_id=0, eos_token_id=-1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    hallupatch.apply(model, method="dola", candidate_layers=ALL)
    try:
        out = _quiet_generate(model, input_ids=ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                              output_scores=True, output_logits=True, output_hidden_states=True)
    finally:
        hallupatch.remove(model)
    head = model.lm_head.weight.double()
    for t, hidden_states in enumerate(out.hidden_states):
        final = out.logits[t][0]
        prem = [hidden_states[k][0, -1].double() @ head.T for k in ALL]
        d = [_ref_divergence(final, g) for g in prem]
        expected = _ref_contrast(final, prem[max(range(4), key=lambda i: d[i])])
        _assert_scores_equal(out.scores[t][0], expected)
