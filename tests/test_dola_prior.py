"""Ranking, mask IoU and layer-prior estimation (DESIGN §4d): hand-computed examples and error cases."""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import hallupatch
from hallupatch.candidates import Candidate
from hallupatch.methods.dola import DoLaConfig
from hallupatch.prior.cli import main as prior_main

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- mask IoU
def test_mask_iou_values_and_empty_cases():
    a = torch.tensor([[True, True, False], [False, False, False]])
    b = torch.tensor([[True, False, False], [True, False, False]])
    assert hallupatch.mask_iou(a, b) == pytest.approx(1 / 3)
    assert hallupatch.mask_iou(a, a) == 1.0
    empty = torch.zeros(2, 3, dtype=torch.bool)
    assert hallupatch.mask_iou(empty, empty) == 1.0       # both empty: exact agreement
    assert hallupatch.mask_iou(a, empty) == 0.0           # one empty: no overlap
    assert hallupatch.mask_iou(empty, a) == 0.0
    assert hallupatch.mask_iou(np.array(a.numpy()), np.array(b.numpy())) == pytest.approx(1 / 3)


def test_mask_iou_rejects_bad_masks():
    a = torch.ones(2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="same shape"):
        hallupatch.mask_iou(a, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="boolean"):
        hallupatch.mask_iou(a.float(), a)


# ---------------------------------------------------------------- ranking
def _cands(*texts, layers=None):
    layers = layers or list(range(len(texts)))
    return [Candidate(layer=l, tokens=[], text=t) for l, t in zip(layers, texts)]


def test_rank_candidates_best_per_sample_with_all_scores():
    candidates = [_cands("a red car", "a car", "red", layers=[2, 4, 6]), _cands("dog", "a big dog", layers=[2, 4])]
    seen = []

    def scorer(sample, caption):
        seen.append((sample, caption))
        return float(len(caption))

    ranked = hallupatch.rank_candidates(candidates, scorer, samples=["s0", "s1"])
    assert [r.best.text for r in ranked] == ["a red car", "a big dog"]
    assert ranked[0].scores == [9.0, 5.0, 3.0] and ranked[0].best_index == 0
    assert ranked[1].best.layer == 4 and ranked[1].confidences == [None, None]
    assert seen[0] == ("s0", "a red car") and seen[-1] == ("s1", "a big dog")


def test_rank_candidates_keeps_the_largest_score_times_confidence():
    # as the paper ranks a region's captions by IoU x mask score: 0.9 x 0.1 = 0.09 < 0.5 x 0.5 = 0.25
    candidates = [_cands("x", "y", "z", layers=[1, 3, 5])]
    results = {"x": (0.9, 0.1), "y": (0.5, 0.5), "z": (0.3, 0.3)}
    ranked = hallupatch.rank_candidates(candidates, lambda i, c: results[c])
    assert ranked[0].best_index == 1 and ranked[0].best.layer == 3
    assert ranked[0].scores == [0.9, 0.5, 0.3] and ranked[0].confidences == [0.1, 0.5, 0.3]
    scored = ranked[0].to_scored()
    assert scored["candidates"][2] == {"layer": 5, "iou": 0.3, "confidence": 0.3}
    # a bare score counts with confidence 1: 0.6 beats 0.9 x 0.5
    mixed = hallupatch.rank_candidates([_cands("x", "y")], lambda i, c: (0.9, 0.5) if c == "x" else 0.6)
    assert mixed[0].best_index == 1


def test_rank_candidates_ties_and_default_samples():
    candidates = [_cands("x", "y", "z", layers=[1, 3, 5])]
    results = {"x": (0.4, 0.5), "y": (0.5, 0.4), "z": (0.1, 0.9)}   # 0.2, 0.2 (exactly), 0.09
    ranked = hallupatch.rank_candidates(candidates, lambda i, c: results[c])
    assert ranked[0].best_index == 0                       # tie on score x confidence: the first candidate
    got = []
    hallupatch.rank_candidates(candidates, lambda s, c: got.append(s) or 0.0)
    assert got == [0, 0, 0]                                # default sample = its index


def test_rank_candidates_errors():
    with pytest.raises(ValueError, match="no candidates"):
        hallupatch.rank_candidates([[]], lambda s, c: 1.0)
    with pytest.raises(ValueError, match="NaN"):
        hallupatch.rank_candidates([_cands("a")], lambda s, c: float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        hallupatch.rank_candidates([_cands("a")], lambda s, c: (1.0, float("inf")))
    with pytest.raises(ValueError, match="samples has 2"):
        hallupatch.rank_candidates([_cands("a")], lambda s, c: 1.0, samples=[1, 2])
    with pytest.raises(ValueError, match="score or \\(score, confidence\\)"):
        hallupatch.rank_candidates([_cands("a")], lambda s, c: (1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="tokenizer"):
        hallupatch.rank_candidates([[Candidate(layer=0, tokens=[1])]], lambda s, c: 1.0)


# ---------------------------------------------------------------- prior estimation
HAND_EXAMPLE = [
    # IoUs 0.6, 0.2, 0.2 -> normalised 0.6, 0.2, 0.2; confidences 0.5, 1, 1 -> 0.3, 0.2, 0.2: keep layer 2 with 0.3
    {"id": "a", "candidates": [{"layer": 2, "iou": 0.6, "confidence": 0.5}, {"layer": 4, "iou": 0.2},
                               {"layer": 6, "iou": 0.2}]},
    # IoUs 0.1, 0.3 -> 0.25, 0.75; sample confidence 0.8 -> 0.2, 0.6: keep layer 4 with 0.6
    {"id": "b", "confidence": 0.8, "candidates": [{"layer": 2, "iou": 0.1}, {"layer": 4, "iou": 0.3}]},
    # IoUs 0, 0.5 -> 0, 1; confidence 0.9 -> keep layer 4 with 0.9
    {"id": "c", "candidates": [{"layer": 2, "iou": 0.0, "confidence": 0.9}, {"layer": 4, "iou": 0.5, "confidence": 0.9}]},
]
# totals: layer 2: 0.3, layer 4: 0.6 + 0.9 = 1.5, layer 6: 0 -> over 1.8
HAND_PRIOR = {2: 0.3 / 1.8, 4: 1.5 / 1.8, 6: 0.0}


def test_estimate_layer_prior_hand_computed():
    prior = hallupatch.estimate_layer_prior(HAND_EXAMPLE)
    assert list(prior) == [2, 4, 6]
    for layer, weight in HAND_PRIOR.items():
        assert prior[layer] == pytest.approx(weight, abs=1e-12)
    assert hallupatch.estimate_layer_prior({"samples": HAND_EXAMPLE}) == prior


@pytest.mark.parametrize(
    "scored, message",
    [
        ([], "no scored samples"),
        ([{"id": "x", "candidates": []}], "id 'x'.*no candidates"),
        ([{"candidates": [{"layer": 1, "iou": 0.0}, {"layer": 2, "iou": 0.0}]}], "sample 0.*IoU 0.*drop"),
        ([{"candidates": [{"layer": 1, "iou": -0.5}]}], "iou must be >= 0"),
        ([{"candidates": [{"layer": 1, "iou": float("inf")}]}], "iou must be finite"),
        ([{"candidates": [{"layer": 1, "iou": 0.5, "confidence": -1}]}], "confidence must be >= 0"),
        ([{"candidates": [{"layer": 1, "iou": 0.5}, {"layer": 1, "iou": 0.2}]}], "appears twice"),
        ([{"candidates": [{"layer": "one", "iou": 0.5}]}], "integer 'layer'"),
        ([{"candidates": [{"layer": 1, "iou": 0.5, "confidence": 0.0}]}], "every kept score is 0"),
        ("not a list", "must be a list"),
    ],
)
def test_estimate_layer_prior_errors(scored, message):
    with pytest.raises(ValueError, match=message):
        hallupatch.estimate_layer_prior(scored)


def test_prior_cli_writes_loadable_json(tmp_path, capsys):
    scored = tmp_path / "scored.json"
    scored.write_text(json.dumps(HAND_EXAMPLE))
    out = tmp_path / "sub" / "prior.json"
    assert prior_main([str(scored), "-o", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["layers"] == [2, 4, 6] and data["num_samples"] == 3
    assert data["prior"] == pytest.approx([HAND_PRIOR[2], HAND_PRIOR[4], HAND_PRIOR[6]])
    assert "wrote" in capsys.readouterr().out
    config = DoLaConfig(candidate_layers=[4, 6, 2], layer_prior=str(out))
    assert config.prior_for([4, 6, 2]).tolist() == pytest.approx([HAND_PRIOR[4], HAND_PRIOR[6], HAND_PRIOR[2]])
    with pytest.raises(ValueError, match=r"no weight for candidate layer\(s\) \[8\].*set candidate_layers=\[2, 4, 6\]"):
        config.prior_for([4, 8])
    with pytest.raises(ValueError, match=r"weights for layer\(s\) \[6\] that are not candidates"):
        config.prior_for([4, 2])


# ---------------------------------------------------------------- the region-caption paper's files
def _region(image_id, layers, ious, sam_scores):
    """One region's candidates as the paper's sampled_captions.json writes them (extra keys included)."""
    return [{"assert": None, "image_id": image_id, "caption": f"caption of layer {layer}", "layer": layer,
             "sam_score": sam, "iou": iou} for layer, iou, sam in zip(layers, ious, sam_scores)]


PUBLISHED_REGIONS = [
    # ious 300, 100, 100, 500 (sum 1000) -> 0.3, 0.1, 0.1, 0.5; x sam 0.4, 0.5, 0.5, 0.2 -> 0.12, 0.05, 0.05, 0.10
    _region("11", [0, 2, 5, 7], [300.0, 100.0, 100.0, 500.0], [0.4, 0.5, 0.5, 0.2]),        # keep layer 0: 0.12
    # ious 2000, 2000 -> 0.5, 0.5; x sam 0.5, 0.5 -> 0.25, 0.25: an exact tie, the first in file order wins
    _region("12", [3, 1], [2000.0, 2000.0], [0.5, 0.5]),                                   # keep layer 3: 0.25
    # ious 1.5, 4.5 -> 0.25, 0.75; x sam 0.8, 0.2 -> 0.2, 0.15
    _region("13", [1, 3], [1.5, 4.5], [0.8, 0.2]),                                         # keep layer 1: 0.2
    # image 11 again, not next to its first run: a region of its own. 10, 30 -> 0.25, 0.75 (x 1)
    _region("11", [0, 7], [10.0, 30.0], [1.0, 1.0]),                                       # keep layer 7: 0.75
]
# totals 0: 0.12, 1: 0.2, 3: 0.25, 7: 0.75, and 2, 5 never kept; over 1.32
PUBLISHED_PRIOR = {0: 0.12 / 1.32, 1: 0.2 / 1.32, 2: 0.0, 3: 0.25 / 1.32, 5: 0.0, 7: 0.75 / 1.32}


def test_published_sampled_captions_layout_hand_computed_with_ties_and_unbounded_ious():
    flat = [entry for region in PUBLISHED_REGIONS for entry in region]
    prior = hallupatch.estimate_layer_prior(flat)
    assert list(prior) == sorted(PUBLISHED_PRIOR)
    for layer, weight in PUBLISHED_PRIOR.items():
        assert prior[layer] == pytest.approx(weight, abs=1e-12), layer
    # the nested scores_*.json layout (a list of candidate lists) reads the same regions
    assert hallupatch.estimate_layer_prior(PUBLISHED_REGIONS) == prior
    # the tie goes to the first candidate: with the order reversed, layer 1 keeps region 12's 0.25
    swapped = [PUBLISHED_REGIONS[0], list(reversed(PUBLISHED_REGIONS[1])), *PUBLISHED_REGIONS[2:]]
    assert hallupatch.estimate_layer_prior(swapped)[1] == pytest.approx(0.45 / 1.32, abs=1e-12)
    assert hallupatch.estimate_layer_prior(swapped)[3] == 0.0


@pytest.mark.parametrize(
    "scored, message",
    [
        ([{"image_id": "1", "layer": 0, "iou": 3.0}], "no 'sam_score'"),
        ([{"image_id": "1", "layer": 0, "iou": 3.0, "sam_score": 0.4}, {"layer": 1}], "entry 1 has no 'image_id'"),
        (_region("1", [0, 0], [1.0, 2.0], [0.4, 0.4]), "region 0 .*image_id '1'.*a layer appears twice.*group_size"),
        ([_region("1", [0], [1.0], [0.4]), {"image_id": "2"}], "entry 1 is not a list"),
        ([_region("1", [0, 1], [0.0, 0.0], [0.4, 0.4])], "region 0 .*IoU 0"),
    ],
)
def test_published_layout_errors_name_the_region(scored, message):
    with pytest.raises(ValueError, match=message):
        hallupatch.estimate_layer_prior(scored)


def test_group_size_splits_consecutive_regions_of_one_image_as_the_script_does():
    # two regions of image 5 back to back: (layers 0, 1 -> keep 0 with 0.75) and (layers 1, 0 -> keep 0 with 0.5 x 0.5)
    back_to_back = _region("5", [0, 1], [3.0, 1.0], [1.0, 1.0]) + _region("5", [1, 0], [1.0, 1.0], [0.25, 0.5])
    with pytest.raises(ValueError, match="layer appears twice.*give group_size"):
        hallupatch.estimate_layer_prior(back_to_back)
    prior = hallupatch.estimate_layer_prior(back_to_back, group_size=2)
    assert prior == {0: 1.0, 1: 0.0}
    # distinct layers cannot be told apart from one bigger region without it: 4 candidates, one kept
    merged = _region("5", [0, 1], [3.0, 1.0], [1.0, 1.0]) + _region("5", [2, 3], [1.0, 3.0], [1.0, 1.0])
    assert hallupatch.estimate_layer_prior(merged) == {0: 1.0, 1: 0.0, 2: 0.0, 3: 0.0}
    assert hallupatch.estimate_layer_prior(merged, group_size=2) == {0: 0.5, 1: 0.0, 2: 0.0, 3: 0.5}
    with pytest.raises(ValueError, match="do not make whole regions of 3.*drop the last 1"):
        hallupatch.estimate_layer_prior(merged, group_size=3)
    with pytest.raises(ValueError, match="change image_id from '5' to '6'"):
        hallupatch.estimate_layer_prior(back_to_back[:1] + _region("6", [1], [1.0], [1.0]), group_size=2)
    with pytest.raises(ValueError, match="flat sampled_captions.json layout only"):
        hallupatch.estimate_layer_prior(HAND_EXAMPLE, group_size=2)
    with pytest.raises(ValueError, match="integer >= 1"):
        hallupatch.estimate_layer_prior(merged, group_size=0)


def test_prior_cli_reads_the_published_file_and_layer_prob_json_loads(tmp_path, capsys):
    sampled = tmp_path / "sampled_captions.json"
    sampled.write_text(json.dumps([entry for region in PUBLISHED_REGIONS for entry in region]))
    out = tmp_path / "prior.json"
    assert prior_main([str(sampled), "-o", str(out)]) == 0
    assert "0.5682" in capsys.readouterr().out       # layer 7: 0.75 / 1.32
    data = json.loads(out.read_text())
    assert data["layers"] == [0, 1, 2, 3, 5, 7] and data["num_samples"] == 4
    # --group-size: the script's fixed grouping (here 2 regions of 2 candidates of one image)
    paired = tmp_path / "paired.json"
    paired.write_text(json.dumps(_region("5", [0, 1], [3.0, 1.0], [1.0, 1.0]) + _region("5", [2, 3], [1.0, 3.0], [1.0, 1.0])))
    assert prior_main([str(paired), "-o", str(out), "--group-size", "2"]) == 0
    assert json.loads(out.read_text())["prior"] == [0.5, 0.0, 0.0, 0.5]
    capsys.readouterr()
    assert "integer >= 1" in _cli_error([paired, "-o", out, "--group-size", "0"], capsys)
    # the script's layer_prob.json: {"0": p0, ...}, keys as strings, loadable as a prior as it is
    layer_prob = tmp_path / "layer_prob.json"
    layer_prob.write_text(json.dumps({"0": 0.25, "1": 0.125, "2": 0.625}, indent=2))
    config = DoLaConfig(candidate_layers=[2, 0, 1], layer_prior=str(layer_prob))
    assert config.prior_for([2, 0, 1]).tolist() == [0.625, 0.25, 0.125]
    with pytest.raises(ValueError, match="no weight for candidate layer"):
        config.prior_for([0, 1, 3])


@pytest.mark.parametrize("text", ['{"0": NaN, "1": 0.5}', '{"0": Infinity, "1": 0.5}', '{"0": 1e400, "1": 0.5}',
                                  '{"layers": [0, 1], "prior": [0.5, NaN]}', '{"layers": [0, 1], "prior": [-Infinity, 0.1]}'])
def test_non_finite_prior_files_are_refused(tmp_path, text):
    path = tmp_path / "prior.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="must be finite"):
        DoLaConfig(candidate_layers=[0, 1], layer_prior=str(path)).prior_for([0, 1])


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"layers": [0, 1], "prior": [0.5]}', "equal length"),
        ('{"zero": 0.5}', "keys must be layer indices"),
        ('{"0": "half"}', "must be a number"),
        ('{"layers": [0, "0"], "prior": [0.5, 0.5]}', "layer 0 is given twice"),
        ('[0.5, 0.5]', "not a layer prior"),
        ('{}', "not a layer prior"),
    ],
)
def test_malformed_prior_files_are_refused(tmp_path, text, message):
    path = tmp_path / "prior.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        DoLaConfig(candidate_layers=[0, 1], layer_prior=str(path)).prior_for([0, 1])


# ---------------------------------------------------------------- a {layer: weight} mapping as layer_prior
@pytest.mark.parametrize("mapping", [{2: 0.32, 0: 0.68}, {"0": 0.68, "2": 0.32}])
def test_mapping_prior_means_layer_to_weight(mapping):
    config = DoLaConfig(candidate_layers=[0, 2], layer_prior=mapping)
    assert config.prior_for([0, 2]).tolist() == pytest.approx([0.68, 0.32])
    assert config.prior_for([2, 0]).tolist() == pytest.approx([0.32, 0.68])
    again = DoLaConfig.from_dict(json.loads(json.dumps(config.to_dict())))   # run.json round trip
    assert again.prior_for([0, 2]).tolist() == pytest.approx([0.68, 0.32])


def test_estimated_prior_is_usable_as_it_is():
    prior = hallupatch.estimate_layer_prior(HAND_EXAMPLE)          # {2: ..., 4: ..., 6: 0.0}
    config = DoLaConfig(candidate_layers=[2, 4, 6], layer_prior=prior)
    assert config.prior_for([2, 4, 6]).tolist() == pytest.approx([HAND_PRIOR[2], HAND_PRIOR[4], HAND_PRIOR[6]])


@pytest.mark.parametrize(
    "mapping, layers, message",
    [
        ({0: 0.5, 2: 0.5}, [0, 1], r"no weight for candidate layer\(s\) \[1\] and weights for layer\(s\) \[2\]"),
        ({0: 0.5, 1: 0.2, 2: 0.3}, [0, 1], r"weights for layer\(s\) \[2\] that are not candidates"),
        ({0: 0.5}, [0, 1], r"no weight for candidate layer\(s\) \[1\]"),
    ],
)
def test_mapping_prior_must_match_the_candidate_layers(mapping, layers, message):
    with pytest.raises(ValueError, match=message):
        DoLaConfig(candidate_layers=layers, layer_prior=mapping).prior_for(layers)


@pytest.mark.parametrize(
    "mapping, message",
    [
        ({0: float("nan"), 1: 0.5}, "must be finite"),
        ({0: float("inf")}, "must be finite"),
        ({-1: 0.5}, "keys must be layer indices"),
        ({1.5: 0.5}, "keys must be layer indices"),
        ({0: 0.5, "0": 0.5}, "layer 0 is given twice"),
        ({}, "no weights"),
        ({0: None}, "must be a number"),
    ],
)
def test_bad_mapping_priors_are_refused_on_construction(mapping, message):
    with pytest.raises(ValueError, match=message):
        DoLaConfig(candidate_layers=[0, 1], layer_prior=mapping)


# ---------------------------------------------------------------- the command line's errors
def _cli_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        prior_main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_prior_cli_errors_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    good = tmp_path / "scored.json"
    good.write_text(json.dumps(HAND_EXAMPLE))
    assert "not found" in _cli_error([tmp_path / "missing.json", "-o", tmp_path / "p.json"], capsys)
    zero = tmp_path / "zero.json"
    zero.write_text(json.dumps([{"id": 7, "candidates": [{"layer": 1, "iou": 0}]}]))
    line = _cli_error([zero, "-o", tmp_path / "p.json"], capsys)
    assert "id 7" in line and "IoU 0" in line
    assert "is a directory" in _cli_error([good, "-o", tmp_path], capsys)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert "cannot write --output" in _cli_error([good, "-o", a_file / "prior.json"], capsys)
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes('[{"id": "caf\u00e9", "candidates": []}]'.encode("latin-1"))
    assert "not UTF-8" in _cli_error([latin1, "-o", tmp_path / "p.json"], capsys)
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    assert "too deeply" in _cli_error([nested, "-o", tmp_path / "p.json"], capsys)
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    assert "not valid JSON" in _cli_error([broken, "-o", tmp_path / "p.json"], capsys)
    assert not (tmp_path / "p.json").exists()

    def read_only(self, *args, **kwargs):   # the tests run as root, which a chmod'ed folder does not stop
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "write_text", read_only)
    assert "Permission denied" in _cli_error([good, "-o", tmp_path / "ro" / "p.json"], capsys)


def test_python_m_prior_runs_without_runpy_warning(tmp_path):
    scored = tmp_path / "scored.json"
    scored.write_text(json.dumps(HAND_EXAMPLE))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "default"}
    run = subprocess.run([sys.executable, "-m", "hallupatch.prior", str(scored), "-o", str(tmp_path / "p.json")],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "RuntimeWarning" not in run.stderr and run.stderr == "", run.stderr
    assert json.loads((tmp_path / "p.json").read_text())["layers"] == [2, 4, 6]
    bad = subprocess.run([sys.executable, "-m", "hallupatch.prior", str(tmp_path / "nope.json"), "-o", str(tmp_path / "q.json")],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


def test_readme_prior_example_runs(capsys):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("**Layer prior.**", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    assert "layer_prob.json" in code
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.startswith("[[")


def test_eval_cli_reads_the_published_layer_prob_json(tmp_path, monkeypatch):
    from hallupatch.eval import cli

    layer_prob = tmp_path / "layer_prob.json"
    layer_prob.write_text(json.dumps({"0": 0.25, "2": 0.75}, indent=2))
    seen = []
    real_prior_for = DoLaConfig.prior_for

    def spy(self, layers):
        prior = real_prior_for(self, layers)
        seen.append((list(layers), prior.tolist()))
        return prior

    monkeypatch.setattr(DoLaConfig, "prior_for", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # layer contrast's repetition-penalty advice
        cli.run(["mme", "--output", str(tmp_path / "out"), "--method", "dola", "--candidate-layers", "0,2",
                 "--layer-prior", str(layer_prob), "--limit", "2", "--max-new-tokens", "1", "--no-progress"])
    assert seen and all(entry == ([0, 2], [0.25, 0.75]) for entry in seen)
