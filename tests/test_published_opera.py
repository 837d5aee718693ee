"""OPERA against the published fork (shikiw/OPERA, transformers 4.29.2), as recorded on tiny weights.

``tests/data/published_opera/`` holds a tiny llava-hf checkpoint whose last layer has planted columnar attention
(a marker word draws every later query of one head), so the fork's retrospection really fires, and
``recordings.json``: what the fork computed with those very weights (tokens of the best beam, the all-beams
rollback location of every loop iteration, every rollback, one step's penalties). How it was recorded, from which
commit, and how to re-record: ``tests/published/record_opera.py``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).resolve().parent / "data" / "published_opera"
RECORDINGS = json.loads((DATA / "recordings.json").read_text())
PROMPTS = json.loads((DATA / "prompts.json").read_text())
FORK_IMAGE_TOKEN = -200  # the original LLaVA's image placeholder in the fork's input ids
EOS = 2


@pytest.fixture(scope="module")
def model():
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(DATA, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def pixel_values():
    from safetensors.torch import load_file

    return load_file(str(DATA / "pixel_values.safetensors"))["pixel_values"].float()


def prompt_inputs(prompt: int, pixel_values):
    ids = torch.tensor([PROMPTS["input_ids"][prompt]])
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values[prompt:prompt + 1])


def run_id(run):
    return f"{run['case']}-prompt{run['prompt']}"


def test_every_setting_rolls_back_somewhere():
    """The recordings exercise retrospection: each setting rolls back on at least one prompt."""
    cases = {run["case"] for run in RECORDINGS["runs"]}
    assert cases == {"default", "many_rollbacks", "fast", "small_scale"}
    for case in cases:
        runs = [run for run in RECORDINGS["runs"] if run["case"] == case]
        assert sum(len(run["rollbacks"]) for run in runs) > 0, case
        assert not any(run["swallowed_errors"] for run in runs), case
    assert {(r["knobs"]["threshold"], r["knobs"]["num_attn_candidates"]) for r in RECORDINGS["runs"]} == {
        (15, 5), (5, 5), (25, 1)}
    # the float16 column store both overflows (inf, ties -> first column) and underflows (all 0 -> column 0)
    def total(key, case):
        return sum(run[key] for run in RECORDINGS["runs"] if run["case"] == case)

    assert total("overflow_iterations", "default") > 0 and total("overflow_iterations", "fast") > 0
    assert total("underflow_iterations", "small_scale") > 0
    assert any(EOS in r["tokens"] for r in RECORDINGS["runs"])  # beams that end early: 4.29's length normalisation


PLAIN_WITHOUT_EOS = [r for r in RECORDINGS["plain_beam_search"] if EOS not in r["tokens"]]


@pytest.mark.parametrize("plain", PLAIN_WITHOUT_EOS, ids=lambda r: f"prompt{r['prompt']}")
def test_weights_give_the_fork_plain_beam_search(model, pixel_values, plain):
    """Unpatched transformers 4.40 beam search on these weights = the fork's 4.29 beam search: the weights and
    their conversion are right. Only prompts where no beam ends with EOS: there 4.29 divides a hypothesis' score
    by the whole sequence length and 4.40 by the generated length, so stock 4.40 may differ (the port must not)."""
    inputs = prompt_inputs(plain["prompt"], pixel_values)
    out = model.generate(**inputs, num_beams=RECORDINGS["num_beams"], do_sample=False,
                         max_new_tokens=plain["max_new_tokens"])
    assert out[0, inputs["input_ids"].shape[1]:].tolist() == plain["tokens"]


# ------------------------------------------------------------------ one step's penalties, recomputed independently
def step_penalties(model, beam_ids, candidates, pixel_values, key_position, scale_factor, penalty_weights):
    """OPERA's candidate scores for one step, recomputed from full (uncached) forwards in plain loops.

    For beam b and candidate c: the last layer's attention of the sequence ``beam_ids[b] + [c]`` (merged),
    max over heads, rows renormalised; window = rows and columns from ``response_start`` times
    ``scale_factor``; column score = ``1e-7 x`` the product of the window column from its diagonal down, rounded
    to float16; penalty = minus the candidate row's attention on the image while the window has <= 10
    columns, else the largest column score (first column on ties).
    """
    image_token = PROMPTS["image_token_index"]
    start, end, response_start = (key_position[k] for k in ("image_start", "image_end", "response_start"))
    penalties, scores, argmaxes = [], [], []
    for b, ids in enumerate(beam_ids):
        ids = [image_token if t == FORK_IMAGE_TOKEN else t for t in ids]
        row_penalties, row_scores, row_argmax = [], [], []
        for c in candidates[b]:
            seq = torch.tensor([ids + [c]])
            out = model(input_ids=seq, attention_mask=torch.ones_like(seq), pixel_values=pixel_values,
                        output_attentions=True)
            logit = out.logits[0, -2, c].item()
            attn = out.attentions[-1][0].max(0).values
            attn = attn / attn.sum(-1, keepdim=True)
            window = scale_factor * attn[response_start:, response_start:]
            columns = [1e-7 * window[j:, j].prod() for j in range(window.shape[-1])]
            column_scores = torch.stack(columns).to(torch.float16)
            best = max(range(len(columns)), key=lambda j: (column_scores[j].item(), -j))
            if window.shape[-1] <= 10:
                penalty = -attn[-1, start:end + 1].sum().item()
            else:
                penalty = column_scores[best].item()
            row_penalties.append(penalty)
            row_scores.append(logit - penalty_weights * penalty)
            row_argmax.append(best)
        penalties.append(row_penalties)
        scores.append(row_scores)
        argmaxes.append(row_argmax)
    return torch.tensor(penalties), torch.tensor(scores), argmaxes


PENALTY_STEPS = [(run, step) for run in RECORDINGS["runs"] if run["case"] in ("default", "small_scale")
                 for step in run["penalties"]]


@pytest.mark.parametrize("run,step", PENALTY_STEPS,
                         ids=[f"{run_id(r)}-iteration{s['iteration']}" for r, s in PENALTY_STEPS])
def test_one_step_penalties_recomputed(model, pixel_values, run, step):
    """The fork's per-candidate penalties and penalised scores at one step = a plain recomputation (4.40)."""
    knobs = run["knobs"]
    penalties, scores, argmaxes = step_penalties(
        model, step["input_ids"], step["candidate_tokens"], pixel_values[run["prompt"]:run["prompt"] + 1],
        run["key_position"], knobs["scale_factor"], knobs["penalty_weights"])
    torch.testing.assert_close(penalties, torch.tensor(step["penalty"]), rtol=2e-3, atol=1e-5)
    torch.testing.assert_close(scores, torch.tensor(step["penalised_scores"]), rtol=1e-4, atol=1e-4)
    if step["response_length"] > 10:
        assert argmaxes == step["column_argmax"]


# ----------------------------------------------------------------------------------- hallupatch's port vs the fork
@pytest.mark.parametrize("run", RECORDINGS["runs"], ids=run_id)
def test_port_matches_published_fork(model, pixel_values, run):
    """hallupatch's OPERA inside transformers 4.40 beam search computes what the fork computes: the same tokens,
    the same all-beams rollback location at every loop iteration, the same rollbacks (when, from where, which
    winning column, back to which position), and at the recorded steps the same candidates and penalties."""
    import hallupatch

    inputs = prompt_inputs(run["prompt"], pixel_values)
    hallupatch.apply(model, method="opera", **run["knobs"])
    try:
        out = model.generate(**inputs, num_beams=run["num_beams"], do_sample=False,
                             max_new_tokens=run["max_new_tokens"])
        trace = hallupatch.get_trace(model, "opera")
    finally:
        hallupatch.remove(model)
    assert out[0, inputs["input_ids"].shape[1]:].tolist() == run["tokens"]
    rollbacks = [(r.iteration, r.from_position, r.location, r.to_position) for r in trace.rollbacks[0]]
    recorded = [(r["iteration"], r["from_position"], r["location"], r["to_position"]) for r in run["rollbacks"]]
    assert rollbacks == recorded
    assert list(trace.locations[0]) == run["locations"]
    for step in run["penalties"]:
        recorded_step = trace.candidates[0][step["iteration"]]
        assert recorded_step.tokens.tolist() == step["candidate_tokens"]
        torch.testing.assert_close(recorded_step.penalties.float(), torch.tensor(step["penalty"]),
                                   rtol=2e-3, atol=1e-5)
        torch.testing.assert_close(recorded_step.scores.float(), torch.tensor(step["penalised_scores"]),
                                   rtol=1e-4, atol=1e-4)


# ------------------------------------------- the same weights as the original LLaVA class (generate(ids, images=))
def most_rollbacks_without_eos(case):
    runs = [r for r in RECORDINGS["runs"] if r["case"] == case and EOS not in r["tokens"]]
    return max(runs, key=lambda r: len(r["rollbacks"]))


ORIGINAL_CLASS_RUNS = [most_rollbacks_without_eos(case) for case in ("default", "many_rollbacks", "fast", "small_scale")]


@pytest.fixture(scope="module")
def original_llava(model):
    """The tiny weights in the original LLaVA repository's layout (``LlavaLlamaForCausalLM`` with
    ``model.mm_projector``; ``generate(ids, images=CLIP features)`` splices them in at the ``-200`` token)."""
    from test_llama_family import StandInLlavaLlamaForCausalLM
    from transformers import LlamaConfig

    config = LlamaConfig(**model.config.text_config.to_dict(), mm_hidden_size=model.config.vision_config.hidden_size)
    original = StandInLlavaLlamaForCausalLM(config).eval()
    state = {k[len("language_model."):]: v for k, v in model.state_dict().items() if k.startswith("language_model.")}
    projector = model.multi_modal_projector
    for index, linear in ((0, projector.linear_1), (2, projector.linear_2)):
        state[f"model.mm_projector.{index}.weight"] = linear.weight
        state[f"model.mm_projector.{index}.bias"] = linear.bias
    original.load_state_dict(state)
    original.generation_config = model.generation_config
    return original


@pytest.mark.parametrize("run", ORIGINAL_CLASS_RUNS, ids=run_id)
def test_port_on_the_original_llava_class_matches_published_fork(model, original_llava, pixel_values, run):
    """The fork's own class is the original LLaVA one: the port on that form (image span found in the spliced
    embeddings) reproduces the fork too. Runs without EOS only: generating from ``inputs_embeds`` leaves the
    prompt out of the sequence that beam search's length normalisation counts."""
    import hallupatch

    pixels = pixel_values[run["prompt"]:run["prompt"] + 1]
    features = model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    ids = torch.tensor([[FORK_IMAGE_TOKEN if t == PROMPTS["image_token_index"] else t
                         for t in PROMPTS["input_ids"][run["prompt"]]]])
    hallupatch.apply(original_llava, method="opera", **run["knobs"])
    try:
        out = original_llava.generate(ids, images=features, num_beams=run["num_beams"], do_sample=False,
                                      max_new_tokens=run["max_new_tokens"])
        trace = hallupatch.get_trace(original_llava, "opera")
    finally:
        hallupatch.remove(original_llava)
    assert out[0].tolist() == run["tokens"]
    assert [(r.iteration, r.from_position, r.location, r.to_position) for r in trace.rollbacks[0]] == [
        (r["iteration"], r["from_position"], r["location"], r["to_position"]) for r in run["rollbacks"]]
