"""MemVR through ``hallupatch.apply`` on Qwen-VL-Chat and GLM-4V models loaded from the drop-in files.

The reference is an independent float64 re-implementation of DESIGN 4b written here with plain loops over
samples, layers and top-10 values; it drives the *unpatched* model through the test's own hooks.
"""
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

import hallupatch
import tiny_remote
from hallupatch.engine import get_patch

from remote_code_fixtures import GREEDY, glm_inputs, left_pad, load, qwen_rows

KNOBS = dict(starting_layer=0, ending_layer=3, retracing_ratio=0.3)   # entropy read after layers 1, 2
PATCHES_PLUS_BOI_EOI = (28 // 7 // 2) ** 2 + 2
# the batch: Qwen rows with an image, another image, no image; GLM-4V rows (one image each) of two lengths
QWEN_TEXTS, QWEN_IMAGES = ["describe the picture in detail", "what", "no image here at all"], [1, 2, None]
GLM_TEXTS = [[7, 8, 9, 10, 11, 12, 13], [14, 15]]


# ---------------------------------------------------------------------------------------------
# per-family access, written from the published architectures (not through hallupatch's specs)
# ---------------------------------------------------------------------------------------------
def parts(model, family):
    if family == "qwen":
        t = model.transformer
        return dict(layers=t.h, norm=t.ln_f, head=model.lm_head, visual=t.visual,
                    w_in=lambda layer: layer.mlp.w1.weight, w_out=lambda layer: layer.mlp.c_proj.weight)
    t = model.transformer
    return dict(layers=t.encoder.layers, norm=t.encoder.final_layernorm, head=t.output_layer, visual=t.vision,
                w_in=lambda layer: layer.mlp.dense_h_to_4h.weight, w_out=lambda layer: layer.mlp.dense_4h_to_h.weight)


def batch_inputs(family, tmp_path):
    """A left-padded batch and, per row, the real-position mask of the sequence the layers see."""
    if family == "qwen":
        rows = qwen_rows(tmp_path, QWEN_TEXTS, QWEN_IMAGES)
        ids, mask = left_pad(rows, tiny_remote.QWEN_EOD)
        return dict(input_ids=ids, attention_mask=mask), mask.bool()
    inputs = glm_inputs(GLM_TEXTS)
    mask = inputs["attention_mask"]
    real = torch.stack([_glm_real(row) for row in mask])
    return inputs, real.bool()


def _glm_real(row_mask):
    """Left padding is kept; the 3 image tokens become boi + patches + eoi rows, all real."""
    pads = int((row_mask == 0).sum())
    length = int(row_mask.sum()) - 3 + PATCHES_PLUS_BOI_EOI
    return torch.tensor([0] * pads + [1] * length)


def single_inputs(family, tmp_path, index):
    """Row ``index`` of :func:`batch_inputs` on its own, unpadded."""
    if family == "qwen":
        return dict(input_ids=torch.tensor(qwen_rows(tmp_path, [QWEN_TEXTS[index]], [QWEN_IMAGES[index]])))
    return glm_inputs([GLM_TEXTS[index]], image_seed=index)


# ---------------------------------------------------------------------------------------------
# the independent reference
# ---------------------------------------------------------------------------------------------
def plain_entropy(logits):
    """Normalised entropy of the softmax over the top-10 logits, with a plain loop."""
    top = sorted(logits.tolist(), reverse=True)[:10]
    peak = top[0]
    weights = [math.exp(v - peak) for v in top]
    total = sum(weights)
    return -sum((w / total) * math.log(w / total) for w in weights) / math.log(10)


def reference_forward(model, family, inputs, real, ratio, threshold, start, end):
    """One forward pass with DESIGN 4b applied by hand; returns (logits, triggers, entropies)."""
    p = parts(model, family)
    memory = []
    batch = real.shape[0]
    triggers, entropies = [None] * batch, [dict() for _ in range(batch)]
    handles = [p["visual"].register_forward_hook(lambda m, a, out: memory.append(out))]

    def images_per_row():
        flat = [image for output in memory for image in output]
        ids = inputs["input_ids"]
        marker = tiny_remote.QWEN_IMG_START if family == "qwen" else tiny_remote.GLM_BOI
        rows, k = [], 0
        for b in range(batch):
            count = int((ids[b] == marker).sum())
            rows.append(torch.cat(flat[k:k + count]) if count else None)
            k += count
        return rows

    def after_layer(index):
        def hook(module, args, output):
            hidden = output[0]
            zs = images_per_row()
            for b in range(batch):
                if triggers[b] is not None or zs[b] is None:
                    continue
                last = max(j for j in range(real.shape[1]) if real[b, j])
                logits = p["head"](p["norm"](hidden[b, last]))
                entropies[b][index] = plain_entropy(logits)
                if entropies[b][index] > threshold:
                    triggers[b] = index
        return hook

    def in_ffn(index):
        def hook(module, args, output):
            x, out, zs = args[0], output.clone(), images_per_row()
            layer = p["layers"][index]
            for b in range(batch):
                if triggers[b] != index - 1:
                    continue
                z = zs[b].double()
                s_k = p["w_in"](layer).abs().mean() / z.abs().mean()
                s_v = p["w_out"](layer).abs().mean() / z.abs().mean()
                adapter = F.silu(x[b] @ (s_k * z).T) @ (s_v * z)
                rows = [j for j in range(real.shape[1]) if real[b, j]]
                scale = output[b, rows].abs().mean() / adapter[rows].abs().mean()
                out[b] = (1 - ratio) * output[b] + ratio * scale * adapter
            return out
        return hook

    for index in range(start + 1, end):
        handles.append(p["layers"][index].register_forward_hook(after_layer(index)))
        handles.append(p["layers"][index + 1].mlp.register_forward_hook(in_ffn(index + 1)))
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, triggers, entropies


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["qwen", "chatglm"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def checkpoint(family, tmp_path_factory):
    return tiny_remote.build_tiny_checkpoint(tmp_path_factory.mktemp(family) / f"tiny_{family}", family, seed=1)


def test_memvr_matches_float64_reference(family, checkpoint, tmp_path):
    model = load(checkpoint).double()
    inputs, real = batch_inputs(family, tmp_path)
    if "images" in inputs:
        inputs["images"] = inputs["images"].double()
    start, end, ratio = KNOBS["starting_layer"], KNOBS["ending_layer"], KNOBS["retracing_ratio"]
    plain, _, entropies = reference_forward(model, family, inputs, real, ratio, float("inf"), start, end)
    values = sorted(v for row in entropies for v in row.values())
    threshold = (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2   # some rows trigger, some not
    expected, triggers, checked = reference_forward(model, family, inputs, real, ratio, threshold, start, end)
    assert any(t is not None for t in triggers)

    hallupatch.apply(model, method="memvr", entropy_threshold=threshold, **KNOBS)
    with torch.no_grad():
        got = model(**inputs).logits
    trace = hallupatch.get_trace(model)
    hallupatch.remove(model)

    assert trace.passes[0].trigger_layer == triggers
    for b in range(real.shape[0]):
        assert trace.passes[0].entropies[b].keys() == checked[b].keys()   # undecided rows only
        for layer, value in checked[b].items():
            assert trace.passes[0].entropies[b][layer] == pytest.approx(value, abs=1e-6)   # float32 entropy (DESIGN 4a)
        # the engine takes the scale means (s_k, s_v, mean|F|/mean|A|) in float32: agreement to ~1e-7
        torch.testing.assert_close(got[b, real[b]], expected[b, real[b]], rtol=1e-5, atol=1e-5)
        if triggers[b] is None:   # untriggered rows (and a row without an image) are untouched
            assert torch.equal(got[b, real[b]], plain[b, real[b]])
        else:
            assert not torch.allclose(got[b, real[b]], plain[b, real[b]])
    with torch.no_grad():   # remove() restores the exact original model
        assert torch.equal(model(**inputs).logits, plain)


def test_batched_generation_equals_single_rows(family, checkpoint, tmp_path):
    model = load(checkpoint)
    inputs, real = batch_inputs(family, tmp_path)
    hallupatch.apply(model, method="memvr", entropy_threshold=float("inf"), **KNOBS)
    with torch.no_grad():
        model(**inputs)
    values = sorted(v for row in hallupatch.get_trace(model).passes[0].entropies for v in row.values())
    threshold = (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2
    hallupatch.apply(model, method="memvr", entropy_threshold=threshold, **KNOBS)
    with torch.no_grad():
        batch = model.generate(**inputs, max_new_tokens=4, **GREEDY)
        batch_triggers = hallupatch.get_trace(model).trigger_layers()
        for b in range(real.shape[0]):
            alone = model.generate(**single_inputs(family, tmp_path, b), max_new_tokens=4, **GREEDY)
            assert torch.equal(batch[b, -4:], alone[0, -4:])
            assert batch_triggers[b] == hallupatch.get_trace(model).trigger_layers()[0]
    assert any(layer is not None for row in batch_triggers for layer in row)


def test_config_block_equals_apply(family, checkpoint, tmp_path):
    knobs = dict(KNOBS, entropy_threshold=0.5)
    configured = tmp_path / "configured"
    shutil.copytree(checkpoint, configured)
    tiny_remote.set_config_block(configured, {"method": "memvr", **knobs})
    inputs, _ = batch_inputs(family, tmp_path)
    runs = []
    for path, apply in ((checkpoint, True), (configured, False)):
        model = load(path)
        if apply:
            assert get_patch(model) is None
            hallupatch.apply(model, method="memvr", **knobs)
        assert get_patch(model).configs["memvr"] == hallupatch.MemVRConfig(**knobs)
        with torch.no_grad():
            runs.append(model.generate(**inputs, max_new_tokens=3, output_scores=True, return_dict_in_generate=True,
                                       **GREEDY))
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    for a, b in zip(runs[0].scores, runs[1].scores):
        assert torch.equal(a, b)


def test_detected_by_structure_and_text_only_prompt_is_untouched(family, checkpoint, tmp_path):
    model = load(checkpoint)
    model.__class__ = type("RenamedUpstreamClass", (type(model),), {})   # any class name: structure decides
    inputs, _ = batch_inputs(family, tmp_path)
    if family == "qwen":
        text = dict(input_ids=torch.tensor(qwen_rows(tmp_path, ["only words here"], [None])))
    else:
        ids = torch.tensor([tiny_remote.glm_prompt([7, 8, 9], with_image=False)])
        text = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        plain = model.generate(**text, max_new_tokens=3, output_scores=True, return_dict_in_generate=True, **GREEDY)
        hallupatch.apply(model, method="memvr", entropy_threshold=0.0, **KNOBS)   # any image row would trigger
        assert get_patch(model).parts.spec.name == family
        model.generate(**inputs, max_new_tokens=2, **GREEDY)
        assert any(layer is not None for row in hallupatch.get_trace(model).trigger_layers() for layer in row)
        after = model.generate(**text, max_new_tokens=3, output_scores=True, return_dict_in_generate=True, **GREEDY)
    assert hallupatch.get_trace(model).trigger_layers() == [[None] * 3]   # no stale image memory
    assert torch.equal(after.sequences, plain.sequences)
    for a, b in zip(after.scores, plain.scores):
        assert torch.equal(a, b)


def test_pass_info_finds_real_positions(family, checkpoint, tmp_path):
    """The family spec reads each pass's real (non-padding) positions from what the decoder stack sees."""
    model = load(checkpoint)
    inputs, real = batch_inputs(family, tmp_path)
    hallupatch.apply(model, method="memvr", **KNOBS)
    state = get_patch(model).state
    with torch.no_grad():
        model(**inputs)
        assert state.info.is_prefill and state.info.batch_size == real.shape[0]
        assert torch.equal(state.info.real_positions, real)
        model.generate(**inputs, max_new_tokens=2, **GREEDY)   # the last pass is a decoding step
    assert not state.info.is_prefill
    if state.info.real_positions is not None:
        assert state.info.real_positions.shape == (real.shape[0], 1) and bool(state.info.real_positions.all())


def test_benchmark_builders(family, tmp_path):
    """The in-memory builders the MemVR benchmark uses: same seed, same model; inputs fit the model."""
    model = tiny_remote.build_remote_model(family, "tiny", seed=3)
    again = tiny_remote.build_remote_model(family, "tiny", seed=3)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    inputs = tiny_remote.benchmark_inputs(family, batch_size=2, prompt_tokens=8, workdir=tmp_path)
    hallupatch.apply(model, method="memvr", entropy_threshold=0.0, **KNOBS)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, **GREEDY)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 2)
    assert hallupatch.get_trace(model).trigger_layers() == [[1, 1], [1, 1]]   # threshold 0: first checked layer
