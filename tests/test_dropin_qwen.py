"""The drop-in modeling_qwen.py on a tiny Qwen-VL-Chat checkpoint loaded with trust_remote_code."""
import pytest
import torch
from safetensors import safe_open

import hallupatch
import tiny_remote
from hallupatch.engine import get_patch

from remote_code_fixtures import GREEDY, NUM_LAYERS, left_pad, load, qwen_rows

HIDDEN, HEADS, KV_CHANNELS, INTERMEDIATE, VOCAB = 32, 2, 16, 128, tiny_remote.QWEN_VOCAB


def published_qwen_keys(num_layers: int) -> dict:
    """Qwen-VL-Chat's language-model state dict (names and shapes), written from the published architecture."""
    projection = HEADS * KV_CHANNELS
    keys = {"transformer.wte.weight": (VOCAB, HIDDEN), "transformer.ln_f.weight": (HIDDEN,),
            "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(num_layers):
        p = f"transformer.h.{i}."
        keys.update({
            p + "ln_1.weight": (HIDDEN,),
            p + "attn.c_attn.weight": (3 * projection, HIDDEN),
            p + "attn.c_attn.bias": (3 * projection,),
            p + "attn.c_proj.weight": (projection, HIDDEN),
            p + "ln_2.weight": (HIDDEN,),
            p + "mlp.w1.weight": (INTERMEDIATE // 2, HIDDEN),
            p + "mlp.w2.weight": (INTERMEDIATE // 2, HIDDEN),
            p + "mlp.c_proj.weight": (HIDDEN, INTERMEDIATE // 2),
        })
    return keys


# the visual tower's key names in Qwen-VL's visual.py (a stand-in with those names is used here)
PUBLISHED_VISUAL_KEYS = {
    "conv1.weight", "positional_embedding", "ln_pre.weight", "ln_pre.bias", "ln_post.weight", "ln_post.bias", "proj",
    "attn_pool.query", "attn_pool.pos_embed", "attn_pool.kv_proj.weight", "attn_pool.attn.in_proj_weight",
    "attn_pool.attn.in_proj_bias", "attn_pool.attn.out_proj.weight", "attn_pool.attn.out_proj.bias",
    "attn_pool.ln_q.weight", "attn_pool.ln_q.bias", "attn_pool.ln_kv.weight", "attn_pool.ln_kv.bias",
} | {
    f"transformer.resblocks.0.{name}" for name in (
        "ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.in_proj.weight", "attn.in_proj.bias",
        "attn.out_proj.weight", "attn.out_proj.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
        "mlp.c_proj.bias")
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_remote.build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "qwen_vl_chat", "qwen")


@pytest.fixture(scope="module")
def model(checkpoint):
    return load(checkpoint)


def test_state_dict_matches_published_architecture(checkpoint, model):
    expected = published_qwen_keys(NUM_LAYERS)
    expected_all = set(expected) | {f"transformer.visual.{k}" for k in PUBLISHED_VISUAL_KEYS}
    state = model.state_dict()
    assert set(state) == expected_all
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:   # what from_pretrained reads
        assert set(f.keys()) == expected_all
    _, info = load(checkpoint, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []


def test_images_enter_between_img_tags(tmp_path, model):
    rows = qwen_rows(tmp_path, ["what is it"], [3])
    ids = torch.tensor(rows)
    start = rows[0].index(tiny_remote.QWEN_IMG_START)
    path = str(tmp_path / "image_3.png")
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        visual = model.transformer.visual.encode([path])
    assert visual.shape == (1, 256, HIDDEN)
    assert len(out.hidden_states) == NUM_LAYERS + 1
    torch.testing.assert_close(out.hidden_states[0][0, start + 1:start + 257], visual[0])   # 256 visual tokens
    assert out.logits.shape == (1, ids.shape[1], VOCAB)
    other = torch.tensor(qwen_rows(tmp_path, ["what is it"], [4]))
    with torch.no_grad():
        assert not torch.allclose(model(other).logits[0, -1], out.logits[0, -1])   # the image matters


def test_generate_with_cache_matches_full_forward(tmp_path, model):
    ids = torch.tensor(qwen_rows(tmp_path, ["describe"], [5]))
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=5, **GREEDY)
        logits = model(generated).logits
    assert generated.shape == (1, ids.shape[1] + 5)
    predicted = logits[0, ids.shape[1] - 1:-1].argmax(-1)
    assert torch.equal(predicted, generated[0, ids.shape[1]:])


def test_left_padded_batch_equals_single_rows(tmp_path, model):
    rows = qwen_rows(tmp_path, ["a long question here", "hi"], [1, None])
    ids, mask = left_pad(rows, tiny_remote.QWEN_EOD)
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=4, **GREEDY)
        for b, row in enumerate(rows):
            single = model.generate(torch.tensor([row]), max_new_tokens=4, **GREEDY)
            assert torch.equal(batch[b, -4:], single[0, -4:])


def test_chat_and_chat_stream(tmp_path, model):
    tokenizer = tiny_remote.ByteTokenizer()
    image = tiny_remote.write_tiny_image(tmp_path / "chat.png", seed=7)
    query = f"<img>{image}</img>What is in the picture?"
    response, history = model.chat(tokenizer, query, history=None, max_new_tokens=6)
    assert isinstance(response, str) and history == [(query, response)]
    streamed = list(model.chat_stream(tokenizer, query, history=None, max_new_tokens=6))
    # the same greedy tokens, as growing text (decoded with errors="ignore" where chat uses "replace")
    assert len(streamed) >= 1 and streamed[-1].strip() == response.replace("\ufffd", "")
    assert all(streamed[i + 1].startswith(streamed[i]) for i in range(len(streamed) - 1))
    with pytest.raises(ValueError, match="chat_stream"):
        model.chat(tokenizer, query, history=None, stream=True)


def test_config_block_enables_memvr(tmp_path):
    block = {"method": "memvr", "retracing_ratio": 0.5, "entropy_threshold": 0.3, "starting_layer": 0, "ending_layer": 3}
    path = tiny_remote.build_tiny_checkpoint(tmp_path / "qwen_memvr", "qwen", hallupatch=block)
    patched = load(path)
    patch = get_patch(patched)
    assert patch is not None and patch.parts.spec.name == "qwen"
    config = patch.configs["memvr"]
    assert (config.retracing_ratio, config.entropy_threshold, config.starting_layer, config.ending_layer) == (0.5, 0.3, 0, 3)
    assert config.adapter_activation is None and patch.parts.spec.adapter_activation == "silu"
    hallupatch.remove(patched)
    assert get_patch(patched) is None
