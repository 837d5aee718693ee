"""Ranking, mask IoU and layer-prior estimation (DESIGN §4d): hand-computed examples and error cases."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import hallupatch
from hallupatch.candidates import Candidate
from hallupatch.prior import main as prior_main

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


def test_rank_candidates_confidence_ties_and_default_samples():
    candidates = [_cands("x", "y", "z", layers=[1, 3, 5])]
    ranked = hallupatch.rank_candidates(candidates, lambda i, c: (0.5, {"x": 0.1, "y": 0.2, "z": 0.3}[c]))
    assert ranked[0].best_index == 0                       # tie on score: the first candidate
    assert ranked[0].confidences == [0.1, 0.2, 0.3]
    scored = ranked[0].to_scored()
    assert scored["candidates"][2] == {"layer": 5, "iou": 0.5, "confidence": 0.3}
    got = []
    hallupatch.rank_candidates(candidates, lambda s, c: got.append(s) or 0.0)
    assert got == [0, 0, 0]                                # default sample = its index


def test_rank_candidates_errors():
    with pytest.raises(ValueError, match="no candidates"):
        hallupatch.rank_candidates([[]], lambda s, c: 1.0)
    with pytest.raises(ValueError, match="NaN"):
        hallupatch.rank_candidates([_cands("a")], lambda s, c: float("nan"))
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
        ([{"candidates": [{"layer": 1, "iou": 1.5}]}], "iou must lie in"),
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
    from hallupatch.methods.dola import DoLaConfig

    config = DoLaConfig(candidate_layers=[4, 2], layer_prior=str(out))
    assert config.prior_for([4, 2]).tolist() == pytest.approx([HAND_PRIOR[4], HAND_PRIOR[2]])
    with pytest.raises(ValueError, match="no weight for candidate layer"):
        config.prior_for([4, 8])


def test_prior_cli_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": 7, "candidates": [{"layer": 1, "iou": 0}]}]))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "hallupatch.prior", str(bad), "-o", str(tmp_path / "p.json")],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    assert run.returncode == 1 and "id 7" in run.stderr and "IoU 0" in run.stderr
    assert not (tmp_path / "p.json").exists()
    with pytest.raises(SystemExit) as exit_info:
        prior_main([str(tmp_path / "missing.json"), "-o", str(tmp_path / "p.json")])
    assert exit_info.value.code == 2
