"""The Qwen2-VL / Qwen2.5-VL drop-in files under transformers 4.40 against what transformers 4.51.3 computes on
the same tiny hub checkpoints (recorded by tests/published/record_qwen2_vl.py), and their installer."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoProcessor, PreTrainedTokenizerBase

import tiny_qwen2_vl as tiny
from hallupatch import modeling
from hallupatch.engine import get_patch
from qwen2_vl_fixtures import case_inputs, installed_checkpoint, load_model, load_processor, recording

REPO = Path(__file__).resolve().parent.parent
CLOSE = dict(rtol=1e-5, atol=1e-5)   # measured: every recorded value is reproduced exactly (difference 0.0)


@pytest.fixture(scope="module", params=tiny.FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def checkpoint(family, tmp_path_factory):
    return installed_checkpoint(tmp_path_factory.mktemp(family) / family, family)


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint)


@pytest.fixture(scope="module")
def recorded(family):
    return recording(family)


def decode_positions(model, inputs):
    """Greedy generate as recorded, plus the M-RoPE position ids the decoder saw at each decoding step."""
    seen = []
    handle = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["position_ids"].clone()), with_kwargs=True)
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=tiny.NEW_TOKENS, min_new_tokens=tiny.NEW_TOKENS,
                                 do_sample=False, output_scores=True, return_dict_in_generate=True)
    finally:
        handle.remove()
    return out, torch.stack([p[..., -1] for p in seen[1:]], dim=-1)


@pytest.mark.parametrize("case", list(tiny.CASES))
def test_matches_transformers_4_51_3(checkpoint, model, recorded, case):
    expected = recorded["cases"][f"{case}/untied"]
    processor = load_processor(checkpoint, **tiny.CASES[case].get("processor_kwargs", {}))
    texts, inputs = case_inputs(processor, case)
    # the processor: chat template, placeholder expansion, tokens, smart_resize + normalisation + patch order
    assert texts == expected["texts"]
    for key in ("input_ids", "attention_mask", "image_grid_thw", "video_grid_thw"):
        if key in expected:
            assert torch.equal(inputs[key], expected[key]), key
    assert inputs.get("second_per_grid_ts") == expected.get("second_per_grid_ts")   # Qwen2.5-VL videos: a list
    if "video_row_sums" in expected:
        frames = inputs["pixel_values_videos"].double()
        torch.testing.assert_close(frames.sum(dim=1), expected["video_row_sums"], rtol=0, atol=1e-9)
        torch.testing.assert_close(frames.pow(2).sum(dim=1), expected["video_row_square_sums"], rtol=0, atol=1e-9)
    if "pixel_row_sums" in expected:
        pixels = inputs["pixel_values"]
        assert pixels.dtype == torch.float32
        torch.testing.assert_close(pixels.double().sum(dim=1), expected["pixel_row_sums"], rtol=0, atol=1e-9)
        torch.testing.assert_close(pixels.double().pow(2).sum(dim=1), expected["pixel_row_square_sums"], rtol=0,
                                   atol=1e-9)
        torch.testing.assert_close(pixels[:4], expected["pixel_values_head"], rtol=0, atol=0)
    with torch.no_grad():
        # M-RoPE: 3-axis positions (images below/above the pixel limits, two images, padding, text only)
        positions, deltas = model.get_rope_index(inputs["input_ids"], inputs.get("image_grid_thw"),
                                                 inputs.get("video_grid_thw"), attention_mask=inputs["attention_mask"],
                                                 second_per_grid_ts=inputs.get("second_per_grid_ts"))
        assert torch.equal(positions, expected["position_ids"]) and torch.equal(deltas, expected["rope_deltas"])
        if "image_embeds" in expected:
            merged = model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
            torch.testing.assert_close(merged, expected["image_embeds"], **CLOSE)
        if "video_embeds" in expected:
            merged = model.visual(inputs["pixel_values_videos"], grid_thw=inputs["video_grid_thw"])
            torch.testing.assert_close(merged, expected["video_embeds"], **CLOSE)
        logits = model(**inputs).logits[:, -tiny.RECORDED_POSITIONS:]
        torch.testing.assert_close(logits, expected["logits"], **CLOSE)
    generated, steps = decode_positions(model, inputs)
    assert torch.equal(generated.sequences, expected["sequences"])
    torch.testing.assert_close(torch.stack(generated.scores, dim=1), expected["scores"], **CLOSE)
    assert torch.equal(steps, expected["decode_position_ids"])   # rope deltas kept from prefill to decoding
    if "beam_sequences" in expected:   # beams repeat each sample's patches and grids
        beams = tiny.CASES[case]["beams"]
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, num_beams=beams,
                                 num_return_sequences=beams, output_scores=True, return_dict_in_generate=True)
        assert torch.equal(out.sequences, expected["beam_sequences"])
        torch.testing.assert_close(out.sequences_scores, expected["beam_scores"], **CLOSE)


def test_eager_attention_gives_the_same_logits(checkpoint, recorded):
    eager = load_model(checkpoint, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    processor = load_processor(checkpoint)
    for case in ("two_images", "padded_batch"):
        _, inputs = case_inputs(processor, case)
        with torch.no_grad():
            logits = eager(**inputs).logits[:, -tiny.RECORDED_POSITIONS:]
        torch.testing.assert_close(logits, recorded["cases"][f"{case}/untied"]["logits"], **CLOSE)


def test_the_tiny_weights_are_the_recorded_ones(family, recorded):
    for tied in (False, True):
        key = "tied" if tied else "untied"
        assert tiny.weights_digest(tiny.weights(family, tied)) == recorded[f"weights_digest_{key}"]
    assert recorded["transformers"] == "4.51.3" and recorded["attn_implementation"] == "sdpa"


@pytest.mark.parametrize("tied", [False, True])
def test_every_weight_loads_through_both_auto_classes(family, recorded, tmp_path, tied):
    path = installed_checkpoint(tmp_path / family, family, tied=tied)
    key = "tied" if tied else "untied"
    for auto in (AutoModelForCausalLM, None):
        loaded, info = load_model(path, output_loading_info=True, **({"auto": auto} if auto else {}))
        assert info["missing_keys"] == [] and info["unexpected_keys"] == []
        assert sorted(loaded.state_dict()) == recorded[f"state_dict_keys_{key}"]   # transformers 4.51.3's names
        shares = loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
        assert shares == tied
    if tied:
        processor = load_processor(path)
        _, inputs = case_inputs(processor, "two_images")
        with torch.no_grad():
            logits = loaded(**inputs).logits[:, -tiny.RECORDED_POSITIONS:]
        torch.testing.assert_close(logits, recorded["cases"]["two_images/tied"]["logits"], **CLOSE)


def test_config_resaved_by_newer_transformers_loads(checkpoint, model, tmp_path):
    """transformers >= 4.45 re-saves rope_scaling as {"type": "default", "rope_type": "default", ...}."""
    config = json.loads((checkpoint / "config.json").read_text())
    config["rope_scaling"] = {"type": "default", "rope_type": "default",
                              "mrope_section": config["rope_scaling"]["mrope_section"]}
    config["vision_config"]["in_channels"] = config["vision_config"].pop("in_chans")
    resaved = tmp_path / "resaved"
    resaved.mkdir()
    for item in checkpoint.iterdir():
        if not item.name.endswith(".orig"):
            (resaved / item.name).write_bytes(item.read_bytes())
    (resaved / "config.json").write_text(json.dumps(config))
    again = load_model(resaved)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    config["rope_scaling"]["rope_type"] = config["rope_scaling"]["type"] = "yarn"
    (resaved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rope_scaling type 'yarn' is not supported"):
        load_model(resaved)


def test_save_pretrained_round_trip(checkpoint, tmp_path):
    model = load_model(checkpoint)   # freshly imported (save_pretrained copies the remote module's files)
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["vision_config"]["depth"] == model.config.vision_config.depth
    again = load_model(tmp_path / "saved")
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_processor_needs_the_auto_processor_entry(checkpoint, family, tmp_path):
    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
    assert type(processor).__name__ == ("Qwen2VLProcessor" if family == "qwen2_vl" else "Qwen2_5_VLProcessor")
    assert type(AutoImageProcessor.from_pretrained(checkpoint, trust_remote_code=True)).__name__ == "Qwen2VLImageProcessor"
    # transformers 4.40 silently falls back to the tokenizer without the installer's AutoProcessor entry
    bare = tmp_path / "bare"
    bare.mkdir()
    for item in checkpoint.iterdir():
        (bare / item.name).write_bytes(item.read_bytes())
    preprocessor = json.loads((bare / "preprocessor_config.json").read_text())
    del preprocessor["auto_map"]["AutoProcessor"]
    (bare / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    assert isinstance(AutoProcessor.from_pretrained(bare, trust_remote_code=True), PreTrainedTokenizerBase)


def test_text_prompt_given_as_embeddings(checkpoint, model):
    processor = load_processor(checkpoint)
    _, inputs = case_inputs(processor, "padded_batch")
    text_row = {key: inputs[key][1:] for key in ("input_ids", "attention_mask")}
    with torch.no_grad():
        expected = model(**text_row).logits
        embeds = model.get_input_embeddings()(text_row["input_ids"])
        got = model(inputs_embeds=embeds, attention_mask=text_row["attention_mask"]).logits
    assert torch.equal(got, expected)


def test_image_tokens_that_do_not_match_the_images_are_refused(checkpoint, model):
    processor = load_processor(checkpoint)
    _, inputs = case_inputs(processor, "small_image")
    first_pad = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    inputs["input_ids"][0, first_pad] = 65   # one image token fewer than the image has
    with pytest.raises(ValueError, match="image features and image tokens do not match"):
        with torch.no_grad():
            model(**inputs)


# ---------------------------------------------------------------------------------------------
# the installer
# ---------------------------------------------------------------------------------------------
def folder_digest(path: Path) -> dict:
    return {item.name: hashlib.sha256(item.read_bytes()).hexdigest() for item in sorted(path.iterdir())}


def test_install_and_restore_byte_for_byte(family, tmp_path):
    path = tiny.build_checkpoint(tmp_path / family, family)
    before = folder_digest(path)
    weights = {name: digest for name, digest in before.items() if name.endswith(".safetensors")}
    assert modeling.main(["install", str(path), "--memvr-ratio", "0.2", "--memvr-start", "0", "--memvr-end", "3"]) == 0
    after = folder_digest(path)
    assert {name: after[name] for name in weights} == weights      # no weight file touched
    expected_files = modeling.HUB_NATIVE[family]["files"]
    for name in expected_files:
        assert (path / name).read_bytes() == modeling.dropin_source(name).read_bytes()
    config = json.loads((path / "config.json").read_text())
    assert config["hallupatch"] == {"method": "memvr", "retracing_ratio": 0.2, "starting_layer": 0, "ending_layer": 3}
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForVision2Seq", "AutoModelForCausalLM"}
    preprocessor = json.loads((path / "preprocessor_config.json").read_text())
    assert set(preprocessor["auto_map"]) == {"AutoImageProcessor", "AutoProcessor"}
    loaded = load_model(path)
    patch = get_patch(loaded)
    assert patch is not None and patch.parts.spec.name == "qwen2_vl" and patch.configs["memvr"].retracing_ratio == 0.2

    modeling.install(path, {"method": "none"})           # a reinstall keeps the first originals
    assert modeling.main(["restore", str(path)]) == 0
    assert folder_digest(path) == before                   # byte for byte, added files gone
    assert get_patch(load_model(installed_checkpoint(tmp_path / "again", family))) is None   # {"method": "none"}


def test_install_keeps_a_file_the_folder_already_had(tmp_path):
    path = tiny.build_checkpoint(tmp_path / "own", "qwen2_vl")
    (path / "modeling_qwen2_vl.py").write_text("# the user's own file\n")
    before = folder_digest(path)
    modeling.install(path)
    assert (path / "modeling_qwen2_vl.py.orig").read_text() == "# the user's own file\n"
    modeling.restore(path)
    assert folder_digest(path) == before


def test_installer_refusals(tmp_path, capsys):
    path = tiny.build_checkpoint(tmp_path / "q", "qwen2_vl")
    assert modeling.main(["install", str(path), "--memvr-ratio", "1.5"]) == 2
    assert "[0, 1]" in capsys.readouterr().err
    assert modeling.main(["restore", str(path)]) == 2
    assert "no .orig backups" in capsys.readouterr().err
    (path / "preprocessor_config.json").unlink()
    assert modeling.main(["install", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "preprocessor_config.json does not exist" in err
    assert not (path / "modeling_qwen2_vl.py").exists()


def test_module_entry_point(tmp_path):
    path = tiny.build_checkpoint(tmp_path / "cli", "qwen2_5_vl")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-m", "hallupatch.modeling", "install", str(path)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "installed hallupatch's modeling_qwen2_5_vl.py" in run.stdout
    assert json.loads((path / "config.json").read_text())["hallupatch"] == {"method": "memvr"}
