"""The main job's screen, its threads and the README's copy of it (issue 21, items 16, 17, 18).

``python -m hallupatch.eval lab`` prints one screen: a header, one comparison table per benchmark, p as
``<0.001``, at most 100 columns, details in files; the README's copy is a stored run's output, which
today's code must render exactly.
"""
import re
from pathlib import Path

import pytest
import torch

from hallupatch.eval import cli, harness, lab, models

ROOT = Path(__file__).resolve().parent.parent
STORED = ROOT / "tests" / "data" / "lab_main_job"
P_CELL = re.compile(r"^(<0\.001|[01]\.\d{3}|n/a)$")
MDE_CELL = re.compile(r"^(\d+\.\d|inf)$")


# ------------------------------------------------------------------ item 16: threads
@pytest.fixture()
def restore_threads():
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def test_a_small_model_runs_on_one_thread_unless_the_user_chose(tmp_path, monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    common = ["pope", "--limit", "2", "--no-progress", "--max-new-tokens", "1"]
    torch.set_num_threads(2)
    cli.run([*common, "--output", str(tmp_path / "default")])
    assert torch.get_num_threads() == 1   # the built-in lab model is small

    cli.run([*common, "--output", str(tmp_path / "given"), "--threads", "2"])
    assert torch.get_num_threads() == 2

    monkeypatch.setenv("OMP_NUM_THREADS", "2")   # the user's environment is kept
    cli.run([*common, "--output", str(tmp_path / "env")])
    assert torch.get_num_threads() == 2

    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(models, "SMALL_MODEL_PARAMETERS", 10)   # now the lab model counts as large
    cli.run([*common, "--output", str(tmp_path / "large")])
    assert torch.get_num_threads() == 2   # torch's default is left alone

    with pytest.raises(ValueError, match="--threads must be >= 1"):
        cli.run([*common, "--output", str(tmp_path / "zero"), "--threads", "0"])


# ------------------------------------------------------------------ item 17: one screen
def _comparison(labels, p_values):
    methods = {labels[0]: {"scores": {f"score {k}": 50.0 + k for k in range(8)}}}
    for label, p in zip(labels[1:], p_values):
        methods[label] = {"scores": {f"score {k}": 40.0 + k for k in range(8)},
                          "difference": {f"score {k}": -10.0 for k in range(8)},
                          "test": {f"score {k}": {"p": p, "ci95": [-12.0, -8.0]} for k in range(8)}}
    return {"benchmark": "toy", "baseline": labels[0], "questions": 30, "methods": methods,
            "test": "paired bootstrap, two-sided, 1000 resamples (seed 0)"}


def test_the_comparison_table_fits_100_columns_with_p_values_as_published():
    labels = ["none", "memvr", "a setting with a label far longer than any column could hold", "dola"]
    text = harness.format_comparison(_comparison(labels, [1.0, 0.0000123, 0.04567]))
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= harness.SCREEN_WIDTH
    rows = {line.split()[0]: line for line in lines[3:7]}
    assert rows["memvr"].split()[-1] == "1.000" and "<0.001" in rows["a"] and "0.046" in rows["dola"]
    assert not re.search(r"0\.0000", text)
    assert "not shown: score 3, score 4" in text   # what does not fit is named; comparison.json has it all
    assert rows["none"].split()[1:] == ["50.00", "51.00", "52.00"]   # the baseline has no change or p


def test_a_bootstrap_table_lists_each_methods_minimum_detectable_effects_under_it():
    labels = ["none", "memvr", "a setting with a label far longer than any column could hold", "dola"]
    comparison = _comparison(labels, [1.0, 0.0000123, 0.04567])
    comparison["mde"] = "the smallest change found with 80% power"
    for label, mde in zip(labels[1:], [float("nan"), 2.345, 12.0]):
        for k, test in enumerate(comparison["methods"][label]["test"].values()):
            test["mde"] = mde if k != 1 else float("nan")
    lines = harness.format_comparison(comparison).splitlines()
    assert max(len(line) for line in lines) <= harness.SCREEN_WIDTH
    listed = " ".join(lines[lines.index(next(x for x in lines if x.startswith("mde"))):])
    assert listed == ("mde (score 0/score 1/score 2), change with 80% power: memvr -/-/-; "
                      "a setting with a label far lo... 2.3/-/2.3; dola 12.0/-/12.0")


def test_a_mcnemar_table_shows_the_minimum_detectable_effect_beside_p():
    labels = ["none", "memvr", "a setting with a label far longer than any column could hold", "dola"]
    comparison = _comparison(labels, [0.5, 0.5, 0.5])
    comparison["test"], comparison["mde"] = "exact McNemar", "the smallest accuracy change found with 80% power"
    for label, (p, mde) in zip(labels[1:], [(1.0, float("inf")), (0.0000123, 3.456), (0.04567, 12.0)]):
        comparison["methods"][label]["test"] = {"b": 1, "c": 2, "p": p, "discordance": 0.1, "mde": mde}
    columns = {f"score {k}": f"score {k}" for k in range(4)}
    lines = harness.format_comparison(comparison, columns).splitlines()
    assert max(len(line) for line in lines) <= harness.SCREEN_WIDTH
    assert lines[1].split()[-2:] == ["p", "mde"]
    rows = {line.split()[0]: line.split() for line in lines[3:7]}
    assert rows["memvr"][-2:] == ["1.000", "inf"] and rows["a"][-2:] == ["<0.001", "3.5"]
    assert rows["dola"][-2:] == ["0.046", "12.0"]
    assert lines[-1] == "p: exact McNemar; mde: accuracy change with 80% power; not shown: score 3"
    del comparison["mde"]   # a comparison.json written before there were minimum detectable effects
    lines = harness.format_comparison(comparison, columns).splitlines()
    assert lines[1].split()[-1] == "p" and lines[4].split()[-1] == "1.000" and "mde" not in lines[-1]


def test_the_main_job_prints_one_screen(tmp_path, monkeypatch, capfd, restore_threads):
    monkeypatch.chdir(tmp_path)   # the default relative output folder, as a user runs it
    cli.run(["lab", "--limit", "6", "--threshold", "0.5", "--no-progress", "--output", "hallupatch_output/lab"])
    printed, errors = capfd.readouterr()
    lines = printed.rstrip("\n").splitlines()
    assert max(len(line) for line in lines) <= 100
    assert len(lines) <= 60
    assert lines[0].startswith("hallupatch eval lab:")
    for field in ("model", "threads", "data", "limit", "decoding", "dev", "settings"):
        assert any(line.startswith(f"{field} ") for line in lines[:10]), field
    for label in lab.variants(0.5):   # every setting and its knobs are in the header
        assert any(line.strip().startswith(label) for line in lines[:20])
    # OPERA is for the powered study (eval lab --full) only: a 5-beam search would double the main job
    assert "opera" not in {v.method for v in lab.variants(0.5).values()}
    assert not any(re.match(r"opera(\s{2,}|$)", line.strip()) for line in lines)
    tables = [i for i, line in enumerate(lines) if line.startswith(("pope:", "chair:"))]
    assert len(tables) == 2   # one comparison table per benchmark, no per-setting tables
    for start in tables:
        for row in lines[start + 4:start + 3 + len(lab.variants(0.5))]:   # the rows after the baseline
            cells = row.split()
            p_values = [cells[-2]] if lines[start].startswith("pope") else cells[-7::3]
            assert all(P_CELL.match(p) for p in p_values), row
            if lines[start].startswith("pope"):   # McNemar's minimum detectable effect, in points
                assert MDE_CELL.match(cells[-1]), row
    assert "Special tokens have been added" not in printed + errors
    out = tmp_path / "hallupatch_output" / "lab"
    assert (out / "lab.txt").read_text() == printed
    assert lab.render(out) + "\n" == printed   # the screen is a function of the output folder
    assert "answered" in (out / "pope" / "none" / harness.REPORT_FILE).read_text()   # the details, in files


# ------------------------------------------------------------------ item 18: the README's copy
def _readme_block() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme[readme.index("<!-- lab-output:begin -->"):readme.index("<!-- lab-output:end -->")]
    return block.split("```\n")[1]


def test_the_readme_shows_the_stored_main_job_output():
    assert _readme_block() == (STORED / "lab.txt").read_text(encoding="utf-8")


def test_todays_code_prints_the_stored_run_exactly_so():
    """The stored run's files (eval/readme_lab_output.py copies them) rendered by today's code give the
    stored screen: a change of the output's format without regenerating the README fails here."""
    assert lab.render(STORED) + "\n" == (STORED / "lab.txt").read_text(encoding="utf-8")
