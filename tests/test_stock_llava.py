"""The original LLaVA repository's ``LlavaLlamaForCausalLM`` as shipped, with transformers 4.40 (issue 10 §3).

Its ``forward`` has no ``cache_position`` and no ``**kwargs``, so ``generate()`` raises
``forward() got an unexpected keyword argument 'cache_position'``; users edit the file to accept and
ignore it. ``hallupatch.apply`` and ``hallupatch.make_generate_compatible`` must make the unedited class
generate exactly what the edited one does, and ``remove`` must give the unedited model back.
"""
import copy
import warnings

import pytest
import torch

import hallupatch
from hallupatch.compat import unaccepted_generation_inputs
from test_llama_family import (
    ORIGINAL_LLAVA_IMAGE_TOKEN, WINDOW, StandInLlavaLlamaForCausalLM, saved_and_reloaded, tiny_llama_config,
)

PREPARE = "prepare_inputs_for_generation"


class StockLlavaLlamaForCausalLM(StandInLlavaLlamaForCausalLM):
    """``forward`` with exactly the original's parameters (LLaVA 1.5/1.6 ``llava_llama.py``), and its
    ``prepare_inputs_for_generation``, which carries ``images`` / ``image_sizes`` through."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
                labels=None, use_cache=None, output_attentions=None, output_hidden_states=None, images=None,
                image_sizes=None, return_dict=None):
        if inputs_embeds is None and images is not None:
            inputs_embeds, input_ids = self.splice_images(input_ids, images), None
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=return_dict,
        )

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, inputs_embeds=None, **kwargs):
        images = kwargs.pop("images", None)
        image_sizes = kwargs.pop("image_sizes", None)
        inputs = super().prepare_inputs_for_generation(
            input_ids, past_key_values=past_key_values, inputs_embeds=inputs_embeds, **kwargs
        )
        if images is not None:
            inputs["images"] = images
        if image_sizes is not None:
            inputs["image_sizes"] = image_sizes
        return inputs


class EditedLlavaLlamaForCausalLM(StockLlavaLlamaForCausalLM):
    """The file as MemVR's README asks users to edit it: ``forward`` also accepts ``cache_position`` and
    ignores it."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
                labels=None, use_cache=None, output_attentions=None, output_hidden_states=None, images=None,
                image_sizes=None, return_dict=None, cache_position=None):
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, images=images,
            image_sizes=image_sizes, return_dict=return_dict,
        )


IDS = torch.tensor([[1, 12, ORIGINAL_LLAVA_IMAGE_TOKEN, 40, 7, 9]])
IMAGES = torch.randn(1, 5, 24, generator=torch.Generator().manual_seed(2))
GENERATE = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("stock-llava")
    saved_and_reloaded(StockLlavaLlamaForCausalLM(tiny_llama_config(mm_hidden_size=24)), StockLlavaLlamaForCausalLM, path)
    return path


def _load(cls, path):
    return cls.from_pretrained(path, attn_implementation="eager").eval()


def _generate(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # layer contrast's repetition-penalty advice
        return model.generate(IDS, images=IMAGES, image_sizes=[(56, 56)], **GENERATE)


def _assert_same(a, b):
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits):
        assert torch.equal(x, y)


def test_the_stand_in_fails_as_the_unedited_file_does(checkpoint):
    stock = _load(StockLlavaLlamaForCausalLM, checkpoint)
    assert unaccepted_generation_inputs(stock) == ("cache_position",)
    assert unaccepted_generation_inputs(_load(EditedLlavaLlamaForCausalLM, checkpoint)) == ()
    with pytest.raises(TypeError, match="unexpected keyword argument 'cache_position'"):
        _generate(stock)


@pytest.mark.parametrize("method, knobs", [
    ("memvr", dict(entropy_threshold=0.0, retracing_ratio=0.5, **WINDOW)),
    ("dola", dict(candidate_layers=[0, 2])),
])
def test_apply_makes_the_unedited_class_generate_as_the_edited_one(checkpoint, method, knobs):
    stock, edited = _load(StockLlavaLlamaForCausalLM, checkpoint), _load(EditedLlavaLlamaForCausalLM, checkpoint)
    hallupatch.apply(edited, method, **knobs)
    hallupatch.apply(stock, method, **knobs)
    _assert_same(_generate(stock), _generate(edited))
    if method == "memvr":
        assert hallupatch.get_trace(stock).trigger_layers() == hallupatch.get_trace(edited).trigger_layers() != [[]]
    else:
        assert hallupatch.get_layer_trace(stock).layers() == hallupatch.get_layer_trace(edited).layers()
    assert PREPARE not in vars(edited)  # a forward that takes cache_position is left alone

    hallupatch.remove(stock)
    assert PREPARE not in vars(stock)   # the exact original again: generate fails as it did
    with pytest.raises(TypeError, match="cache_position"):
        _generate(stock)
    hallupatch.remove(edited)
    plain = _load(StockLlavaLlamaForCausalLM, checkpoint)
    assert torch.equal(stock(IDS, images=IMAGES).logits, plain(IDS, images=IMAGES).logits)


def test_make_generate_compatible_for_unpatched_models(checkpoint):
    stock, edited = _load(StockLlavaLlamaForCausalLM, checkpoint), _load(EditedLlavaLlamaForCausalLM, checkpoint)
    assert hallupatch.make_generate_compatible(stock) is stock
    wrapper = vars(stock)[PREPARE]
    hallupatch.make_generate_compatible(stock)          # again: nothing changes
    assert vars(stock)[PREPARE] is wrapper
    _assert_same(_generate(stock), _generate(edited))
    assert hallupatch.make_generate_compatible(edited) is edited and PREPARE not in vars(edited)
    # a patch on top keeps the compatibility (and does not wrap twice); remove() returns to this state
    hallupatch.apply(stock, "memvr", entropy_threshold=0.0, **WINDOW)
    assert vars(stock)[PREPARE] is wrapper
    hallupatch.remove(stock)
    assert vars(stock)[PREPARE] is wrapper
    _assert_same(_generate(stock), _generate(edited))


def test_the_wrapper_follows_a_deep_copy_and_pickles(checkpoint):
    stock = hallupatch.make_generate_compatible(_load(StockLlavaLlamaForCausalLM, checkpoint))
    twin = copy.deepcopy(stock)
    assert vars(twin)[PREPARE].args[0] is twin           # the wrapper calls the copy's own method
    with torch.no_grad():
        twin.lm_head.weight.add_(1.0)           # the copy's weights, not the original's, decide its output
    assert not torch.equal(_generate(twin).logits[0], _generate(stock).logits[0])
    import pickle

    patched = hallupatch.apply(_load(StockLlavaLlamaForCausalLM, checkpoint), "memvr", entropy_threshold=0.0, **WINDOW)
    expected = _generate(patched)
    _assert_same(_generate(pickle.loads(pickle.dumps(patched))), expected)
    _assert_same(_generate(pickle.loads(pickle.dumps(stock))), _generate(stock))



# ---------------------------------------------------------------- the eval backend for original checkpoints
def _fake_llava_package(monkeypatch):
    """The two helpers of the ``llava`` package the backend calls, for the stand-in (images become
    24-dimensional "CLIP features", 5 per image)."""
    import sys
    import types

    import numpy as np

    def tokenizer_image_token(prompt, tokenizer, image_token_index, return_tensors=None):
        before, after = prompt.split("<image>")
        ids = tokenizer(before).input_ids + [image_token_index] + tokenizer(after, add_special_tokens=False).input_ids
        return torch.tensor(ids)

    def process_images(images, image_processor, config):
        return torch.stack([torch.from_numpy(np.asarray(im.convert("L").resize((24, 5)), dtype=np.float32) / 255)
                            for im in images])

    constants = types.ModuleType("llava.constants")
    constants.IMAGE_TOKEN_INDEX = ORIGINAL_LLAVA_IMAGE_TOKEN
    mm_utils = types.ModuleType("llava.mm_utils")
    mm_utils.tokenizer_image_token, mm_utils.process_images = tokenizer_image_token, process_images
    package = types.ModuleType("llava")
    package.constants, package.mm_utils = constants, mm_utils
    for name, module in (("llava", package), ("llava.constants", constants), ("llava.mm_utils", mm_utils)):
        monkeypatch.setitem(sys.modules, name, module)


def test_eval_backend_for_original_checkpoints_answers_with_method_none(tmp_path, monkeypatch):
    import json

    from transformers import LlamaConfig

    from hallupatch.eval import cli, models
    from hallupatch.testing.tiny import tiny_image, tiny_tokenizer

    _fake_llava_package(monkeypatch)
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, mm_hidden_size=24)
    path = tmp_path / "ckpt"
    saved_and_reloaded(StockLlavaLlamaForCausalLM(config), StockLlavaLlamaForCausalLM, path)
    images = tmp_path / "val2014"
    images.mkdir()
    rows = []
    for i in range(2):
        tiny_image(i).save(images / f"COCO_val2014_{i:012d}.jpg")
        rows.append({"question_id": i + 1, "image": f"COCO_val2014_{i:012d}.jpg", "text": "is there a circle in the image ?",
                     "label": "yes"})
    (tmp_path / "coco_pope_random.json").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def answers(cls, out):
        backend = models.OriginalLlavaBackend(_load(cls, path), tokenizer, None, models.RECIPES["llava"], cls.__name__)
        cli.run(["pope", "--data", str(tmp_path), "--image-folder", str(images), "--output", str(tmp_path / out),
                 "--method", "none", "--max-new-tokens", "3", "--no-progress"], backend=backend)
        return [json.loads(line)["text"] for line in (tmp_path / out / "answers.jsonl").read_text().splitlines()]

    edited = answers(EditedLlavaLlamaForCausalLM, "edited")
    assert answers(StockLlavaLlamaForCausalLM, "stock") == edited and len(edited) == 2
