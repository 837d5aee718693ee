"""One conformance suite for every architecture hallupatch supports through transformers' own classes.

Each entry of :data:`CASES` is one architecture: a tiny random-weight checkpoint saved and reloaded with
``from_pretrained``, its prompts, and how to reach its decoder (written from the published architecture,
not through hallupatch's specs). For each, the suite checks:

* MemVR against the float64 plain-loop re-implementation (``memvr_reference.py``) when retracing fires at
  the first checked layer, at a later one, and never; for a VLM the reference's visual memory is read off
  the sequence that enters the first decoder layer (the rows the image placeholder became), so the test
  proves that the captured memory is exactly what the model merged;
* layer contrast inside ``generate()`` against the float64 oracle (``dola_oracle.float64_step``) at every
  step and for every sample of a left-padded batch, and the transformers rule for "low"/"high" with the
  model's tied or untied embeddings;
* a left-padded batch equals its samples alone (MemVR triggers and tokens, DoLa scores);
* a text-only prompt after an image prompt equals the unpatched model (for a text decoder: after the
  explicit visual memory is cleared);
* ``remove()`` is bit-identical to the untouched model.

Adding an architecture is one :class:`Case` entry here (plus its spec in ``patches/`` if the structure is new).
Qwen-VL-Chat and GLM-4V (remote code) have the same checks in ``test_memvr_remote.py`` / ``test_dola_remote.py``.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch

import hallupatch
from hallupatch.engine import get_patch
from hallupatch.layer_contrast import candidate_layers
from hallupatch.testing.families import build_checkpoint, load_checkpoint
from hallupatch.testing.tiny import build_tiny_llava_checkpoint, tiny_image

from dola_oracle import float64_step
from memvr_reference import memvr_reference_decoder

LAYERS = 6                      # checked layers 1..4 with the window below
WINDOW = dict(starting_layer=0, ending_layer=LAYERS - 1)
STEPS = 4
GREEDY = dict(do_sample=False, max_new_tokens=STEPS, min_new_tokens=STEPS)
NEVER_STOP = dict(do_sample=False, max_new_tokens=STEPS, eos_token_id=-1)   # no processor after the contrast
VLM_PROMPTS = [
    "USER: <image>\nwhat is in the picture ? ASSISTANT:",
    "USER: <image>\nis there a dog ? ASSISTANT:",
    "USER: <image>\nhow many people are there in this image ? describe the scene . ASSISTANT:",
    "USER: <image>\nwhat color is the car ? ASSISTANT:",
]
TEXT_PROMPTS = [[1, 5, 17, 33, 8, 61, 44], [1, 9, 12], [1, 70, 3, 3, 15, 22, 40, 51, 7], [1, 30, 31, 32, 6]]
TEXT_ONLY_PROMPT = "USER: what is a dog ? ASSISTANT:"


# ---------------------------------------------------------------------------------------------
# per-architecture access, written from the published architectures (not through hallupatch's specs)
# ---------------------------------------------------------------------------------------------
def language_model_parts(model):
    """(decoder with .layers / .norm, lm_head) of a ``*ForCausalLM`` or a LLaVA-style ``language_model``."""
    lm = getattr(model, "language_model", model)
    return lm.model, lm.lm_head


def idefics2_parts(model):
    return model.model.text_model, model.lm_head


@dataclass(frozen=True)
class Case:
    id: str
    architecture: str             # the class name, as hallupatch.supported() lists it
    family: str                   # the registered spec that must be detected
    build: Callable               # build(path) -> checkpoint folder
    decoder: Callable = language_model_parts
    vision: bool = True
    expands_image_token: bool = True   # one <image> token becomes the image's rows (LLaVA); else one token per row
    image_size: tuple = (56, 56)
    tied: bool = False            # input and output embeddings shared (Gemma)

    def images(self, indices):
        images = [tiny_image(i, 56).resize(self.image_size) for i in indices]
        return [[image] for image in images] if self.architecture.startswith("Idefics2") else images


def _builder(architecture, **kwargs):
    def build(path):
        return build_checkpoint(path, architecture, num_layers=LAYERS, **kwargs)
    return build


def _llava_hf(path):
    return build_tiny_llava_checkpoint(path, num_layers=LAYERS)


CASES = [
    Case("llava-hf", "LlavaForConditionalGeneration", "llama", _llava_hf),
    Case("llava-next-vicuna", "LlavaNextForConditionalGeneration", "llava_next", _builder("llava_next"),
         image_size=(56, 40)),   # not square: the anyres grid is unpadded
    Case("llava-next-mistral", "LlavaNextForConditionalGeneration", "llava_next", _builder("llava_next_mistral")),
    Case("vipllava", "VipLlavaForConditionalGeneration", "llama", _builder("vipllava")),
    Case("idefics2", "Idefics2ForConditionalGeneration", "idefics2", _builder("idefics2"), decoder=idefics2_parts,
         expands_image_token=False),
    Case("llama", "LlamaForCausalLM", "llama", _builder("llama"), vision=False),
    Case("llama3-128k-vocab", "LlamaForCausalLM", "llama", _builder("llama3"), vision=False),
    Case("mistral", "MistralForCausalLM", "llama", _builder("mistral"), vision=False),
    Case("qwen2", "Qwen2ForCausalLM", "llama", _builder("qwen2"), vision=False),
    Case("gemma", "GemmaForCausalLM", "llama", _builder("gemma"), vision=False, tied=True),
]
# tested elsewhere: remote code (test_memvr_remote.py, test_dola_remote.py), the original LLaVA repository's
# class (test_llama_family.py, a stand-in: its package is not a dependency)
TESTED_ELSEWHERE = {"QWenLMHeadModel", "ChatGLMForConditionalGeneration", "LlavaLlamaForCausalLM"}


@pytest.fixture(scope="module", params=CASES, ids=[c.id for c in CASES])
def case(request):
    return request.param


@pytest.fixture(scope="module")
def checkpoint(case, tmp_path_factory):
    return case.build(tmp_path_factory.mktemp(case.id) / "checkpoint")


@pytest.fixture()
def loaded(checkpoint):
    return load_checkpoint(checkpoint)


def memories(case, model, indices):
    """Explicit visual tokens for a text decoder (``None`` for a VLM, which captures its own)."""
    if case.vision:
        return None
    hidden = model.config.hidden_size
    return [torch.randn(5 + i, hidden, generator=torch.Generator().manual_seed(100 + i)) for i in indices]


def prepare(case, model, processor, indices):
    """Inputs of the samples ``indices`` (left-padded when several) and, for a text decoder, their memory set."""
    memory = memories(case, model, indices)
    if get_patch(model) is not None and memory is not None:
        hallupatch.set_visual_memory(model, memory)
    if case.vision:
        inputs = processor(text=[VLM_PROMPTS[i] for i in indices], images=case.images(indices), return_tensors="pt",
                           padding=True)
        return dict(inputs)
    rows = [TEXT_PROMPTS[i] for i in indices]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return dict(input_ids=ids, attention_mask=mask)


def quiet_generate(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(**kwargs)


# ---------------------------------------------------------------------------------------------
# the float64 MemVR reference, fed with what the first decoder layer sees
# ---------------------------------------------------------------------------------------------
def first_layer_input(case, model, inputs):
    """float64 copy of the model, the (seq, hidden) sequence entering its first decoder layer, and the
    visual memory read off that sequence (``None`` for a text decoder)."""
    seen = []

    def stop_at_first_layer(module, args):
        seen.append(args[0][0].double())
        raise StopForward

    handle = case.decoder(model)[0].layers[0].register_forward_pre_hook(stop_at_first_layer)
    try:
        model(**inputs)
    except StopForward:
        pass
    finally:
        handle.remove()
    # (run in the model's float32: transformers 4.40's Mistral-style mask builder cannot make float64 masks)
    double = copy.deepcopy(model).double()
    sequence = seen[0]
    ids = inputs["input_ids"][0]
    if not case.vision:
        return double, sequence, None
    image_token = model.config.image_token_index if case.expands_image_token else model.config.image_token_id
    marks = (ids == image_token).nonzero().flatten().tolist()
    text = double.get_input_embeddings()(ids)
    if case.expands_image_token:
        assert len(marks) == 1
        at, rows = marks[0], sequence.shape[0] - ids.shape[0] + 1
        memory = sequence[at:at + rows]
        text_rows = torch.cat([sequence[:at], sequence[at + rows:]])
        text_ids = torch.cat([ids[:at], ids[at + 1:]])
    else:
        is_image = ids == image_token
        memory, text_rows, text_ids = sequence[is_image], sequence[~is_image], ids[~is_image]
    # the split is right: every other row is its token's embedding
    torch.testing.assert_close(text_rows, double.get_input_embeddings()(text_ids), rtol=0, atol=0)
    assert text.shape[0] == ids.shape[0]
    return double, sequence, memory


class StopForward(Exception):
    """Ends a forward pass once the first decoder layer's input is seen."""


def reference(case, double, sequence, memory, threshold):
    decoder, head = case.decoder(double)
    return memvr_reference_decoder(decoder, head, sequence, memory, ratio=0.5, threshold=threshold,
                                   start=WINDOW["starting_layer"], end=WINDOW["ending_layer"])


def separating_thresholds(entropies, margin=0.01):
    """For each checked layer that can be the first to exceed a threshold, such a threshold at least
    ``margin`` away from every entropy (float32 against float64 noise cannot flip it)."""
    chosen, layers = {}, sorted(entropies)
    for i, layer in enumerate(layers):
        below = max([entropies[j] for j in layers[:i]], default=0.0)
        if entropies[layer] - below > 2 * margin:
            chosen[layer] = (below + entropies[layer]) / 2
    return chosen


# ---------------------------------------------------------------------------------------------
# the checks
# ---------------------------------------------------------------------------------------------
def test_detected_as_its_family_and_listed(case, loaded):
    model, _ = loaded
    assert type(model).__name__ == case.architecture
    assert case.architecture in hallupatch.supported()
    hallupatch.apply(model, "memvr", **WINDOW)
    assert get_patch(model).parts.spec.name == case.family
    assert get_patch(model).parts.num_layers == LAYERS


def test_every_supported_architecture_has_a_conformance_entry():
    assert set(hallupatch.supported()) == {c.architecture for c in CASES} | TESTED_ELSEWHERE


def test_readme_family_table_lists_every_architecture_and_its_example_runs(capsys):
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Supported models", 1)[1].split("\n## ", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("| `")]
    listed = {name for line in table for name in line.split("|")[1].split("`")[1::2]}
    assert listed == set(hallupatch.supported())
    exec(compile(section.split("```python", 1)[1].split("```", 1)[0], "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == str(hallupatch.supported())


def test_early_exit_head_is_the_logit_lens(case, loaded):
    """``early_exit_logits`` = ``lm_head(final_norm(h))`` (``norm=False``: ``lm_head(h)``) at every hidden-state
    index, against float64 copies of the norm and head; index N is the model's own logits."""
    model, processor = loaded
    inputs = prepare(case, model, processor, [2])
    out = model(**inputs, output_hidden_states=True)
    decoder, head = case.decoder(model)
    norm64, head64 = copy.deepcopy(decoder.norm).double(), copy.deepcopy(head).double()
    assert len(out.hidden_states) == LAYERS + 1
    for k in range(LAYERS):
        h = out.hidden_states[k].double()
        torch.testing.assert_close(hallupatch.early_exit_logits(model, out.hidden_states, k).double(), head64(norm64(h)),
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(hallupatch.early_exit_logits(model, out.hidden_states[k], k, norm=False).double(),
                                   head64(h), rtol=1e-4, atol=1e-4)
    assert torch.equal(hallupatch.early_exit_logits(model, out.hidden_states, LAYERS), out.logits)


def test_tied_embeddings_rule(case, loaded):
    """DoLa skips hidden-state indices 0 and 1 when the LM head is the input embedding (Gemma): there the
    embedding output's early exit, ``E·(sqrt(d)·E[x])`` for Gemma's scaled embeddings, just repeats the
    input token; the scale only sharpens that copy, so the rule applies unchanged."""
    from hallupatch.methods.dola import tied_embeddings

    model, processor = loaded
    parts = hallupatch.apply(model, "dola")._hallupatch.parts
    assert tied_embeddings(parts) == case.tied
    if case.tied:
        inputs = prepare(case, model, processor, [2])
        embedded = model(**inputs, output_hidden_states=True).hidden_states[0]
        copies = hallupatch.early_exit_logits(model, embedded, 0, norm=False).argmax(-1)
        assert torch.equal(copies, inputs["input_ids"])


def test_memvr_matches_float64_reference_early_late_never(case, loaded):
    model, processor = loaded
    first_checked = WINDOW["starting_layer"] + 1
    found = {}
    for index in range(len(VLM_PROMPTS)):
        inputs = prepare(case, model, processor, [index])
        memory = memories(case, model, [index])
        double, sequence, seen_memory = first_layer_input(case, model, inputs)
        memory = seen_memory if case.vision else memory[0].double()
        _, _, entropies = reference(case, double, sequence, memory, threshold=2.0)
        for layer, threshold in separating_thresholds(entropies).items():
            kind = "early" if layer == first_checked else "late"
            found.setdefault(kind, (index, layer, threshold))
        found.setdefault("never", (index, None, 1.5))   # normalised entropy is at most 1
        if len(found) == 3:
            break
    assert set(found) == {"early", "late", "never"}, f"no separable entropies for {case.id}: {found}"
    for kind, (index, layer, threshold) in found.items():
        inputs = prepare(case, model, processor, [index])
        double, sequence, seen_memory = first_layer_input(case, model, inputs)
        memory = seen_memory if case.vision else memories(case, model, [index])[0].double()
        expected, trigger, _ = reference(case, double, sequence, memory, threshold)
        assert trigger == layer
        vanilla = model(**inputs).logits[0]
        hallupatch.apply(model, "memvr", entropy_threshold=threshold, retracing_ratio=0.5, **WINDOW)
        if not case.vision:
            hallupatch.set_visual_memory(model, memories(case, model, [index]))
        logits = model(**inputs).logits[0]
        patch = get_patch(model)
        captured = patch.generation.visual_memory[0]
        assert hallupatch.get_trace(model).passes[0].trigger_layer == [layer], kind
        hallupatch.remove(model)
        torch.testing.assert_close(captured.double(), memory, rtol=1e-5, atol=1e-5)   # the memory is what was merged
        torch.testing.assert_close(logits.double(), expected, rtol=1e-4, atol=1e-4)
        if layer is None:
            assert torch.equal(logits, vanilla)
        else:
            assert (logits - vanilla).abs().max() > 1e-3, f"retracing ({kind}) must change the logits"


def test_dola_matches_float64_oracle_every_step_and_batch_equals_single(case, loaded):
    model, processor = loaded
    decoder, head = case.decoder(model)
    assert candidate_layers("low", LAYERS, case.tied)[0] == (2 if case.tied else 0)
    hallupatch.apply(model, "dola", candidate_layers="low")
    assert get_patch(model).methods["dola"].candidates == candidate_layers("low", LAYERS, case.tied)
    candidates = list(range(LAYERS))
    hallupatch.apply(model, "dola", candidate_layers=candidates)
    indices = [0, 2]
    inputs = prepare(case, model, processor, indices)
    out = quiet_generate(model, **inputs, **NEVER_STOP, return_dict_in_generate=True, output_scores=True,
                         output_logits=True, output_hidden_states=True)
    chosen = hallupatch.get_trace(model, "dola").layers()
    for step, hidden_states in enumerate(out.hidden_states):
        for row in range(len(indices)):
            premature = torch.stack([hidden_states[k][row, -1] for k in candidates])
            _, best, expected = float64_step(out.logits[step][row], premature, head.weight)
            assert chosen[row][step] == candidates[best]
            actual = out.scores[step][row].double()
            assert torch.equal(torch.isinf(actual), torch.isinf(expected))
            keep = torch.isfinite(expected)
            torch.testing.assert_close(actual[keep], expected[keep], rtol=1e-4, atol=1e-4)
    for row, index in enumerate(indices):
        alone = quiet_generate(model, **prepare(case, model, processor, [index]), **NEVER_STOP,
                               return_dict_in_generate=True, output_scores=True)
        assert torch.equal(alone.sequences[0, -STEPS:], out.sequences[row, -STEPS:])
        for step in range(STEPS):
            torch.testing.assert_close(alone.scores[step][0], out.scores[step][row], rtol=1e-4, atol=1e-4)
    hallupatch.remove(model)


def test_each_sample_gets_the_tokens_of_its_own_images(case, loaded):
    """A prompt with two images and one with one, batched: each sample's memory is its images' tokens, in
    order (several images or sub-images of one sample are one memory)."""
    if not case.vision:
        pytest.skip("a text decoder has no images (its memory is given with set_visual_memory)")
    model, processor = loaded
    two = VLM_PROMPTS[0].replace("<image>", "<image> <image>")
    images = case.images([5, 6, 7])
    if case.architecture.startswith("Idefics2"):
        nested = [images[0] + images[1], images[2]]
    else:
        nested = images
    hallupatch.apply(model, "memvr", entropy_threshold=float("inf"), **WINDOW)

    def memory_of(texts, pictures):
        quiet_generate(model, **processor(text=texts, images=pictures, return_tensors="pt", padding=True),
                       max_new_tokens=1, do_sample=False)
        return get_patch(model).generation.visual_memory

    batch = memory_of([two, VLM_PROMPTS[1]], nested)
    singles = [memory_of([VLM_PROMPTS[1]], [picture])[0] for picture in images]
    assert [m.shape[0] for m in batch] == [singles[0].shape[0] * 2, singles[2].shape[0]]
    torch.testing.assert_close(batch[0], torch.cat(singles[:2]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batch[1], singles[2], rtol=1e-5, atol=1e-6)


def test_memvr_left_padded_batch_equals_samples_alone(case, loaded):
    model, processor = loaded
    indices = [0, 1, 2]
    hallupatch.apply(model, "memvr", entropy_threshold=float("inf"), **WINDOW)
    model(**prepare(case, model, processor, indices))
    values = sorted(v for row in hallupatch.get_trace(model).passes[0].entropies for v in row.values())
    threshold = (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2   # fires at some layers, not all
    hallupatch.apply(model, "memvr", entropy_threshold=threshold, retracing_ratio=0.5, **WINDOW)
    batch = prepare(case, model, processor, indices)
    assert not batch["attention_mask"].all(), "the prompts must differ in length"
    out = quiet_generate(model, **batch, **GREEDY)
    batch_triggers = hallupatch.get_trace(model).trigger_layers()
    for row, index in enumerate(indices):
        alone = quiet_generate(model, **prepare(case, model, processor, [index]), **GREEDY)
        assert out[row, -STEPS:].tolist() == alone[0, -STEPS:].tolist()
        assert batch_triggers[row] == hallupatch.get_trace(model).trigger_layers()[0]
    assert any(layer is not None for row in batch_triggers for layer in row)


def test_text_only_prompt_after_image_prompt_equals_unpatched(case, loaded, checkpoint):
    model, processor = loaded
    untouched, _ = load_checkpoint(checkpoint)
    if case.vision:
        text = dict(processor.tokenizer([TEXT_ONLY_PROMPT], return_tensors="pt"))
    else:
        text = dict(input_ids=torch.tensor([TEXT_PROMPTS[3]]))
    hallupatch.apply(model, "memvr", entropy_threshold=0.0, retracing_ratio=0.9, **WINDOW)   # any memory fires
    quiet_generate(model, **prepare(case, model, processor, [0]), **GREEDY)
    assert hallupatch.get_trace(model).trigger_layers()[0][0] is not None
    if not case.vision:
        hallupatch.set_visual_memory(model, None)
    kwargs = dict(GREEDY, return_dict_in_generate=True, output_logits=True)
    patched = quiet_generate(model, **text, **kwargs)
    plain = quiet_generate(untouched, **text, **kwargs)
    assert hallupatch.get_trace(model).trigger_layers() == [[None] * STEPS]
    assert torch.equal(patched.sequences, plain.sequences)
    for a, b in zip(patched.logits, plain.logits):
        assert torch.equal(a, b)


def test_remove_is_bit_identical(case, loaded, checkpoint):
    model, processor = loaded
    untouched, _ = load_checkpoint(checkpoint)
    inputs = prepare(case, model, processor, [1])
    expected = untouched(**inputs).logits
    hooks = _hook_count(model)
    config = [hallupatch.MemVRConfig(entropy_threshold=0.0, retracing_ratio=0.5, **WINDOW),
              hallupatch.DoLaConfig(candidate_layers="high")]
    hallupatch.apply(model, "memvr+dola", config=config)
    if not case.vision:
        hallupatch.set_visual_memory(model, memories(case, model, [1]))
    assert not torch.equal(model(**inputs).logits, expected)
    quiet_generate(model, **inputs, **GREEDY)
    assert hallupatch.remove(model) is model
    assert _hook_count(model) == hooks and get_patch(model) is None
    assert torch.equal(model(**inputs).logits, expected)
    assert torch.equal(quiet_generate(model, **inputs, **GREEDY), quiet_generate(untouched, **inputs, **GREEDY))


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
