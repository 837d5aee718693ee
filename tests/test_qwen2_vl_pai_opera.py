"""PAI and OPERA on the Qwen2-VL / Qwen2.5-VL drop-ins (tiny checkpoints), inside plain ``generate()``, against
independent float64 re-computations written here: full forwards without cache of a float64 copy of the model
in its eager attention (``output_attentions=True``, the drop-in's own eager formula), with the published
formulas applied by hand — PAI's ``w + alpha |w|`` on the image columns of the amplified query rows (through
``baselines_reference.amplified``, which edits the scores the attention's softmax receives), OPERA's candidates
and penalties from the last layer's attention. The image positions are the prompt's ``<|image_pad|>`` tokens,
read from the ids here (all of them when a prompt has two images)."""
import copy
import math

import pytest
import torch
from transformers import LogitsProcessorList

import hallupatch
from baselines_reference import amplified, pai_cfg
from hallupatch.testing.columnar import ForceTokenAt, plant_columnar_token, record_candidate_rows
from qwen2_vl_fixtures import encode_rows, loaded, render  # noqa: F401 (loaded: a fixture)

STEPS = 3
ONE_IMAGE = [(84, 56, 5), "Is there a cat in the image?"]
TWO_IMAGES = [(56, 84, 3), (100, 70, 4), "Which is brighter?"]
ALPHA = 0.5
SUMMARY_POSITION = 12      # OPERA: the planted summary token is forced at this response position
NEW_TOKENS = 24


def encode(processor, rows):
    return encode_rows(processor, rows)[1]


def image_columns(model, ids):
    """Every ``<|image_pad|>`` position of a one-row prompt (read from the ids, the token id from the config)."""
    return (ids[0] == model.config.image_token_id).nonzero().flatten().tolist()


def full_forward(model64, ids, images=None, **kwargs):
    """One float64 forward of the whole sequence, no cache, the drop-in's eager attention everywhere."""
    images = {} if images is None else {"pixel_values": images["pixel_values"].double(),
                                        "image_grid_thw": images["image_grid_thw"]}
    with torch.no_grad():
        return model64(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, output_attentions=True,
                       return_dict=True, **images, **kwargs)


def eos_ids(model):
    eos = model.generation_config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


# -- PAI ------------------------------------------------------------------------------------------------------
def generate(model, inputs, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                              output_scores=True, return_dict_in_generate=True, **kwargs)


@pytest.mark.parametrize("rows", [[ONE_IMAGE], [TWO_IMAGES]], ids=["one_image", "two_images"])
@pytest.mark.parametrize("use_cfg,gamma", [(True, 1.1), (False, 1.1), (True, 2.0)])
def test_pai_greedy_equals_a_float64_loop_with_the_published_formula(loaded, rows, use_cfg, gamma):
    model, processor = loaded
    inputs = encode(processor, rows)
    plain = processor.tokenizer(render(processor, rows, with_image=False), return_tensors="pt")
    layers = range(1, model.config.num_hidden_layers)
    model64 = copy.deepcopy(model).double()
    hallupatch.apply(model, "pai", alpha=ALPHA, gamma=gamma, start_layer=1, end_layer=layers.stop, use_cfg=use_cfg)
    try:
        out = generate(model, inputs)
    finally:
        hallupatch.remove(model)
    ids, bids = inputs.input_ids, plain.input_ids
    length, columns = ids.shape[1], image_columns(model, ids)
    assert len(columns) == int(inputs.image_grid_thw.prod(-1).sum()) // 4      # every image's pads
    for step in range(STEPS):
        # the passes PAI amplified: every decoding pass after the first token (its last row, the token fed),
        # and the prefill's last row too when the CFG part is off (published)
        rows_amplified = [length + k - 1 for k in range(1, step + 1)] + ([] if use_cfg else [length - 1])
        with amplified(model64, layers, rows_amplified, columns, ALPHA, decoder_layers=model64.model.layers):
            z = full_forward(model64, ids, inputs).logits[:, -1].double()
        z[:, eos_ids(model)] = -math.inf            # min_new_tokens runs before PAI's processor
        want = pai_cfg(z, full_forward(model64, bids).logits[:, -1].double(), gamma) if use_cfg else z
        got = out.scores[step].double()
        assert int(out.sequences[0, ids.shape[1]]) == int(want.argmax(-1))
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), finite)
        torch.testing.assert_close(got[finite], want[finite], rtol=1e-4, atol=1e-4)
        if rows_amplified:   # the amplification matters: the plain forward gives other logits
            unamplified = full_forward(model64, ids, inputs).logits[:, -1].double()
            assert (unamplified - z)[torch.isfinite(z)].abs().max() > 1e-3
        token = out.sequences[:, ids.shape[1]:ids.shape[1] + 1]
        ids, bids = torch.cat([ids, token], 1), torch.cat([bids, token], 1)


def test_pai_left_padded_batch_equals_each_row_alone_and_remove_is_exact(loaded):
    model, processor = loaded
    rows = [ONE_IMAGE, TWO_IMAGES]
    inputs = encode(processor, rows)
    assert (inputs.attention_mask == 0).any()
    before = generate(model, inputs)
    hallupatch.apply(model, "pai", alpha=ALPHA, start_layer=1, end_layer=model.config.num_hidden_layers)
    batch = generate(model, inputs)
    alone = [generate(model, encode(processor, [row])) for row in rows]
    hallupatch.remove(model)
    after = generate(model, inputs)
    width = inputs.input_ids.shape[1]
    for r, single in enumerate(alone):
        own = single.sequences.shape[1] - STEPS
        assert torch.equal(batch.sequences[r, width:], single.sequences[0, own:])
        for batched, one in zip(batch.scores, single.scores):
            finite = torch.isfinite(one[0])
            assert torch.equal(torch.isfinite(batched[r]), finite)
            torch.testing.assert_close(batched[r][finite], one[0][finite], rtol=1e-5, atol=1e-5)
    assert not all(torch.equal(a, b) for a, b in zip(batch.scores, before.scores))   # PAI changed something
    assert torch.equal(after.sequences, before.sequences)
    assert all(torch.equal(a, b) for a, b in zip(after.scores, before.scores))


# -- OPERA ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planted(loaded):
    model, processor = loaded
    summary = processor.tokenizer.convert_tokens_to_ids(".")
    model = copy.deepcopy(model)   # Qwen2's rope_theta 1e6 leaves the last rotary pair still over these lengths
    return plant_columnar_token(model, summary, decoder=model.model, still_rope=False), processor, summary


def forcing(inputs, summary):
    """Forces the summary token at SUMMARY_POSITION; every prompt ends with the generation prompt's newline."""
    marker = int(inputs.input_ids[0, -1])
    return LogitsProcessorList([ForceTokenAt(marker, SUMMARY_POSITION, summary)])


def beam_search(model, inputs, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, num_beams=5, do_sample=False, max_new_tokens=NEW_TOKENS,
                              min_new_tokens=NEW_TOKENS, **kwargs)


def float64_candidates(model64, images, sequence, prompt_length, columns, scale, weight, n_candidates):
    """One beam's candidates at one step, recomputed: a float64 full forward per candidate, the last layer's
    attention (max over heads, rows renormalised), OPERA's window, column scores and penalty (DESIGN §4e)."""
    logits = full_forward(model64, sequence[None], images).logits[0, -1]
    values, tokens = torch.topk(logits, n_candidates)
    penalised = []
    for value, token in zip(values, tokens):
        attention = full_forward(model64, torch.cat([sequence, token[None]])[None], images).attentions[-1][0].amax(0)
        attention = attention / attention.sum(-1, keepdim=True)
        window = scale * attention[prompt_length:, prompt_length:]
        n = window.shape[-1]
        column_max = max(float(torch.tensor(1e-7 * float(torch.prod(window[j:, j]))).to(torch.float16))
                         for j in range(n))
        image = float(attention[-1, columns].sum())
        penalised.append(float(value) - weight * (-image if n <= 10 else column_max))
    return tokens, torch.tensor(penalised, dtype=torch.float64)


def spied_run(model, inputs, monkeypatch, **kwargs):
    """OPERA's beam search, keeping the beams' sequences that each iteration's candidates extend."""
    seen = record_candidate_rows(monkeypatch)
    return beam_search(model, inputs, **kwargs), seen


def check_iteration(model, inputs, trace, seen, iteration, scale, weight):
    model64 = copy.deepcopy(model).double()
    step = trace.candidates[0][iteration]
    columns = image_columns(model, inputs.input_ids)
    for beam, sequence in enumerate(seen[iteration]):
        tokens, scores = float64_candidates(model64, inputs, sequence, inputs.input_ids.shape[1], columns,
                                            scale, weight, step.tokens.shape[1])
        assert step.tokens[beam].tolist() == tokens.tolist()
        torch.testing.assert_close(step.scores[beam].double(), scores, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("iteration", [3, 16])   # the image bonus (<= 10 columns), then the column scores
def test_opera_penalties_equal_a_float64_recomputation_with_two_images(planted, monkeypatch, iteration):
    model, processor, summary = planted
    inputs = encode(processor, [TWO_IMAGES])
    hallupatch.apply(model, "opera", scale_factor=3.0, penalty_weights=0.5, threshold=100)
    try:
        _, seen = spied_run(model, inputs, monkeypatch, logits_processor=forcing(inputs, summary))
        trace = hallupatch.get_trace(model, "opera")
    finally:
        hallupatch.remove(model)
    assert seen[iteration].shape[1] == inputs.input_ids.shape[1] + iteration
    check_iteration(model, inputs, trace, seen, iteration, 3.0, 0.5)


def test_opera_rolls_back_and_recomputes_at_the_m_rope_positions(planted, monkeypatch):
    """After each rollback the sequence is recomputed from the prompt's embeddings: the iteration that follows
    reads a cache whose image keeps its 3-axis positions and whose text continues after them, so its candidates
    equal a float64 full forward (plain 1-D positions from the embeddings would not)."""
    model, processor, summary = planted
    inputs = encode(processor, [ONE_IMAGE])
    hallupatch.apply(model, "opera", threshold=3)
    try:
        out, seen = spied_run(model, inputs, monkeypatch, logits_processor=forcing(inputs, summary))
        trace = hallupatch.get_trace(model, "opera")
    finally:
        hallupatch.remove(model)
    rollbacks = trace.rollbacks[0]
    assert rollbacks and {r.location for r in rollbacks} == {SUMMARY_POSITION}
    assert len(trace.locations[0]) == NEW_TOKENS + sum(r.from_position - r.to_position for r in rollbacks)
    assert out.shape[1] == inputs.input_ids.shape[1] + NEW_TOKENS
    first = rollbacks[0].iteration + 1      # the iteration right after the first recomputation
    assert seen[first].shape[1] == inputs.input_ids.shape[1] + rollbacks[0].to_position + 1
    check_iteration(model, inputs, trace, seen, first, 50.0, 1.0)


def test_opera_left_padded_batch_equals_each_sample_alone(planted):
    model, processor, summary = planted
    rows = [ONE_IMAGE, TWO_IMAGES]
    inputs = encode(processor, rows)
    assert (inputs.attention_mask == 0).any()
    hallupatch.apply(model, "opera", threshold=3)
    try:
        together = beam_search(model, inputs, logits_processor=forcing(inputs, summary))
        batch_trace = hallupatch.get_trace(model, "opera")
        for r, row in enumerate(rows):
            alone = encode(processor, [row])
            single = beam_search(model, alone, logits_processor=forcing(alone, summary))
            assert torch.equal(together[r, inputs.input_ids.shape[1]:], single[0, alone.input_ids.shape[1]:])
            assert hallupatch.get_trace(model, "opera").rollbacks[0] == batch_trace.rollbacks[r]
    finally:
        hallupatch.remove(model)
    assert all(batch_trace.rollbacks)


def test_opera_remove_gives_the_original_beam_search_bit_for_bit(loaded):
    model, processor = loaded
    inputs = encode(processor, [ONE_IMAGE, TWO_IMAGES])
    kwargs = dict(output_scores=True, return_dict_in_generate=True)
    before = beam_search(model, inputs, **kwargs)
    hallupatch.apply(model, "opera")
    beam_search(model, inputs)
    hallupatch.remove(model)
    after = beam_search(model, inputs, **kwargs)
    assert torch.equal(before.sequences, after.sequences)
    assert torch.equal(before.sequences_scores, after.sequences_scores)
    assert all(torch.equal(a, b) for a, b in zip(before.scores, after.scores))


def test_opera_refuses_a_prompt_without_an_image(loaded):
    model, processor = loaded
    inputs = processor(text=render(processor, [["Hello?"]]), return_tensors="pt")
    hallupatch.apply(model, "opera")
    try:
        with pytest.raises(ValueError, match="no image"):
            beam_search(model, inputs)
    finally:
        hallupatch.remove(model)
