"""Several methods in one run: one answers folder per method, one comparison table with paired tests."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

sys.path.insert(0, str(Path(__file__).parent))
from caption_data import write_chair_data  # noqa: E402

from hallupatch.eval import cli, harness, stats  # noqa: E402
from hallupatch.eval.scoring import parse_mme_answer  # noqa: E402
from hallupatch.eval.store import read_answers  # noqa: E402


# ------------------------------------------------------------------ the statistics, against direct computations
def test_mcnemar_exact_on_a_hand_made_table():
    # b = 1, c = 5: P(X <= 1) for X ~ Bin(6, 1/2) is (1 + 6) / 64; two-sided doubles it
    assert stats.mcnemar_exact(1, 5) == pytest.approx(2 * 7 / 64)
    assert stats.mcnemar_exact(5, 1) == stats.mcnemar_exact(1, 5)
    assert stats.mcnemar_exact(0, 0) == 1.0 and stats.mcnemar_exact(3, 3) == 1.0
    assert stats.mcnemar_exact(0, 10) == pytest.approx(2 / 1024)
    for b, c in ((2, 9), (7, 4), (0, 3), (12, 30)):
        assert stats.mcnemar_exact(b, c) == pytest.approx(scipy_stats.binomtest(b, b + c, 0.5).pvalue)
    first = [True, True, False, False, True, False]
    second = [True, False, True, True, True, False]
    assert stats.mcnemar_counts(first, second) == {"b": 1, "c": 2}
    with pytest.raises(ValueError, match=">= 0"):
        stats.mcnemar_exact(-1, 2)


def _rates(sums, count):
    return {"share": 100.0 * sums["x"] / count, "ratio": 100.0 * sums["x"] / sums["y"] if sums["y"] else float("nan")}


def test_paired_bootstrap_equals_a_direct_recomputation():
    rng = np.random.default_rng(5)
    n = 40
    first = [{"x": float(rng.integers(0, 2)), "y": float(rng.integers(1, 4))} for _ in range(n)]
    second = [{"x": float(rng.integers(0, 2)), "y": float(rng.integers(1, 4))} for _ in range(n)]
    result = stats.paired_bootstrap(first, second, _rates, resamples=200, seed=3)

    # the same resampling written out by hand: same generator, same draws, plain Python sums
    draws = np.random.default_rng(3)
    diffs = {"share": [], "ratio": []}
    for _ in range(200):
        idx = draws.integers(0, n, size=n)
        a = {k: sum(first[i][k] for i in idx) for k in ("x", "y")}
        b = {k: sum(second[i][k] for i in idx) for k in ("x", "y")}
        for name in diffs:
            diffs[name].append(_rates(b, n)[name] - _rates(a, n)[name])
    full_a = {k: sum(r[k] for r in first) for k in ("x", "y")}
    full_b = {k: sum(r[k] for r in second) for k in ("x", "y")}
    for name, d in diffs.items():
        d = np.array(d)
        assert result[name]["difference"] == pytest.approx(_rates(full_b, n)[name] - _rates(full_a, n)[name])
        assert result[name]["ci95"] == pytest.approx([np.percentile(d, 2.5), np.percentile(d, 97.5)])
        assert result[name]["p"] == pytest.approx(min(1.0, 2 * min(np.mean(d <= 0), np.mean(d >= 0))))
        # (z_0.975 + z_0.8) x the spread of the resampled differences
        z = scipy_stats.norm.ppf(0.975) + scipy_stats.norm.ppf(0.8)
        assert result[name]["mde"] == pytest.approx(z * np.std(d, ddof=1))
    same = stats.paired_bootstrap(first, first, _rates, resamples=50)
    assert all(v["difference"] == 0 and v["p"] == 1.0 and math.isnan(v["mde"]) for v in same.values())


# ------------------------------------------------------------------ end to end
def test_none_and_memvr_on_the_embedded_model_give_one_comparison(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["mme", "--output", str(out), "--limit", "12", "--max-new-tokens", "2", "--no-progress",
            "--method", "none,memvr", "--entropy-threshold", "0", "--retracing-ratio", "1"]
    result = cli.run(args)
    printed = capsys.readouterr().out
    assert "McNemar" in printed and "change" in printed

    # each method answered into its own folder, with its own settings, exactly as a single-method run does
    for method in ("none", "memvr"):
        single = tmp_path / f"single-{method}"
        knobs = ["--entropy-threshold", "0", "--retracing-ratio", "1"] if method == "memvr" else []
        alone = cli.run(["mme", "--output", str(single), "--limit", "12", "--max-new-tokens", "2", "--no-progress",
                         "--method", method, *knobs])
        assert (out / method / "answers.jsonl").read_bytes() == (single / "answers.jsonl").read_bytes()
        assert json.loads((out / method / "run.json").read_text())["method"] == method
        assert result["methods"][method]["perception"] == alone["perception"]

    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison == result["comparison"]
    assert comparison["baseline"] == "none" and list(comparison["methods"]) == ["none", "memvr"]
    # the paired test, recounted from the two answers files
    plain = {r["question_id"]: r for r in read_answers(out / "none" / "answers.jsonl")}
    retraced = {r["question_id"]: r for r in read_answers(out / "memvr" / "answers.jsonl")}
    right = {m: {q: parse_mme_answer(r["text"]) == r["answer"].lower() for q, r in rows.items()}
             for m, rows in (("none", plain), ("memvr", retraced))}
    b = sum(right["none"][q] and not right["memvr"][q] for q in plain)
    c = sum(right["memvr"][q] and not right["none"][q] for q in plain)
    test = comparison["methods"]["memvr"]["test"]
    assert (test["b"], test["c"]) == (b, c) and test["p"] == pytest.approx(stats.mcnemar_exact(b, c))
    # its minimum detectable effect: accuracy points at 80% power, at this pair's share of discordant questions
    assert test["discordance"] == pytest.approx((b + c) / len(plain))
    assert test["mde"] == pytest.approx(100 * stats.mcnemar_mde(len(plain), (b + c) / len(plain), 0.8, 0.05))
    assert "mde" in printed.splitlines()[1].split()
    memvr = comparison["methods"]["memvr"]
    assert memvr["difference"]["perception"] == pytest.approx(
        result["methods"]["memvr"]["perception"] - result["methods"]["none"]["perception"])
    assert memvr["correct"] == sum(right["memvr"].values())

    # rerunning resumes every method: nothing is answered again
    cli.run(args)
    for method in ("none", "memvr"):   # each method's own table and count are in its report.txt
        assert "answered 0 question(s) now" in (out / method / harness.REPORT_FILE).read_text()


def test_caption_comparison_uses_the_paired_bootstrap(tiny_llava_dir, tmp_path):
    coco = write_chair_data(tmp_path / "coco")
    out = tmp_path / "chair"
    result = cli.run(["chair", "--model", str(tiny_llava_dir), "--data", str(coco), "--output", str(out),
                      "--num-images", "4", "--max-new-tokens", "6", "--no-progress",
                      "--method", "none,dola", "--candidate-layers", "0,2"])
    comparison = result["comparison"]
    assert comparison["test"].startswith("paired bootstrap")
    dola = comparison["methods"]["dola"]
    for metric in ("CHAIRs", "CHAIRi"):
        expected = result["methods"]["dola"][metric] * 100 - result["methods"]["none"][metric] * 100 \
            if result["methods"]["dola"][metric] is not None and result["methods"]["none"][metric] is not None \
            else float("nan")
        got = dola["test"][metric]["difference"]
        assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected)
        assert 0.0 <= dola["test"][metric]["p"] <= 1.0 or math.isnan(dola["test"][metric]["p"])
        assert dola["test"][metric]["mde"] > 0 or math.isnan(dola["test"][metric]["mde"])


def test_method_lists_are_checked():
    with pytest.raises(ValueError, match="distinct methods"):
        cli.run(["mme", "--method", "none,none"])
    with pytest.raises(ValueError, match="unknown method"):
        cli.run(["mme", "--method", "none,telepathy"])
