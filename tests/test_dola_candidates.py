"""generate_candidates on the tiny LLaVA: one candidate per fixed layer, batch == single, patches restored."""
import warnings

import pytest
import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

import hallupatch
from hallupatch.engine import get_patch
from hallupatch.testing.tiny import build_tiny_llava_checkpoint, tiny_image

PROMPTS = [
    "USER: <image>\nwhat is in the picture? ASSISTANT:",
    "USER: <image>\nhow many dogs are there in this image? describe the scene. ASSISTANT:",
]
GEN = dict(max_new_tokens=5, do_sample=False)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    path = build_tiny_llava_checkpoint(tmp_path_factory.mktemp("tiny_llava_cands"), seed=1)
    return LlavaForConditionalGeneration.from_pretrained(path).eval(), LlavaProcessor.from_pretrained(path)


@pytest.fixture(autouse=True)
def _quiet(llava):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield
    hallupatch.remove(llava[0])


def _inputs(processor, prompts, seeds):
    return processor(text=list(prompts), images=[tiny_image(s) for s in seeds], return_tensors="pt", padding=True)


def test_one_candidate_per_layer_equals_fixed_layer_contrast(llava):
    model, processor = llava
    inputs = _inputs(processor, PROMPTS, [0, 1])
    layers = [0, 2, 3]
    cands = hallupatch.generate_candidates(model, inputs, layers=layers, tokenizer=processor.tokenizer, **GEN)
    assert get_patch(model) is None  # an unpatched model stays unpatched
    assert [[c.layer for c in row] for row in cands] == [layers, layers]
    prompt_len = inputs["input_ids"].shape[1]
    for position, layer in enumerate(layers):
        hallupatch.apply(model, method="dola", candidate_layers=[layer])
        expected = model.generate(**inputs, **GEN)[:, prompt_len:]
        hallupatch.remove(model)
        for b in range(2):
            assert cands[b][position].tokens == expected[b].tolist()[: len(cands[b][position].tokens)]
            assert cands[b][position].text == processor.tokenizer.decode(cands[b][position].tokens, skip_special_tokens=True)
    # different layers give different captions on this model (the contrast layer matters)
    assert len({tuple(c.tokens) for c in cands[0]}) > 1


def test_candidates_batch_equals_single(llava):
    model, processor = llava
    batch = _inputs(processor, PROMPTS, [2, 3])
    layers = [1, 3]
    together = hallupatch.generate_candidates(model, batch, layers=layers, **GEN)
    for b in range(2):
        alone = hallupatch.generate_candidates(model, _inputs(processor, PROMPTS[b : b + 1], [2 + b]), layers=layers, **GEN)
        assert [c.tokens for c in alone[0]] == [c.tokens for c in together[b]]
        assert all(c.text is None for c in alone[0])


def test_existing_patch_is_kept_and_restored(llava):
    model, processor = llava
    inputs = _inputs(processor, PROMPTS[:1], [0])
    memvr = dict(starting_layer=0, ending_layer=3, entropy_threshold=0.0)
    hallupatch.apply(model, method="memvr+dola", candidate_layers=[1, 2], layer_prior=[0.3, 0.7], **memvr)
    before = get_patch(model).configs
    cands = hallupatch.generate_candidates(model, inputs, layers=[2], **GEN)
    after = get_patch(model)
    assert list(after.configs) == ["memvr", "dola"] and after.configs["dola"] == before["dola"]
    assert after.methods["dola"].candidates == [1, 2] and after.methods["dola"].forced is None
    # the candidate was decoded with MemVR active: equal to memvr+dola with the fixed layer
    hallupatch.apply(model, method="memvr+dola", candidate_layers=[2], **memvr)
    expected = model.generate(**inputs, **GEN)[0, inputs["input_ids"].shape[1]:].tolist()
    assert cands[0][0].tokens == expected[: len(cands[0][0].tokens)]


def test_ranking_generated_candidates_end_to_end(llava):
    model, processor = llava
    cands = hallupatch.generate_candidates(model, _inputs(processor, PROMPTS, [0, 1]), layers=[0, 3],
                                           tokenizer=processor.tokenizer, **GEN)
    def segment(caption):  # a stand-in referring segmenter: one cell per word
        mask = torch.zeros(12, dtype=torch.bool)
        mask[: len(caption.split())] = True
        return mask

    gt = torch.zeros(12, dtype=torch.bool)
    gt[:3] = True
    ranked = hallupatch.rank_candidates(cands, lambda sample, caption: (hallupatch.mask_iou(segment(caption), gt), 0.5))
    for r, row in zip(ranked, cands):
        assert r.scores == [hallupatch.mask_iou(segment(c.text), gt) for c in row]
        assert r.best.text == row[max(range(len(row)), key=lambda i: (r.scores[i], -i))].text
        assert r.confidences == [0.5] * len(row)
    usable = [r.to_scored() for r in ranked if sum(r.scores) > 0]
    assert usable  # the tiny model's captions are not empty
    prior = hallupatch.estimate_layer_prior(usable)
    assert sum(prior.values()) == pytest.approx(1.0) and set(prior) == {0, 3}


def test_bad_layers_are_rejected(llava):
    model, processor = llava
    inputs = _inputs(processor, PROMPTS[:1], [0])
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        hallupatch.generate_candidates(model, inputs, layers=[4], **GEN)
    with pytest.raises(ValueError, match="at least one"):
        hallupatch.generate_candidates(model, inputs, layers=[], **GEN)
