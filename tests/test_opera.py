"""OPERA (DESIGN §4e) on tiny LLaVA models: one step's penalties against a float64 re-computation, rollbacks
on a model with planted columnar attention, batches equal their samples alone, remove() and refusals."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList

import hallupatch
from hallupatch.methods import opera as opera_module
from hallupatch.methods.opera import column_scores
from hallupatch.testing.columnar import ForceTokenAt, plant_columnar_token, record_candidate_rows
from hallupatch.testing.tiny import tiny_image, tiny_llava

PROMPTS = ["<image> describe the picture answer", "what color is the square in this <image> photo ? answer"]
SUMMARY_POSITION = 12
NEW_TOKENS = 30


def planted_llava():
    model, processor = tiny_llava(seed=0)
    summary = processor.tokenizer.convert_tokens_to_ids(".")
    return plant_columnar_token(model, summary), processor, summary


@pytest.fixture(scope="module")
def planted():
    return planted_llava()


def forcing(processor, summary):
    marker = processor.tokenizer.convert_tokens_to_ids("answer")
    return LogitsProcessorList([ForceTokenAt(marker, SUMMARY_POSITION, summary)])


def inputs(processor, which):
    return processor(text=[PROMPTS[i] for i in which], images=[tiny_image(i + 1) for i in which],
                     return_tensors="pt", padding=True)


def run(model, batch, **kwargs):
    with torch.no_grad():
        return model.generate(**batch, num_beams=5, do_sample=False, max_new_tokens=NEW_TOKENS,
                              min_new_tokens=NEW_TOKENS, **kwargs)


# -- the column scores ----------------------------------------------------------------------------------------
def test_column_scores_follow_the_fork_float16_store():
    window = torch.tensor([[0.9, 0.0, 0.0], [0.5, 0.5, 0.0], [0.4, 0.3, 0.3]], dtype=torch.float64)
    scores = column_scores(window.float(), scale_factor=50.0)
    expected = [1e-7 * float(torch.prod(50.0 * window[j:, j])) for j in range(3)]
    assert scores.dtype == torch.float16
    assert torch.equal(scores, torch.tensor(expected).to(torch.float16))
    assert float(column_scores(torch.full((1, 1), 1e-3), 1.0)[0]) == 0.0          # 1e-10 underflows
    big = column_scores(torch.ones(12, 12).tril(), 50.0)                              # 50**12 * 1e-7
    assert torch.isinf(big[0]) and int(big.max(-1).indices) == 0                      # ties: first column


# -- one step against an independent float64 re-computation ---------------------------------------------------
def float64_candidates(reference, pixel_values, sequence, prompt_ids, span_start, n_visual, scale, weight, n_candidates):
    """Plain re-computation of one beam's candidates at one step: a full forward per candidate, no cache,
    every value in float64, as DESIGN §4e describes it."""
    with torch.no_grad():
        logits = reference(input_ids=sequence[None], attention_mask=torch.ones_like(sequence[None]),
                           pixel_values=pixel_values).logits[0, -1]
    values, tokens = torch.topk(logits, n_candidates)
    penalised = []
    for value, token in zip(values, tokens):
        ids = torch.cat([sequence, token[None]])[None]
        with torch.no_grad():
            out = reference(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values,
                            output_attentions=True)
        attention = out.attentions[-1][0].amax(0)                     # (S, S), max over heads
        attention = attention / attention.sum(-1, keepdim=True)
        prompt = attention.shape[0] - (ids.shape[1] - prompt_ids)     # the merged prompt length
        window = scale * attention[prompt:, prompt:]
        n = window.shape[-1]
        columns = [1e-7 * float(torch.prod(window[j:, j])) for j in range(n)]
        column_max = max(float(torch.tensor(c).to(torch.float16)) for c in columns)
        image = float(attention[-1, span_start:span_start + n_visual].sum())
        penalty = -image if n <= 10 else column_max
        penalised.append(float(value) - weight * penalty)
    return tokens, torch.tensor(penalised, dtype=torch.float64)


@pytest.mark.parametrize("iteration", [3, 16])   # the image bonus (<= 10 columns), then the column scores
def test_one_step_penalties_match_a_float64_recomputation(planted, monkeypatch, iteration):
    model, processor, summary = planted
    model = copy.deepcopy(model)
    reference = copy.deepcopy(model).double()
    batch = inputs(processor, [0])
    seen = record_candidate_rows(monkeypatch)
    hallupatch.apply(model, method="opera", scale_factor=3.0, penalty_weights=0.5, threshold=100)
    run(model, batch, logits_processor=forcing(processor, summary))
    step = hallupatch.get_trace(model, "opera").candidates[0][iteration]
    tokens, scores = step.tokens, step.scores
    sequences = seen[iteration]
    assert sequences.shape[1] == batch.input_ids.shape[1] + iteration
    span_start = int((batch.input_ids[0] == model.config.image_token_index).nonzero()[0])
    n_visual = (56 // 14) ** 2
    for beam in range(sequences.shape[0]):
        ref_tokens, ref_scores = float64_candidates(reference, batch.pixel_values.double(), sequences[beam],
                                                    batch.input_ids.shape[1], span_start, n_visual, 3.0, 0.5, 5)
        assert tokens[beam].tolist() == ref_tokens.tolist()
        torch.testing.assert_close(scores[beam].double(), ref_scores, rtol=1e-4, atol=1e-4)


# -- rollbacks ------------------------------------------------------------------------------------------------
def test_planted_columnar_token_makes_opera_roll_back(planted):
    model, processor, summary = planted
    model = copy.deepcopy(model)
    batch = inputs(processor, [0])
    hallupatch.apply(model, method="opera", threshold=5)
    out = run(model, batch, logits_processor=forcing(processor, summary))
    trace = hallupatch.get_trace(model, "opera")
    rollbacks = trace.rollbacks[0]
    assert rollbacks, "the planted token must draw a rollback"
    assert {r.location for r in rollbacks} == {SUMMARY_POSITION}
    # location + 1 until that position was used num_attn_candidates (5) times, then the location itself
    assert [r.to_position for r in rollbacks] == [SUMMARY_POSITION + 1] * 5 + [SUMMARY_POSITION] * 5
    # every rollback re-does the positions from to_position on: the loop ran that many more times
    assert len(trace.locations[0]) == NEW_TOKENS + sum(r.from_position - r.to_position for r in rollbacks)
    assert out.shape[1] == batch.input_ids.shape[1] + NEW_TOKENS
    assert int(out[0, batch.input_ids.shape[1] + SUMMARY_POSITION]) == summary


def test_without_the_planted_pattern_nothing_rolls_back(planted):
    model, processor, summary = planted
    model = copy.deepcopy(model)
    hallupatch.apply(model, method="opera", threshold=5)
    run(model, inputs(processor, [0]), logits_processor=forcing(processor, summary))
    assert hallupatch.get_trace(model, "opera").rollbacks[0]
    plain, processor = tiny_llava(seed=0)
    hallupatch.apply(plain, method="opera", threshold=5)
    run(plain, inputs(processor, [0]))
    trace = hallupatch.get_trace(plain, "opera")
    assert trace.rollbacks == [[]] and len(trace.locations[0]) == NEW_TOKENS


def test_a_batch_equals_its_samples_alone(planted):
    model, processor, summary = planted
    model = copy.deepcopy(model)
    hallupatch.apply(model, method="opera", threshold=5)
    batch = inputs(processor, [0, 1])
    assert bool((batch.attention_mask == 0).any()), "the batch must be padded"
    together = run(model, batch, logits_processor=forcing(processor, summary))
    trace = hallupatch.get_trace(model, "opera")
    for i in range(2):
        alone_batch = inputs(processor, [i])
        alone = run(model, alone_batch, logits_processor=forcing(processor, summary))
        alone_trace = hallupatch.get_trace(model, "opera")
        generated = together[i, batch.input_ids.shape[1]:]
        assert torch.equal(generated, alone[0, alone_batch.input_ids.shape[1]:])
        assert trace.rollbacks[i] == alone_trace.rollbacks[0]
        assert trace.locations[i] == alone_trace.locations[0]
    assert trace.rollbacks[0] and trace.rollbacks[1]
    assert not torch.equal(together[0], together[1])


def test_output_scores_follow_the_kept_steps(planted):
    model, processor, summary = planted
    model = copy.deepcopy(model)
    hallupatch.apply(model, method="opera", threshold=5)
    batch = inputs(processor, [0, 1])
    out = run(model, batch, logits_processor=forcing(processor, summary), output_scores=True, output_logits=True,
              return_dict_in_generate=True, num_return_sequences=2)
    assert hallupatch.get_trace(model, "opera").rollbacks[0]
    assert len(out.scores) == NEW_TOKENS == len(out.logits)
    assert out.scores[0].shape == (2 * 5, model.config.text_config.vocab_size)
    assert out.sequences.shape == (4, batch.input_ids.shape[1] + NEW_TOKENS)
    transition = model.compute_transition_scores(out.sequences, out.scores, out.beam_indices, normalize_logits=False)
    assert torch.isfinite(transition).all()
    # with length_penalty 1 a sequence's score is its summed transition scores over the length of the whole
    # sequence (its own prompt ids included), as the fork's transformers 4.29 scores hypotheses
    lengths = batch.attention_mask.sum(-1).repeat_interleave(2) + NEW_TOKENS
    torch.testing.assert_close(transition.sum(-1) / lengths, out.sequences_scores, rtol=1e-4, atol=1e-4)


# -- cost: only the last layer's attention --------------------------------------------------------------------
def test_only_the_last_layer_computes_attention_weights(planted):
    model, processor, summary = planted
    model = copy.deepcopy(model)
    asked = {}
    layers = model.language_model.model.layers

    def record(index):
        def hook(module, args, kwargs):
            asked[index] = asked.get(index, False) or bool(kwargs.get("output_attentions"))
        return hook

    hallupatch.apply(model, method="opera")   # first: hooks added later see what OPERA's hook asks for
    handles = [layer.self_attn.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
    run(model, inputs(processor, [0]))
    for handle in handles:
        handle.remove()
    assert asked == {i: i == len(layers) - 1 for i in range(len(layers))}


# -- remove, refusals -----------------------------------------------------------------------------------------
def test_remove_gives_the_original_beam_search_bit_for_bit():
    model, processor = tiny_llava(seed=0)
    batch = inputs(processor, [0, 1])
    before = run(model, batch)
    hallupatch.apply(model, method="opera")
    run(model, batch)
    hallupatch.remove(model)
    assert torch.equal(run(model, batch), before)
    assert "_beam_search" not in vars(model) and "_get_logits_processor" not in vars(model)


@pytest.mark.parametrize("knobs, message", [
    ({"scale_factor": 0}, "scale_factor"), ({"scale_factor": float("nan")}, "scale_factor"),
    ({"threshold": -1}, "threshold"), ({"threshold": 2.5}, "threshold"),
    ({"num_attn_candidates": 0}, "num_attn_candidates"), ({"penalty_weights": float("inf")}, "penalty_weights"),
    ({"window_size": 0}, "window_size"), ({"num_attn_candidates": True}, "num_attn_candidates"),
])
def test_bad_knobs_are_refused(knobs, message):
    model, _ = tiny_llava(seed=0)
    with pytest.raises(ValueError, match=message):
        hallupatch.apply(model, method="opera", **knobs)
    assert hallupatch.engine.get_patch(model) is None


@pytest.mark.parametrize("generation, message", [
    ({"num_beams": 1}, "num_beams >= 2"),
    ({"num_beams": 4, "do_sample": True}, "do_sample=True"),
    ({"num_beams": 4, "num_beam_groups": 2, "diversity_penalty": 1.0}, "num_beam_groups=2"),
])
def test_other_decoding_modes_are_refused(generation, message):
    model, processor = tiny_llava(seed=0)
    hallupatch.apply(model, method="opera")
    with pytest.raises(ValueError, match=message):
        model.generate(**inputs(processor, [0]), max_new_tokens=3, **generation)


def test_models_without_an_image_span_are_refused():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4))
    with pytest.raises(TypeError, match="OPERA supports"):
        hallupatch.apply(model, method="opera")


def test_a_prompt_without_exactly_one_image_is_refused():
    model, processor = tiny_llava(seed=0)
    hallupatch.apply(model, method="opera")
    batch = processor(text=["<image> and <image> answer"], images=[tiny_image(1), tiny_image(2)], return_tensors="pt")
    with pytest.raises(ValueError, match="exactly one image per sample"):
        model.generate(**batch, num_beams=2, max_new_tokens=2)


@pytest.mark.parametrize("architecture", ["llava_next", "vipllava"])
def test_other_llava_models_find_their_image_span_and_batch_alone(architecture):
    from hallupatch.testing.families import tiny_vlm

    model, processor = tiny_vlm(architecture)
    processor.tokenizer.padding_side = "left"
    hallupatch.apply(model, method="opera", threshold=3)
    prompts = ["<image> describe the picture answer", "what is in this <image> photo ? answer"]
    images = [tiny_image(1).resize((56, 40)), tiny_image(2).resize((40, 56))]
    spans = []
    original = opera_module._SampleSearch._image_span

    def spy(self, input_ids, merged_length):   # the span is checked against the cached merged length inside
        spans.append(original(self, input_ids, merged_length))
        return spans[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(opera_module._SampleSearch, "_image_span", spy)
        batch = processor(text=prompts, images=images, return_tensors="pt", padding=True)
        together = run(model, batch)
        for i in range(2):
            alone = processor(text=[prompts[i]], images=[images[i]], return_tensors="pt")
            single = run(model, alone)
            assert torch.equal(together[i, batch.input_ids.shape[1]:], single[0, alone.input_ids.shape[1]:])
    assert spans[0] == spans[2] and spans[1] == spans[3]
    assert all(s.image_end - s.image_start + 1 > 1 for s in spans)


def test_the_original_llava_class_generating_from_its_spliced_embeddings(tmp_path):
    """The original LLaVA ``generate(ids, images=...)`` splices the image and generates from ``inputs_embeds``:
    OPERA finds the span where the projected image sits in those embeddings."""
    from test_llama_family import (ORIGINAL_LLAVA_IMAGE_TOKEN, StandInLlavaLlamaForCausalLM, saved_and_reloaded,
                                   tiny_llama_config)

    model = saved_and_reloaded(StandInLlavaLlamaForCausalLM(tiny_llama_config(mm_hidden_size=24)),
                               StandInLlavaLlamaForCausalLM, tmp_path)
    ids = torch.tensor([[1, 12, 5, ORIGINAL_LLAVA_IMAGE_TOKEN, 40, 7, 9]])
    images = torch.randn(1, 6, 24, generator=torch.Generator().manual_seed(2))
    spans = []
    original = opera_module._SampleSearch._image_span

    def spy(self, input_ids, merged_length):
        spans.append(original(self, input_ids, merged_length))
        return spans[-1]

    hallupatch.apply(model, method="opera", threshold=2)
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(opera_module._SampleSearch, "_image_span", spy)
        out = model.generate(ids, images=images, num_beams=3, do_sample=False, max_new_tokens=14, min_new_tokens=14)
    assert spans == [opera_module.ImageSpan(image_start=3, image_end=8, response_start=12)]
    assert out.shape == (1, 14) and len(hallupatch.get_trace(model, "opera").locations[0]) >= 14


def test_a_patched_model_copies_and_pickles_with_its_opera(planted):
    import pickle

    model, processor, summary = planted
    model = copy.deepcopy(model)
    hallupatch.apply(model, method="opera", threshold=5)
    batch = inputs(processor, [0])
    expected = run(model, batch, logits_processor=forcing(processor, summary))
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(run(clone, batch, logits_processor=forcing(processor, summary)), expected)
        assert hallupatch.get_trace(clone, "opera").rollbacks == hallupatch.get_trace(model, "opera").rollbacks


def test_opera_next_to_another_method_is_refused():
    model, processor = tiny_llava(seed=0)
    with pytest.raises(ValueError, match="'opera' owns .* the beam search and does not combine"):
        hallupatch.apply(model, method="memvr+opera", starting_layer=0, ending_layer=3)
    assert hallupatch.engine.get_patch(model) is None   # refused at apply: nothing was patched
