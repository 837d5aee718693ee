"""The powered lab study (``eval lab --full``): dev choices, sizes, paired counts, Holm, MDE and its table.

Every figure of the table is recomputed here from the stored counts with independent references
(scipy's exact binomial test, statsmodels' Holm), and a small end-to-end run on the shipped checkpoint
checks that the counts are those of the harness's answers.
"""
import argparse
import json
import math

import pytest

from hallupatch.eval import cli, lab_study
from hallupatch.eval.harness import SCREEN_WIDTH
from hallupatch.eval.scoring import parse_pope_answer
from hallupatch.eval.store import read_answers


def _counts(n, b, c, planted_n, base_err, method_err, base_right):
    return {"n": n, "b": b, "c": c, "base_right": base_right, "method_right": base_right - b + c,
            "planted_n": planted_n, "base_planted_errors": base_err, "method_planted_errors": method_err}


def _part(seed, shift):
    methods = list(lab_study.grids())
    results = {}
    for k, qset in enumerate(lab_study.SETS):
        entry = {"questions": 400, "none": {"right": 300, "n": 400, "planted_n": 200, "planted_errors": 40 + k}}
        if qset.compared:
            entry["methods"] = {m: _counts(400, 3 + i + shift, 3 + 2 * i * (k + 1), 200, 40, 30 + i, 300)
                                for i, m in enumerate(methods)}
        results[qset.name] = entry
    dev = {"chosen": {m: dict(g[-1] if seed else g[0]) for m, g in lab_study.grids().items()}}
    sizes = {q.name: {"questions": 400, "capped": q.name == "weak"} for q in lab_study.SETS}
    return {"seed": seed, "split": "test", "dev": dev, "sizes": sizes, "results": results}


def _study(seeds=(0, 1, 2)):
    return {"split": "test", "seeds": list(seeds), "alpha": 0.05, "power": 0.8, "target_effect": 0.02,
            "costly_questions": {"opera": 400}, "parts": {str(s): _part(s, s) for s in seeds}}


def test_comparisons_match_independent_references():
    import scipy.stats as scipy_stats   # test-only dependencies (the test extra)
    import statsmodels.stats.multitest as multitest
    from hallupatch.eval.stats import mcnemar_power

    study = _study()
    table = lab_study.comparisons(study)
    keys = list(table)
    assert len(keys) == len(study["seeds"]) * len(lab_study.COMPARED) * len(lab_study.grids())
    raw = []
    for key in keys:   # one Holm family: every comparison of the table
        seed = key[0]
        counts = study["parts"][str(seed)]["results"][key[1]]["methods"][key[2]]
        b, c, n = counts["b"], counts["c"], counts["n"]
        expected = scipy_stats.binomtest(min(b, c), b + c, 0.5).pvalue if b + c else 1.0
        assert table[key]["p"] == pytest.approx(expected, rel=1e-9, abs=1e-12)
        assert table[key]["change"] == pytest.approx(100 * (c - b) / n)
        assert table[key]["planted_change"] == pytest.approx(
            100 * (counts["method_planted_errors"] - counts["base_planted_errors"]) / counts["planted_n"])
        mde = table[key]["mde"] / 100
        if math.isfinite(mde):   # the MDE is where the exact power reaches 80%
            assert mcnemar_power(n, (b + c) / n, min(mde, (b + c) / n)) >= 0.8 - 1e-6
        raw.append(table[key]["p"])
    holm = multitest.multipletests(raw, method="holm")[1]
    assert [table[k]["holm"] for k in keys] == pytest.approx(list(holm), rel=1e-12)


def test_a_finding_holds_only_with_one_sign_and_a_corrected_p_on_every_seed():
    assert lab_study.holds([{"change": 2.0, "holm": 0.01}, {"change": 1.0, "holm": 0.04}]) == "yes +"
    assert lab_study.holds([{"change": -2.0, "holm": 0.01}, {"change": -1.0, "holm": 0.001}]) == "yes -"
    assert lab_study.holds([{"change": 2.0, "holm": 0.01}, {"change": -1.0, "holm": 0.01}]) == "no"
    assert lab_study.holds([{"change": 2.0, "holm": 0.01}, {"change": 1.0, "holm": 0.06}]) == "no"
    assert lab_study.holds([{"change": 0.0, "holm": 0.01}, {"change": 0.0, "holm": 0.01}]) == "no"


def test_the_table_fits_the_screen_and_names_every_comparison():
    study = _study()
    text = lab_study.render(study)
    assert max(len(line) for line in text.splitlines()) <= SCREEN_WIDTH
    table = lab_study.comparisons(study)
    for qset in lab_study.COMPARED:
        for method in lab_study.grids():
            row = next(line for line in text.splitlines() if line.startswith(f"{method:<7}{qset.name:<12}"))
            assert row.endswith(lab_study.holds([table[(s, qset.name, method)] for s in study["seeds"]]))
            assert f"{table[(0, qset.name, method)]['change']:+.2f}" in row
    assert "weak" in text and "capped" in text


def test_paired_counts_pair_by_question():
    base = {"q1": ("yes", True), "q2": ("no", False), "q3": ("no", True), "q4": ("yes", True)}
    other = {"q1": ("yes", False), "q2": ("no", True), "q3": ("no", True)}   # q4 not answered (a --limit)
    counts = lab_study.paired_counts(base, other, planted="no")
    assert counts == {"n": 3, "b": 1, "c": 1, "base_right": 2, "method_right": 2, "planted_n": 2,
                      "base_planted_errors": 1, "method_planted_errors": 0}


def test_sizes_come_from_the_dev_discordance():
    from hallupatch.eval.stats import mcnemar_sample_size

    dev = {"discordance": {"dola": {"adversarial": 0.10, "weak": 0.01, "random": 0.5},
                           "vcd": {"adversarial": 0.05, "weak": 0.015, "random": 0.04},
                           "opera": {"adversarial": 0.4, "weak": 0.4, "random": 0.4}}}
    sizes = lab_study.set_sizes(dev)
    need = mcnemar_sample_size(0.10, 0.02)
    assert sizes["adversarial"]["needed"] == need and sizes["adversarial"]["sized_on"]["method"] == "dola"
    assert sizes["adversarial"]["questions"] == min(lab_study.MAX_QUESTIONS, need + need % 2)
    assert sizes["weak"]["questions"] == lab_study.MIN_QUESTIONS   # nothing discordant enough to size on
    assert sizes["random"]["capped"] and sizes["random"]["questions"] == lab_study.MAX_QUESTIONS
    assert sizes["prior-control"]["questions"] == sizes["adversarial"]["questions"]
    assert sizes["full-evidence"]["questions"] == sizes["weak"]["questions"]


def test_the_published_setting_comes_first_in_every_grid():
    from hallupatch.eval.embedded import LAB
    from hallupatch.methods import METHODS

    for method, grid in lab_study.grids().items():
        assert len(grid) >= 2 and len({json.dumps(g, sort_keys=True) for g in grid}) == len(grid)
        defaults = METHODS[method].config_cls()
        lab_knobs = LAB.method_knobs.get(method, {})
        for key, value in grid[0].items():   # published, but for the lab's layer window and noise seed
            assert value == lab_knobs.get(key, getattr(defaults, key)) or key == "noise_seed"


@pytest.fixture
def tiny_study(monkeypatch):
    from hallupatch.lab import model

    monkeypatch.setattr(lab_study, "DEV_QUESTIONS", 6)
    monkeypatch.setattr(lab_study, "MIN_QUESTIONS", 6)
    monkeypatch.setattr(lab_study, "MAX_QUESTIONS", 8)
    monkeypatch.setattr(lab_study, "COSTLY_QUESTIONS", {"opera": 2})
    full = lab_study.grids()
    monkeypatch.setattr(lab_study, "grids", lambda: {"dola": full["dola"][:2], "opera": full["opera"][1:]})
    monkeypatch.setattr(model, "SHIPPED_CHECKPOINTS", {0: model.CHECKPOINT_DIR}, raising=False)


def test_the_study_counts_what_the_harness_answered(tmp_path, tiny_study, capsys):
    args = argparse.Namespace(output=str(tmp_path), seeds=None, split="heldout", threads=1, overwrite=False,
                              no_progress=True)
    study = lab_study.run_study(args, cli.run)
    part = study["parts"]["0"]
    assert set(part["dev"]["chosen"]) == {"dola", "opera"}
    root = tmp_path / "seed0"
    for qset in lab_study.COMPARED:
        folder = root / "heldout" / qset.name
        base = {r["question_id"]: parse_pope_answer(r["text"]) == r["answer"]
                for r in read_answers(folder / "none" / "answers.jsonl")}
        assert len(base) == part["sizes"][qset.name]["questions"]
        for method, counts in part["results"][qset.name]["methods"].items():
            rows = read_answers(folder / method / "answers.jsonl")
            assert all(r["image_id"].startswith("lab_heldout_") for r in rows)
            mine = {r["question_id"]: parse_pope_answer(r["text"]) == r["answer"] for r in rows}
            assert counts["n"] == len(mine) == (2 if method == "opera" else len(base))
            assert counts["b"] == sum(base[q] and not mine[q] for q in mine)
            assert counts["c"] == sum(mine[q] and not base[q] for q in mine)
    # the dev choice is the grid setting with the best mean dev accuracy, ties to the earlier one
    grid = part["dev"]["grid"]["dola"]
    best = max(range(len(grid)), key=lambda i: (round(grid[i]["dev_accuracy"], 9), -i))
    assert part["dev"]["chosen"]["dola"] == grid[best]["knobs"]
    assert (tmp_path / "heldout-study.txt").read_text(encoding="utf-8").strip() == lab_study.render(study)
    assert lab_study.render(study) in capsys.readouterr().out
    # a second run reads the saved parts back and prints the same table
    again = lab_study.run_study(args, cli.run)
    assert lab_study.render(again) == lab_study.render(study)


def test_unknown_seeds_are_refused(tmp_path, tiny_study):
    args = argparse.Namespace(output=str(tmp_path), seeds=[7], split="test", threads=1, overwrite=False,
                              no_progress=True)
    with pytest.raises(ValueError, match="no shipped lab checkpoint for seed"):
        lab_study.run_study(args, cli.run)


@pytest.mark.parametrize("split", ["test", "heldout"])
def test_the_readme_shows_the_stored_study_as_todays_code_renders_it(split):
    """The README's tables are generated from a stored run (eval/readme_lab_study.py)."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    stored = json.loads((root / "tests" / "data" / "lab_study" / f"{split}-study.json").read_text(encoding="utf-8"))
    assert stored["split"] == split and len(stored["seeds"]) >= 3   # every finding is reported per seed
    readme = (root / "README.md").read_text(encoding="utf-8")
    begin, end = f"<!-- lab-study-{split}:begin -->", f"<!-- lab-study-{split}:end -->"
    block = readme[readme.index(begin) + len(begin):readme.index(end)].strip()
    assert block == "```\n" + lab_study.render(stored) + "\n```"
