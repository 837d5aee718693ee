"""Smoke tests of the speed scripts in eval/: they run end to end on tiny shapes and print their tables.
(Timings are never asserted: these machines are noisy; the scripts print ratios measured side by side.)"""
import importlib.util
import re
from pathlib import Path

import pytest

EVAL = Path(__file__).resolve().parent.parent / "eval"


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, EVAL / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ratio_rows(text):
    return [line for line in text.splitlines() if re.search(r"\s\d+\.\d{3}\s", line)]


@pytest.mark.parametrize("family, shape", [("llama", "tiny"), ("qwen", "cpu"), ("chatglm", "cpu")])
def test_bench_memvr_prints_four_cases_with_their_triggers(family, shape, capsys):
    load_script("bench_memvr").main(["--family", family, "--shape", shape, "--repeats", "1", "--new-tokens", "2"])
    out = capsys.readouterr().out
    rows = ratio_rows(out)
    assert len(rows) == 4, out
    first_checked = 6 if family == "llama" else 10  # published windows: 5-16 and 9-16, exclusive
    assert rows[0].rstrip().endswith(f"[{first_checked}]") and rows[1].rstrip().endswith(f"[{first_checked}, {first_checked}]")
    assert rows[2].rstrip().endswith("[None]") and rows[3].rstrip().endswith("[None, None]")


def test_bench_dola_prints_high_and_low(capsys):
    load_script("bench_dola").main(["--shape", "tiny", "--repeats", "1", "--new-tokens", "2"])
    rows = ratio_rows(capsys.readouterr().out)
    assert len(rows) == 4 and rows[0].startswith("'high'") and rows[2].startswith("'low'")


def test_bench_eval_throughput_prints_both_models(capsys):
    load_script("bench_eval_throughput").main(["--questions", "4", "--max-new-tokens", "2", "--batch-sizes", "1", "2"])
    out = capsys.readouterr().out
    assert "tiny (embedded default)" in out and "larger random" in out and out.count("x\n") == 2, out
