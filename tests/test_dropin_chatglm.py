"""The drop-in modeling_chatglm.py on a tiny GLM-4V checkpoint loaded with trust_remote_code."""
import pytest
import torch
from safetensors import safe_open

import tiny_remote
from hallupatch.engine import get_patch

from remote_code_fixtures import GREEDY, NUM_LAYERS, glm_inputs, load

HIDDEN, HEADS, KV_CHANNELS, GROUPS, FFN, VOCAB = 32, 4, 8, 2, 64, tiny_remote.GLM_VOCAB
PATCHES = (28 // 7 // 2) ** 2          # image_size // patch_size // 2, squared


def published_glm_keys(num_layers: int) -> dict:
    """GLM-4V-9b's language-model state dict (names and shapes), written from the published architecture."""
    qkv = HEADS * KV_CHANNELS + 2 * GROUPS * KV_CHANNELS          # multi-query attention
    keys = {
        "transformer.embedding.word_embeddings.weight": (VOCAB, HIDDEN),
        "transformer.rotary_pos_emb.inv_freq": (KV_CHANNELS // 4,),
        "transformer.encoder.final_layernorm.weight": (HIDDEN,),
        "transformer.output_layer.weight": (VOCAB, HIDDEN),
    }
    for i in range(num_layers):
        p = f"transformer.encoder.layers.{i}."
        keys.update({
            p + "input_layernorm.weight": (HIDDEN,),
            p + "self_attention.query_key_value.weight": (qkv, HIDDEN),
            p + "self_attention.query_key_value.bias": (qkv,),
            p + "self_attention.dense.weight": (HIDDEN, HEADS * KV_CHANNELS),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "mlp.dense_h_to_4h.weight": (2 * FFN, HIDDEN),
            p + "mlp.dense_4h_to_h.weight": (HIDDEN, FFN),
        })
    return keys


# the vision tower's key names in GLM-4V's visual.py (a stand-in with those names is used here)
PUBLISHED_VISION_KEYS = {
    "patch_embedding.proj.weight", "patch_embedding.proj.bias", "patch_embedding.cls_embedding",
    "patch_embedding.position_embedding.weight", "linear_proj.linear_proj.weight", "linear_proj.norm1.weight",
    "linear_proj.norm1.bias", "linear_proj.dense_h_to_4h.weight", "linear_proj.gate_proj.weight",
    "linear_proj.dense_4h_to_h.weight", "conv.weight", "conv.bias", "boi", "eoi",
} | {
    f"transformer.layers.0.{name}" for name in (
        "input_layernorm.weight", "input_layernorm.bias", "attention.query_key_value.weight",
        "attention.query_key_value.bias", "attention.dense.weight", "attention.dense.bias", "mlp.fc1.weight",
        "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "post_attention_layernorm.weight",
        "post_attention_layernorm.bias")
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_remote.build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "glm_4v_9b", "chatglm")


@pytest.fixture(scope="module")
def model(checkpoint):
    return load(checkpoint)


def test_state_dict_matches_published_architecture(checkpoint, model):
    expected = published_glm_keys(NUM_LAYERS)
    expected_all = set(expected) | {f"transformer.vision.{k}" for k in PUBLISHED_VISION_KEYS}
    state = model.state_dict()
    assert set(state) == expected_all
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == expected_all
    _, info = load(checkpoint, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []


def test_images_replace_boi_placeholder_eoi(model):
    inputs = glm_inputs([[7, 8, 9]])
    ids = inputs["input_ids"]
    boi = ids[0].tolist().index(tiny_remote.GLM_BOI)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        vision = model.transformer.vision(inputs["images"])
    assert vision.shape == (1, PATCHES + 2, HIDDEN)                       # boi row, patches, eoi row
    merged = ids.shape[1] - 3 + PATCHES + 2
    assert out.logits.shape == (1, merged, VOCAB)
    assert len(out.hidden_states) == NUM_LAYERS + 1
    torch.testing.assert_close(out.hidden_states[0][0, boi:boi + PATCHES + 2], vision[0])


def test_generate_with_cache_matches_full_forward(model):
    inputs = glm_inputs([[7, 8, 9, 10]])
    length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=5, **GREEDY)
        positions = torch.arange(generated.shape[1]).unsqueeze(0)
        full = model(input_ids=generated, images=inputs["images"], position_ids=positions).logits
    assert generated.shape == (1, length + 5)
    predicted = full[0, -6:-1].argmax(-1)          # logits of the merged sequence's last positions
    assert torch.equal(predicted, generated[0, length:])


def test_left_padded_batch_equals_single_rows(model):
    texts = [[7, 8, 9, 10, 11, 12], [13, 14]]
    batch = glm_inputs(texts)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=4, **GREEDY)
        for b, text in enumerate(texts):
            single = glm_inputs([text], image_seed=b)
            alone = model.generate(**single, max_new_tokens=4, **GREEDY)
            assert torch.equal(out[b, -4:], alone[0, -4:])


def test_text_only_generation(model):
    ids = torch.tensor([tiny_remote.glm_prompt([7, 8, 9], with_image=False)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, **GREEDY)
        logits = model(input_ids=out).logits
    assert torch.equal(logits[0, ids.shape[1] - 1:-1].argmax(-1), out[0, ids.shape[1]:])


def test_config_block_enables_memvr(tmp_path):
    block = {"method": "memvr", "retracing_ratio": 0.4, "starting_layer": 0, "ending_layer": 3}
    path = tiny_remote.build_tiny_checkpoint(tmp_path / "glm_memvr", "chatglm", hallupatch=block)
    patch = get_patch(load(path))
    assert patch is not None and patch.parts.spec.name == "chatglm"
    config = patch.configs["memvr"]
    # knobs not in the block take the family's published defaults
    assert (config.retracing_ratio, config.entropy_threshold, config.starting_layer, config.ending_layer) == (0.4, 0.75, 0, 3)
    assert load(tiny_remote.build_tiny_checkpoint(tmp_path / "glm_off", "chatglm", hallupatch={"method": "none"})) \
        is not None
