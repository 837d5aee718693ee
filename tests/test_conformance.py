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

import tiny_qwen2_vl
import tiny_remote
from dola_oracle import float64_step
from memvr_reference import memvr_reference_decoder, memvr_reference_hooks
from remote_code_fixtures import load as load_remote

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
@dataclass
class Decoder:
    """What the references need: the decoder layers, final norm and LM head, each layer's feed-forward
    module and its input / output projection weights (DESIGN 4b's W_in, W_out)."""

    layers: torch.nn.ModuleList
    norm: torch.nn.Module
    head: torch.nn.Module
    mlp: Callable = lambda layer: layer.mlp
    w_in: Callable = lambda layer: layer.mlp.up_proj.weight
    w_out: Callable = lambda layer: layer.mlp.down_proj.weight


def language_model_decoder(model):
    """A ``*ForCausalLM`` or a LLaVA-style model's ``language_model``."""
    lm = getattr(model, "language_model", model)
    return Decoder(lm.model.layers, lm.model.norm, lm.lm_head)


def idefics2_decoder(model):
    return Decoder(model.model.text_model.layers, model.model.text_model.norm, model.lm_head)


def qwen_decoder(model):
    t = model.transformer
    return Decoder(t.h, t.ln_f, model.lm_head, w_in=lambda layer: layer.mlp.w1.weight,
                   w_out=lambda layer: layer.mlp.c_proj.weight)


def glm_decoder(model):
    t = model.transformer
    return Decoder(t.encoder.layers, t.encoder.final_layernorm, t.output_layer,
                   w_in=lambda layer: layer.mlp.dense_h_to_4h.weight, w_out=lambda layer: layer.mlp.dense_4h_to_h.weight)


# where each image's rows sit in the sequence the first layer sees: (rows of the images, rows of the text)
def expanded_placeholders(token, width=1):
    """Each image's ``width`` placeholder tokens (from the first ``token``) became the image's rows (LLaVA: the
    ``<image>`` token; GLM-4V: ``<boi> x <eoi>``); all images of a sample have as many rows."""
    def rows(ids, seq_len):
        marks = (ids == token).nonzero().flatten().tolist()
        per_image = (seq_len - ids.shape[0]) // len(marks) + width
        image_rows, text_rows, shift = [], [], 0
        previous = 0
        for at in marks:
            text_rows += [(i, i + shift) for i in range(previous, at)]
            image_rows += list(range(at + shift, at + shift + per_image))
            shift += per_image - width
            previous = at + width
        text_rows += [(i, i + shift) for i in range(previous, ids.shape[0])]
        return image_rows, text_rows
    return rows


def placeholder_per_row(token):
    """One placeholder per visual row, replaced in place (Idefics2)."""
    def rows(ids, seq_len):
        image = (ids == token).nonzero().flatten().tolist()
        return image, [(i, i) for i in range(ids.shape[0]) if i not in set(image)]
    return rows


def between_markers(start, end):
    """The positions strictly between ``start`` and ``end`` markers are replaced in place (Qwen-VL)."""
    def rows(ids, seq_len):
        image, inside = [], False
        for i, token in enumerate(ids.tolist()):
            if token == end:
                inside = False
            if inside:
                image.append(i)
            if token == start:
                inside = True
        return image, [(i, i) for i in range(ids.shape[0]) if i not in set(image)]
    return rows


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def processor_inputs(case, processor, indices, workdir, prompts=None):
    prompts = prompts or [VLM_PROMPTS[i] for i in indices]
    return dict(processor(text=prompts, images=case.images(indices), return_tensors="pt", padding=True))


def text_decoder_inputs(case, processor, indices, workdir):
    ids, mask = left_pad([TEXT_PROMPTS[i] for i in indices], 0)
    return dict(input_ids=ids, attention_mask=mask)


def processor_text_only(processor, workdir):
    return dict(processor.tokenizer([TEXT_ONLY_PROMPT], return_tensors="pt"))


def text_decoder_text_only(processor, workdir):
    return dict(input_ids=torch.tensor([TEXT_PROMPTS[3]]))


def left_pad(rows, pad_id):
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


QWEN_TEXTS = ["what is in the picture", "hi", "describe the whole scene in detail please", "which color"]


def qwen_prompt(workdir, seeds, text):
    tokenizer = tiny_remote.ByteTokenizer()
    images = "".join(f"<img>{tiny_remote.write_tiny_image(workdir / f'image_{s}.png', seed=s)}</img>" for s in seeds)
    return tokenizer.encode(images + text)


def qwen_inputs(case, processor, indices, workdir):
    ids, mask = left_pad([qwen_prompt(workdir, [i], QWEN_TEXTS[i]) for i in indices], tiny_remote.QWEN_EOD)
    return dict(input_ids=ids, attention_mask=mask)


def qwen_text_only(processor, workdir):
    return dict(input_ids=torch.tensor([tiny_remote.ByteTokenizer().encode("only words here")]))


GLM_TEXTS = [[7, 8, 9, 10, 11], [14, 15], [20, 21, 22, 23, 24, 25, 26, 27], [30, 31, 32]]


def glm_inputs(case, processor, indices, workdir):
    ids, mask = left_pad([tiny_remote.glm_prompt(GLM_TEXTS[i]) for i in indices], tiny_remote.GLM_PAD)
    images = torch.stack([tiny_remote.glm_image_batch(1, seed=i)[0] for i in indices])
    return dict(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), images=images)


def qwen2_vl_chat(processor, question, images=1):
    """Qwen2-VL's chat template: a user turn with ``images`` images then the question, and the reply prompt."""
    content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def qwen2_vl_inputs(case, processor, indices, workdir):
    texts = [qwen2_vl_chat(processor, VLM_PROMPTS[i].split("\n", 1)[1].replace(" ASSISTANT:", "")) for i in indices]
    return dict(processor(text=texts, images=case.images(indices), return_tensors="pt", padding=True))


def glm_text_only(processor, workdir):
    ids = torch.tensor([tiny_remote.glm_prompt([7, 8, 9], with_image=False)])
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids))


# ---------------------------------------------------------------------------------------------
# the architectures
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    id: str
    architecture: str             # the class name, as hallupatch.supported() lists it
    family: str                   # the registered spec that must be detected
    build: Callable               # build(path) -> checkpoint folder
    load: Callable = load_checkpoint   # load(path) -> (model, processor or None)
    decoder: Callable = language_model_decoder
    inputs: Callable = processor_inputs
    text_only: Callable = processor_text_only
    visual_rows: Optional[Callable] = None   # model -> rows(ids, seq_len); None: a text decoder
    by_hand: bool = True          # llama-structured layers: the reference runs them by hand; else through hooks
    activation: Callable = lambda x: x   # the family's adapter activation
    multi_image: bool = True      # a prompt may hold several images
    recipe: Optional[str] = None  # the eval recipe detected from config.json (None: a text decoder)
    # the published prompt, written out here; None: the eval run is not testable here (no tokenizer files)
    eval_prompt: Optional[str] = None
    image_size: tuple = (56, 56)
    tied: bool = False            # input and output embeddings shared (Gemma)
    # how the recipe words an MME question: LLaVA-1.5's short-answer rewrite, or VLMEvalKit's yes/no suffix
    question_suffix: str = "\nAnswer the question using a single word or phrase."

    @property
    def vision(self) -> bool:
        return self.visual_rows is not None

    def images(self, indices):
        images = [tiny_image(i, 56).resize(self.image_size) for i in indices]
        return [[image] for image in images] if self.architecture.startswith("Idefics2") else images


def _builder(architecture, **kwargs):
    def build(path):
        return build_checkpoint(path, architecture, num_layers=LAYERS, **kwargs)
    return build


def _llava_hf(path):
    return build_tiny_llava_checkpoint(path, num_layers=LAYERS)


def _remote_builder(family):
    layers = {"qwen": "num_hidden_layers", "chatglm": "num_layers"}[family]

    def build(path):
        return tiny_remote.build_tiny_checkpoint(path, family, seed=1, **{layers: LAYERS})
    return build


def _remote_load(path):
    return load_remote(path), None


def _qwen2_vl_builder(family):
    def build(path):
        from hallupatch import modeling

        path = tiny_qwen2_vl.build_checkpoint(path, family, num_layers=LAYERS)
        modeling.install(path, {"method": "none"})   # the drop-in files (transformers 4.40 has no Qwen2-VL)
        return path
    return build


def _qwen2_vl_load(path):
    from transformers import AutoModelForVision2Seq, AutoProcessor

    tiny_remote.forget_remote_modules()
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    processor.tokenizer.padding_side = "left"
    return AutoModelForVision2Seq.from_pretrained(path, trust_remote_code=True).eval(), processor


def _llava_rows(model):
    return expanded_placeholders(model.config.image_token_index)


VICUNA_V1 = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
             "detailed, and polite answers to the user's questions. USER: <image>\n{question} ASSISTANT:")
MISTRAL_INSTRUCT = "[INST] <image>\n{question} [/INST]"
VIP_LLAVA = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
             "detailed, and polite answers to the human's questions.###Human: <image>\n{question}###Assistant:")
IDEFICS2_CHAT = "User:<image>{question}<end_of_utterance>\nAssistant:"
QWEN2_VL_CHAT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                 "<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n")

CASES = [
    Case("llava-hf", "LlavaForConditionalGeneration", "llama", _llava_hf, visual_rows=_llava_rows,
         recipe="llava-hf", eval_prompt=VICUNA_V1),
    Case("llava-next-vicuna", "LlavaNextForConditionalGeneration", "llava_next", _builder("llava_next"),
         visual_rows=_llava_rows, image_size=(56, 40),   # not square: the anyres grid is unpadded
         recipe="llava-next-vicuna", eval_prompt=VICUNA_V1),
    Case("llava-next-mistral", "LlavaNextForConditionalGeneration", "llava_next", _builder("llava_next_mistral"),
         visual_rows=_llava_rows, recipe="llava-next-mistral", eval_prompt=MISTRAL_INSTRUCT),
    Case("vipllava", "VipLlavaForConditionalGeneration", "llama", _builder("vipllava"), visual_rows=_llava_rows,
         recipe="vipllava", eval_prompt=VIP_LLAVA),
    Case("idefics2", "Idefics2ForConditionalGeneration", "idefics2", _builder("idefics2"), decoder=idefics2_decoder,
         visual_rows=lambda model: placeholder_per_row(model.config.image_token_id), recipe="idefics2",
         eval_prompt=IDEFICS2_CHAT),
    Case("llama", "LlamaForCausalLM", "llama", _builder("llama"), inputs=text_decoder_inputs,
         text_only=text_decoder_text_only),
    Case("llama3-128k-vocab", "LlamaForCausalLM", "llama", _builder("llama3"), inputs=text_decoder_inputs,
         text_only=text_decoder_text_only),
    Case("mistral", "MistralForCausalLM", "llama", _builder("mistral"), inputs=text_decoder_inputs,
         text_only=text_decoder_text_only),
    Case("qwen2", "Qwen2ForCausalLM", "llama", _builder("qwen2"), inputs=text_decoder_inputs,
         text_only=text_decoder_text_only),
    Case("gemma", "GemmaForCausalLM", "llama", _builder("gemma"), inputs=text_decoder_inputs,
         text_only=text_decoder_text_only, tied=True),
    Case("qwen-vl-chat", "QWenLMHeadModel", "qwen", _remote_builder("qwen"), load=_remote_load, decoder=qwen_decoder,
         inputs=qwen_inputs, text_only=qwen_text_only, by_hand=False, activation=torch.nn.functional.silu,
         recipe="qwen-vl",
         visual_rows=lambda model: between_markers(tiny_remote.QWEN_IMG_START, tiny_remote.QWEN_IMG_START + 1)),
    Case("glm-4v", "ChatGLMForConditionalGeneration", "chatglm", _remote_builder("chatglm"), load=_remote_load,
         decoder=glm_decoder, inputs=glm_inputs, text_only=glm_text_only, by_hand=False,
         activation=torch.nn.functional.silu, multi_image=False,   # GLM-4V takes one image per conversation
         recipe="glm-4v",
         visual_rows=lambda model: expanded_placeholders(tiny_remote.GLM_BOI, width=3)),
    # Qwen2-VL / Qwen2.5-VL through hallupatch's drop-in files (the architectures need transformers >= 4.45);
    # their layers need M-RoPE position embeddings, so the MemVR reference runs through hooks
    Case("qwen2-vl", "Qwen2VLForConditionalGeneration", "qwen2_vl", _qwen2_vl_builder("qwen2_vl"),
         load=_qwen2_vl_load, inputs=qwen2_vl_inputs, by_hand=False, recipe="qwen2-vl", eval_prompt=QWEN2_VL_CHAT,
         question_suffix=" Please answer yes or no.",
         visual_rows=lambda model: placeholder_per_row(model.config.image_token_id)),
    Case("qwen2.5-vl", "Qwen2_5_VLForConditionalGeneration", "qwen2_vl", _qwen2_vl_builder("qwen2_5_vl"),
         load=_qwen2_vl_load, inputs=qwen2_vl_inputs, by_hand=False, recipe="qwen2.5-vl",
         eval_prompt=QWEN2_VL_CHAT, question_suffix=" Please answer yes or no.",
         visual_rows=lambda model: placeholder_per_row(model.config.image_token_id)),
]
# the original LLaVA repository's class is tested in test_llama_family.py (a stand-in: its package is not a
# dependency)
TESTED_ELSEWHERE = {"LlavaLlamaForCausalLM"}


@pytest.fixture(scope="module", params=CASES, ids=[c.id for c in CASES])
def case(request):
    return request.param


@pytest.fixture(scope="module")
def checkpoint(case, tmp_path_factory):
    return case.build(tmp_path_factory.mktemp(case.id) / "checkpoint")


@pytest.fixture()
def loaded(case, checkpoint):
    return case.load(checkpoint)


@pytest.fixture(scope="module")
def workdir(checkpoint):
    """Where prompts that name image files (Qwen-VL) keep them."""
    return checkpoint.parent


def memories(case, model, indices):
    """Explicit visual tokens for a text decoder (``None`` for a VLM, which captures its own)."""
    if case.vision:
        return None
    hidden = model.config.hidden_size
    return [torch.randn(5 + i, hidden, generator=torch.Generator().manual_seed(100 + i)) for i in indices]


def prepare(case, model, processor, indices, workdir):
    """Inputs of the samples ``indices`` (left-padded when several) and, for a text decoder, their memory set."""
    memory = memories(case, model, indices)
    if get_patch(model) is not None and memory is not None:
        hallupatch.set_visual_memory(model, memory)
    return case.inputs(case, processor, indices, workdir)


def quiet_generate(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(**kwargs)


# ---------------------------------------------------------------------------------------------
# the float64 MemVR references, fed with what the first decoder layer sees
# ---------------------------------------------------------------------------------------------
class StopForward(Exception):
    """Ends a forward pass once the first decoder layer's input is seen."""


def first_layer_input(case, model, inputs):
    """The (seq, hidden) float64 sequence entering the first decoder layer of a one-sample input and the
    visual memory read off it (``None`` for a text decoder). Run in the model's float32: transformers 4.40's
    Mistral-style mask builder cannot make float64 masks."""
    seen = []

    def stop_at_first_layer(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"])[0].double())
        raise StopForward

    handle = case.decoder(model).layers[0].register_forward_pre_hook(stop_at_first_layer, with_kwargs=True)
    try:
        model(**inputs)
    except StopForward:
        pass
    finally:
        handle.remove()
    sequence = seen[0]
    if not case.vision:
        return sequence, None
    ids = inputs["input_ids"][0]
    image_rows, text_rows = case.visual_rows(model)(ids, sequence.shape[0])
    # the split is right: every other row is its token's embedding
    token_rows = model.get_input_embeddings()(ids[[i for i, _ in text_rows]]).double()
    torch.testing.assert_close(sequence[[j for _, j in text_rows]], token_rows, rtol=0, atol=0)
    return sequence, sequence[image_rows]


def reference(case, model, inputs, sequence, memory, threshold):
    """MemVR on one sample in float64: (logits, trigger layer, entropies)."""
    double = copy.deepcopy(model).double()
    parts = case.decoder(double)
    knobs = dict(ratio=0.5, threshold=threshold, start=WINDOW["starting_layer"], end=WINDOW["ending_layer"],
                 activation=case.activation)
    if case.by_hand:
        return memvr_reference_decoder(parts, parts.head, sequence, memory, **knobs)
    wide = {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}
    return memvr_reference_hooks(double, parts, wide, memory, **knobs)


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


def test_early_exit_head_is_the_logit_lens(case, loaded, workdir):
    """``early_exit_logits`` = ``lm_head(final_norm(h))`` (``norm=False``: ``lm_head(h)``) at every hidden-state
    index, against float64 copies of the norm and head; index N is the model's own logits."""
    model, processor = loaded
    inputs = prepare(case, model, processor, [2], workdir)
    out = model(**inputs, output_hidden_states=True)
    parts = case.decoder(model)
    norm64, head64 = copy.deepcopy(parts.norm).double(), copy.deepcopy(parts.head).double()
    assert len(out.hidden_states) == LAYERS + 1
    for k in range(LAYERS):
        h = out.hidden_states[k].double()
        torch.testing.assert_close(hallupatch.early_exit_logits(model, out.hidden_states, k).double(), head64(norm64(h)),
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(hallupatch.early_exit_logits(model, out.hidden_states[k], k, norm=False).double(),
                                   head64(h), rtol=1e-4, atol=1e-4)
    assert torch.equal(hallupatch.early_exit_logits(model, out.hidden_states, LAYERS), out.logits)


def test_tied_embeddings_rule(case, loaded, workdir):
    """DoLa skips hidden-state indices 0 and 1 when the LM head is the input embedding (Gemma): there the
    embedding output's early exit, ``E·(sqrt(d)·E[x])`` for Gemma's scaled embeddings, just repeats the
    input token; the scale only sharpens that copy, so the rule applies unchanged."""
    from hallupatch.methods.dola import tied_embeddings

    model, processor = loaded
    parts = hallupatch.apply(model, "dola")._hallupatch.parts
    assert tied_embeddings(parts) == case.tied
    assert candidate_layers("low", LAYERS, case.tied)[0] == (2 if case.tied else 0)
    hallupatch.apply(model, "dola", candidate_layers="low")
    assert get_patch(model).methods["dola"].candidates == candidate_layers("low", LAYERS, case.tied)
    if case.tied:
        inputs = prepare(case, model, processor, [2], workdir)
        embedded = model(**inputs, output_hidden_states=True).hidden_states[0]
        copies = hallupatch.early_exit_logits(model, embedded, 0, norm=False).argmax(-1)
        assert torch.equal(copies, inputs["input_ids"])


def test_memvr_matches_float64_reference_early_late_never(case, loaded, workdir):
    model, processor = loaded
    first_checked = WINDOW["starting_layer"] + 1

    def sample(index):
        inputs = prepare(case, model, processor, [index], workdir)
        sequence, seen_memory = first_layer_input(case, model, inputs)
        memory = seen_memory if case.vision else memories(case, model, [index])[0].double()
        return inputs, sequence, memory

    found = {}
    for index in range(len(VLM_PROMPTS)):
        _, _, entropies = reference(case, model, *sample(index), threshold=2.0)
        for layer, threshold in separating_thresholds(entropies).items():
            found.setdefault("early" if layer == first_checked else "late", (index, layer, threshold))
        found.setdefault("never", (index, None, 1.5))   # normalised entropy is at most 1
        if len(found) == 3:
            break
    assert set(found) == {"early", "late", "never"}, f"no separable entropies for {case.id}: {found}"
    for kind, (index, layer, threshold) in found.items():
        inputs, sequence, memory = sample(index)
        expected, trigger, _ = reference(case, model, inputs, sequence, memory, threshold)
        assert trigger == layer
        vanilla = model(**inputs).logits[0]
        hallupatch.apply(model, "memvr", entropy_threshold=threshold, retracing_ratio=0.5, **WINDOW)
        if not case.vision:
            hallupatch.set_visual_memory(model, memories(case, model, [index]))
        logits = model(**inputs).logits[0]
        captured = get_patch(model).generation.visual_memory[0]
        assert hallupatch.get_trace(model).passes[0].trigger_layer == [layer], kind
        hallupatch.remove(model)
        torch.testing.assert_close(captured.double(), memory, rtol=1e-5, atol=1e-5)   # the memory is what was merged
        torch.testing.assert_close(logits.double(), expected, rtol=1e-4, atol=1e-4)
        if layer is None:
            assert torch.equal(logits, vanilla)
        else:
            assert (logits - vanilla).abs().max() > 1e-3, f"retracing ({kind}) must change the logits"


def test_dola_matches_float64_oracle_every_step_and_batch_equals_single(case, loaded, workdir):
    model, processor = loaded
    head = case.decoder(model).head
    candidates = list(range(LAYERS))
    hallupatch.apply(model, "dola", candidate_layers=candidates)
    indices = [0, 2]
    inputs = prepare(case, model, processor, indices, workdir)
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
        alone = quiet_generate(model, **prepare(case, model, processor, [index], workdir), **NEVER_STOP,
                               return_dict_in_generate=True, output_scores=True)
        assert torch.equal(alone.sequences[0, -STEPS:], out.sequences[row, -STEPS:])
        for step in range(STEPS):
            torch.testing.assert_close(alone.scores[step][0], out.scores[step][row], rtol=1e-4, atol=1e-4)
    hallupatch.remove(model)


def multi_image_inputs(case, processor, workdir):
    """A prompt with images 5 and 6, then one with image 7; and each image alone."""
    if case.family == "qwen":
        rows = [qwen_prompt(workdir, [5, 6], QWEN_TEXTS[0]), qwen_prompt(workdir, [7], QWEN_TEXTS[1])]
        ids, mask = left_pad(rows, tiny_remote.QWEN_EOD)
        singles = [dict(input_ids=torch.tensor([qwen_prompt(workdir, [s], QWEN_TEXTS[1])])) for s in (5, 6, 7)]
        return dict(input_ids=ids, attention_mask=mask), singles
    images = case.images([5, 6, 7])
    both = [images[0] + images[1], images[2]] if case.architecture.startswith("Idefics2") else images
    if case.family == "qwen2_vl":
        texts = [qwen2_vl_chat(processor, "what is in the picture ?", images=2), qwen2_vl_chat(processor, "is there a dog ?")]
        batch = dict(processor(text=texts, images=images, return_tensors="pt", padding=True))
        singles = [dict(processor(text=[texts[1]], images=[image], return_tensors="pt")) for image in images]
        return batch, singles
    two = VLM_PROMPTS[0].replace("<image>", "<image> <image>")
    batch = dict(processor(text=[two, VLM_PROMPTS[1]], images=both, return_tensors="pt", padding=True))
    singles = [dict(processor(text=[VLM_PROMPTS[1]], images=[image], return_tensors="pt")) for image in images]
    return batch, singles


def test_each_sample_gets_the_tokens_of_its_own_images(case, loaded, workdir):
    """A prompt with two images and one with one, batched: each sample's memory is its images' tokens, in
    order (several images or sub-images of one sample are one memory)."""
    if not (case.vision and case.multi_image):
        pytest.skip("one image per prompt at most (a text decoder's memory is given with set_visual_memory)")
    model, processor = loaded
    hallupatch.apply(model, "memvr", entropy_threshold=float("inf"), **WINDOW)

    def memory_of(inputs):
        quiet_generate(model, **inputs, max_new_tokens=1, do_sample=False)
        return get_patch(model).generation.visual_memory

    batch_inputs, single_inputs = multi_image_inputs(case, processor, workdir)
    batch = memory_of(batch_inputs)
    singles = [memory_of(inputs)[0] for inputs in single_inputs]
    assert [m.shape[0] for m in batch] == [singles[0].shape[0] * 2, singles[2].shape[0]]
    torch.testing.assert_close(batch[0], torch.cat(singles[:2]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batch[1], singles[2], rtol=1e-5, atol=1e-6)


def test_memvr_left_padded_batch_equals_samples_alone(case, loaded, workdir):
    model, processor = loaded
    indices = [0, 1, 2]
    hallupatch.apply(model, "memvr", entropy_threshold=float("inf"), **WINDOW)
    model(**prepare(case, model, processor, indices, workdir))
    values = sorted(v for row in hallupatch.get_trace(model).passes[0].entropies for v in row.values())
    threshold = (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2   # fires at some layers, not all
    hallupatch.apply(model, "memvr", entropy_threshold=threshold, retracing_ratio=0.5, **WINDOW)
    batch = prepare(case, model, processor, indices, workdir)
    assert not batch["attention_mask"].all(), "the prompts must differ in length"
    out = quiet_generate(model, **batch, **GREEDY)
    batch_triggers = hallupatch.get_trace(model).trigger_layers()
    for row, index in enumerate(indices):
        alone = quiet_generate(model, **prepare(case, model, processor, [index], workdir), **GREEDY)
        assert out[row, -STEPS:].tolist() == alone[0, -STEPS:].tolist()
        assert batch_triggers[row] == hallupatch.get_trace(model).trigger_layers()[0]
    assert any(layer is not None for row in batch_triggers for layer in row)


def test_text_only_prompt_after_image_prompt_equals_unpatched(case, loaded, checkpoint, workdir):
    model, processor = loaded
    untouched, _ = case.load(checkpoint)
    text = case.text_only(processor, workdir)
    hallupatch.apply(model, "memvr", entropy_threshold=0.0, retracing_ratio=0.9, **WINDOW)   # any memory fires
    quiet_generate(model, **prepare(case, model, processor, [0], workdir), **GREEDY)
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


def test_remove_is_bit_identical(case, loaded, checkpoint, workdir):
    model, processor = loaded
    untouched, _ = case.load(checkpoint)
    inputs = prepare(case, model, processor, [1], workdir)
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


def test_idefics2_image_splitting_keeps_the_sub_images_of_a_sample_in_one_memory():
    """With ``do_image_splitting`` each image is five sub-images (four crops and the whole image), each with
    its own placeholders: a sample's memory is all of them, and the other sample's is its own alone."""
    from hallupatch.testing.families import IDEFICS2_LATENTS, tiny_vlm

    model, processor = tiny_vlm("idefics2")
    processor.image_processor.do_image_splitting = True
    images = [tiny_image(i, 56) for i in range(3)]
    hallupatch.apply(model, "memvr", entropy_threshold=float("inf"), starting_layer=0, ending_layer=3)

    def memory_of(texts, pictures):
        quiet_generate(model, **processor(text=texts, images=pictures, return_tensors="pt", padding=True),
                       max_new_tokens=1, do_sample=False)
        return get_patch(model).generation.visual_memory

    batch = memory_of(["USER: <image> <image>\nhi ASSISTANT:", VLM_PROMPTS[1]], [images[:2], images[2:]])
    assert [m.shape[0] for m in batch] == [2 * 5 * IDEFICS2_LATENTS, 5 * IDEFICS2_LATENTS]
    torch.testing.assert_close(batch[1], memory_of([VLM_PROMPTS[1]], [images[2:]])[0], rtol=1e-5, atol=1e-6)


def test_eval_cli_answers_an_mme_folder_with_the_published_prompt(case, checkpoint, mme_folder, tmp_path, monkeypatch):
    """``python -m hallupatch.eval mme --model CHECKPOINT`` detects the recipe from config.json, loads the model
    with its processor, and the model receives the published prompt (checked token for token against the
    processor's encoding of the template written out in this file) for every question of a 4-question sample."""
    from hallupatch.eval import cli, models
    from hallupatch.eval.store import read_answers
    from hallupatch.eval.tasks.mme import load_mme_folder
    from transformers import AutoProcessor

    if case.recipe is None:
        pytest.skip("a text decoder: no image benchmark")
    assert models.detect_recipe(str(checkpoint)) == case.recipe
    if case.eval_prompt is None:
        pytest.skip("the tiny remote-code checkpoints ship no tokenizer files for the eval loader")
    prefills = []

    def record_prefill(module, args, kwargs):
        if kwargs.get("pixel_values") is not None and kwargs["input_ids"].shape[1] > 1:
            prefills.append((kwargs["input_ids"], kwargs["attention_mask"]))

    load = models.load_backend

    def recording_load(*args, **kwargs):
        backend = load(*args, **kwargs)
        backend.model.register_forward_pre_hook(record_prefill, with_kwargs=True)
        return backend

    monkeypatch.setattr(models, "load_backend", recording_load)
    out = tmp_path / "out"
    scores = cli.run(["mme", "--model", str(checkpoint), "--data", str(mme_folder), "--limit", "4", "--batch-size", "2",
                      "--max-new-tokens", "2", "--method", "memvr", "--starting-layer", "0", "--ending-layer",
                      str(LAYERS - 1), "--device", "cpu", "--output", str(out), "--no-progress"])
    answers = read_answers(out / "answers.jsonl")
    assert scores["questions"] == len(answers) == 4 and all("memvr" in a for a in answers)
    questions = load_mme_folder(mme_folder)[:4]
    short = [q.question.replace(" Please answer yes or no.", "") + case.question_suffix for q in questions]
    assert [a["prompt"] for a in answers] == short
    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
    seen = [ids[mask.bool()] for batch_ids, batch_mask in prefills for ids, mask in zip(batch_ids, batch_mask)]
    assert len(seen) == 4
    for ids, question, q in zip(seen, short, questions):
        image = [q.load_image()]
        expected = processor(text=[case.eval_prompt.format(question=question)],
                             images=[image] if case.architecture.startswith("Idefics2") else image,
                             return_tensors="pt").input_ids[0]
        assert ids.tolist() == expected.tolist()
