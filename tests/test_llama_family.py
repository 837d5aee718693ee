"""The three llama-family model kinds, the early-exit head and every error of the public API."""
import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, LlamaModel

import hallupatch
from memvr_reference import double_copy, memvr_reference

WINDOW = dict(starting_layer=0, ending_layer=3)
ORIGINAL_LLAVA_IMAGE_TOKEN = -200


def tiny_llama_config(**extra):
    return LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=128, pad_token_id=0, **extra,
    )


def saved_and_reloaded(model, cls, tmp_path):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 1.0 / p.shape[-1] ** 0.5)
    model.save_pretrained(tmp_path)
    return cls.from_pretrained(tmp_path, attn_implementation="eager").eval()


class StandInLlavaLlamaModel(LlamaModel):
    """Same structure as the original LLaVA repository's ``LlavaLlamaModel``: a ``LlamaModel`` with an
    ``mm_projector`` (the vision tower is left out: ``images`` are CLIP features here)."""

    def __init__(self, config):
        super().__init__(config)
        self.mm_projector = nn.Sequential(
            nn.Linear(config.mm_hidden_size, config.hidden_size), nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size)
        )


class StandInLlavaLlamaForCausalLM(LlamaForCausalLM):
    """Like the original ``LlavaLlamaForCausalLM``: ``generate(inputs, images=...)`` projects the images,
    splices them in at the ``-200`` tokens and generates from ``inputs_embeds``."""

    def __init__(self, config):
        super().__init__(config)
        self.model = StandInLlavaLlamaModel(config)
        self.post_init()

    def splice_images(self, input_ids, images):
        features = self.model.mm_projector(images)
        rows = []
        for ids, image in zip(input_ids, features):
            at = (ids == ORIGINAL_LLAVA_IMAGE_TOKEN).nonzero()[0, 0]
            embeds = self.model.embed_tokens(ids.clamp(min=0))
            rows.append(torch.cat([embeds[:at], image, embeds[at + 1:]]))
        return torch.stack(rows)

    def generate(self, inputs=None, images=None, **kwargs):
        embeds = self.splice_images(inputs, images)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        return super().generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)


def test_plain_llama_with_explicit_visual_memory_matches_reference(tmp_path):
    model = saved_and_reloaded(LlamaForCausalLM(tiny_llama_config()), LlamaForCausalLM, tmp_path)
    ids = torch.tensor([[5, 17, 33, 8, 61, 2, 44]])
    memory = torch.randn(9, 32, generator=torch.Generator().manual_seed(1))
    ref, trigger, _ = memvr_reference(
        double_copy(model), model.model.embed_tokens(ids[0]).double(), memory,
        ratio=0.4, threshold=0.0, start=0, end=3,
    )
    hallupatch.apply(model, "memvr", entropy_threshold=0.0, retracing_ratio=0.4, **WINDOW)
    hallupatch.set_visual_memory(model, memory)
    logits = model(ids).logits[0]
    assert trigger == 1 and hallupatch.get_trace(model).passes[0].trigger_layer == [1]
    torch.testing.assert_close(logits.double(), ref, rtol=1e-4, atol=1e-4)
    hallupatch.set_visual_memory(model, None)  # cleared: a plain llama without memory is never retraced
    hallupatch.remove(model)
    vanilla = model(ids).logits[0]
    hallupatch.apply(model, "memvr", entropy_threshold=0.0, **WINDOW)
    assert torch.equal(model(ids).logits[0], vanilla)
    with pytest.raises(ValueError, match="hidden size 32"):
        hallupatch.set_visual_memory(model, torch.randn(4, 16))
    hallupatch.set_visual_memory(model, [memory, memory])
    with pytest.raises(ValueError, match="one entry per sample"):
        model(ids)


def test_original_llava_class_captures_its_mm_projector(tmp_path):
    config = tiny_llama_config(mm_hidden_size=24)
    model = saved_and_reloaded(StandInLlavaLlamaForCausalLM(config), StandInLlavaLlamaForCausalLM, tmp_path)
    assert type(model).__name__ != "LlamaForCausalLM" and model.model.mm_projector is not None
    ids = torch.tensor([[1, 12, ORIGINAL_LLAVA_IMAGE_TOKEN, 40, 7, 9]])
    images = torch.randn(1, 5, 24, generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    vanilla = model.generate(ids, images=images, **kwargs)
    hallupatch.apply(model, "memvr", entropy_threshold=0.0, retracing_ratio=0.5, **WINDOW)
    patched = model.generate(ids, images=images, **kwargs)
    assert hallupatch.get_trace(model).trigger_layers() == [[1, 1, 1]]
    memory = hallupatch.remove(model).model.mm_projector(images)[0]
    ref, _, _ = memvr_reference(
        double_copy(model), model.splice_images(ids, images)[0].double(), memory,
        ratio=0.5, threshold=0.0, start=0, end=3,
    )
    torch.testing.assert_close(patched.logits[0][0].double(), ref[-1], rtol=1e-4, atol=1e-4)
    assert not torch.equal(patched.logits[0], vanilla.logits[0])


def test_llava_hf_reloaded_checkpoint_is_supported(llava):
    model, _ = llava
    parts = hallupatch.apply(model, **WINDOW)._hallupatch.parts
    assert parts.spec.name == "llama"
    assert parts.visual is model.multi_modal_projector and parts.layers is model.language_model.model.layers


def test_early_exit_logits_is_the_logit_lens(llava):
    from hallupatch.testing.tiny import tiny_image

    model, processor = llava
    inputs = processor(text="USER: <image>\nwhat is this ? ASSISTANT:", images=tiny_image(3), return_tensors="pt")
    out = model(**inputs, output_hidden_states=True)
    lm = model.language_model
    n = len(lm.model.layers)
    assert len(out.hidden_states) == n + 1
    for k in range(n):
        expected = lm.lm_head(lm.model.norm(out.hidden_states[k]))
        assert torch.equal(hallupatch.early_exit_logits(model, out.hidden_states, k), expected)
        assert torch.equal(hallupatch.early_exit_logits(model, out.hidden_states[k], k), expected)
        assert torch.equal(hallupatch.early_exit_logits(model, out.hidden_states, k, norm=False), lm.lm_head(out.hidden_states[k]))
    assert torch.equal(hallupatch.early_exit_logits(model, out.hidden_states, n), out.logits)
    assert torch.equal(hallupatch.early_exit_logits(model, out.hidden_states, -1), out.logits)
    with pytest.raises(ValueError, match=r"\[0, 6\]"):
        hallupatch.early_exit_logits(model, out.hidden_states, n + 1)


def test_unsupported_model_names_every_supported_architecture():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    for model in (gpt2, nn.Linear(3, 3)):
        with pytest.raises(TypeError, match="does not support (GPT2LMHeadModel|Linear): supported architectures") as err:
            hallupatch.apply(model)
        for architecture in hallupatch.supported():
            assert architecture in str(err.value)
        assert "hallupatch.supported()" in str(err.value)
    assert {"LlamaForCausalLM", "LlavaNextForConditionalGeneration", "QWenLMHeadModel",
            "ChatGLMForConditionalGeneration"} <= set(hallupatch.supported())


@pytest.mark.parametrize(
    "knobs, message",
    [
        (dict(retracing_ratio=-0.1), r"retracing_ratio must be in \[0, 1\]"),
        (dict(retracing_ratio=1.5), r"retracing_ratio must be in \[0, 1\]"),
        (dict(entropy_threshold=-0.01), "entropy_threshold must be >= 0"),
        (dict(starting_layer=-1, ending_layer=3), "0 <= starting_layer < ending_layer"),
        (dict(starting_layer=3, ending_layer=3), "0 <= starting_layer < ending_layer"),
        (dict(starting_layer=0, ending_layer=4), r"ending_layer must be <= num_layers - 1 = 3"),
        (dict(adapter_activation="nope", **WINDOW), "adapter_activation 'nope' does not exist"),
    ],
)
def test_bad_knobs_name_the_valid_range(tmp_path, knobs, message):
    model = LlamaForCausalLM(tiny_llama_config())
    with pytest.raises(ValueError, match=message):
        hallupatch.apply(model, "memvr", **knobs)
    assert getattr(model, "_hallupatch", None) is None
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0


def test_unknown_knob_and_method_are_refused():
    model = LlamaForCausalLM(tiny_llama_config())
    with pytest.raises(TypeError, match="valid knobs"):
        hallupatch.apply(model, "memvr", ratio=0.1, **WINDOW)
    with pytest.raises(ValueError, match="unknown method 'nosuchmethod'"):
        hallupatch.apply(model, "nosuchmethod")
    with pytest.raises(ValueError, match="call hallupatch.apply"):
        hallupatch.get_trace(model)


def test_activation_default_and_override(tmp_path):
    model = LlamaForCausalLM(tiny_llama_config())
    hallupatch.apply(model, **WINDOW)
    assert model._hallupatch.methods["memvr"].activation(torch.tensor([-1.0])).item() == -1.0  # identity for llama
    hallupatch.apply(model, adapter_activation="silu", **WINDOW)
    assert model._hallupatch.methods["memvr"].activation(torch.tensor([-1.0])).item() == pytest.approx(-0.2689, abs=1e-4)


def test_refused_apply_keeps_the_previous_patch_and_memory_survives_reapply(tmp_path):
    model = saved_and_reloaded(LlamaForCausalLM(tiny_llama_config()), LlamaForCausalLM, tmp_path)
    ids = torch.tensor([[5, 17, 33, 8]])
    memory = torch.randn(6, 32, generator=torch.Generator().manual_seed(3))
    hallupatch.apply(model, "memvr", entropy_threshold=0.0, retracing_ratio=0.4, **WINDOW)
    hallupatch.set_visual_memory(model, memory)
    expected = model(ids).logits
    with pytest.raises(ValueError, match="ending_layer must be <= num_layers - 1 = 3"):
        hallupatch.apply(model, "memvr", starting_layer=0, ending_layer=9)
    assert torch.equal(model(ids).logits, expected), "a refused apply must leave the previous patch in place"
    hallupatch.apply(model, "memvr", entropy_threshold=0.0, retracing_ratio=0.4, **WINDOW)
    assert torch.equal(model(ids).logits, expected), "re-applying keeps the user's visual memory"
    hallupatch.generate_candidates(model, ids, layers=[0, 2], max_new_tokens=2, do_sample=False)
    assert torch.equal(model(ids).logits, expected), "generate_candidates restores the patch with its memory"


@pytest.mark.parametrize("knobs", [dict(retracing_ratio="0.5"), dict(entropy_threshold=True),
                                   dict(starting_layer=0.5, ending_layer=3), dict(starting_layer=True, ending_layer=3),
                                   dict(early_exit_norm="yes", **WINDOW)])
def test_knobs_of_the_wrong_type_are_refused(knobs):
    with pytest.raises(ValueError, match="must be"):
        hallupatch.MemVRConfig(**knobs)
