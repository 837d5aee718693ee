"""Layer contrast on the trust_remote_code families (tiny Qwen-VL-Chat and GLM-4V checkpoints loaded with
the drop-in modeling files): the scores inside generate() equal a float64 re-computation of DESIGN §4c
from output_hidden_states, per sample, and a left-padded batch equals its rows alone.

"""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import hallupatch
from hallupatch.methods.dola import tied_embeddings
from hallupatch.spec import resolve

import tiny_remote

NEVER_STOP = dict(do_sample=False, eos_token_id=-1, max_new_tokens=4)


def _left_pad(rows, pad_id):
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _glm_inputs(texts, first_seed=0):
    rows = [tiny_remote.glm_prompt(t) for t in texts]
    ids, mask = _left_pad(rows, tiny_remote.GLM_PAD)
    images = torch.stack([tiny_remote.glm_image_batch(1, seed=first_seed + i)[0] for i in range(len(rows))])
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return dict(input_ids=ids, attention_mask=mask, position_ids=positions, images=images)


def _qwen_inputs(tmp_path, texts, seeds):
    tokenizer = tiny_remote.ByteTokenizer()
    rows = []
    for text, seed in zip(texts, seeds):
        path = tiny_remote.write_tiny_image(tmp_path / f"image_{seed}.png", seed=seed)
        rows.append(tokenizer.encode(f"<img>{path}</img>{text}"))
    ids, mask = _left_pad(rows, tiny_remote.QWEN_EOD)
    return dict(input_ids=ids, attention_mask=mask)


def _load(path):
    from transformers import AutoModelForCausalLM

    tiny_remote.forget_remote_modules()
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()


@pytest.fixture(scope="module", params=["chatglm", "qwen"])
def family_model(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    model = _load(tiny_remote.build_tiny_checkpoint(folder / "ckpt", request.param))
    return request.param, model, folder


def _inputs(family, folder, rows):
    if family == "chatglm":
        return _glm_inputs([[7, 8, 9, 10], [7, 8]][rows], first_seed=rows.start or 0)
    texts, seeds = ["a long question here", "hi"][rows], [1, 2][rows]
    return _qwen_inputs(folder, texts, seeds)


def _generate(model, inputs, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return model.generate(**inputs, **NEVER_STOP, return_dict_in_generate=True, output_scores=True, **kwargs)


@torch.no_grad()
def test_scores_match_recomputation_and_batch_equals_single(family_model):
    family, model, folder = family_model
    parts = resolve(model)
    assert not tied_embeddings(parts)
    n = parts.num_layers
    layers = list(range(n))
    hallupatch.apply(model, method="dola", candidate_layers=layers)
    try:
        inputs = _inputs(family, folder, slice(0, 2))
        out = _generate(model, inputs, output_logits=True, output_hidden_states=True)
        chosen = hallupatch.get_layer_trace(model).layers()
        head = parts.lm_head.weight.double()
        for t, hidden_states in enumerate(out.hidden_states):
            for b in range(2):
                log_f = F.log_softmax(out.logits[t][b].double(), -1)
                divergences, log_gs = [], []
                for k in layers:
                    log_g = F.log_softmax(hidden_states[k][b, -1].double() @ head.T, -1)
                    mix = (log_f.exp() + log_g.exp()) / 2
                    divergences.append(0.5 * float((mix * (mix.log() - log_f)).mean() + (mix * (mix.log() - log_g)).mean()))
                    log_gs.append(log_g)
                best = max(range(n), key=lambda i: divergences[i])
                assert chosen[b][t] == layers[best]
                keep = log_f >= log_f.max() + math.log(0.1)
                expected = torch.where(keep, log_f - log_gs[best], torch.full_like(log_f, -math.inf))
                actual = out.scores[t][b].double()
                assert torch.equal(torch.isinf(actual), torch.isinf(expected))
                torch.testing.assert_close(actual[keep], expected[keep], rtol=1e-4, atol=1e-4)
        for b in range(2):
            alone = _generate(model, _inputs(family, folder, slice(b, b + 1)))
            assert torch.equal(alone.sequences[0, -4:], out.sequences[b, -4:])
            for t in range(4):
                torch.testing.assert_close(alone.scores[t][0], out.scores[t][b], rtol=1e-4, atol=1e-4)
    finally:
        hallupatch.remove(model)
