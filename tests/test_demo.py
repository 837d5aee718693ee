"""``python -m hallupatch``: the embedded MemVR demo prints tokens and where retracing fired."""
import re

from hallupatch.__main__ import main


def test_demo_prints_one_row_per_generated_token_with_its_trigger_layer(capsys):
    main(["--max-new-tokens", "4", "--entropy-threshold", "0.0"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if re.match(r"^\s+\d+\s", line)]
    assert len(rows) == 4
    # threshold 0 fires after the first checked layer (starting_layer 0 -> layer 1) at every step
    assert all(line.split()[2] == "1" for line in rows), out
    assert out.splitlines()[-1].startswith("generated: ")


def test_demo_never_fires_above_the_maximum_entropy(capsys):
    main(["--max-new-tokens", "3", "--entropy-threshold", "1.0"])
    rows = [line for line in capsys.readouterr().out.splitlines() if re.match(r"^\s+\d+\s", line)]
    assert len(rows) == 3 and all(line.split()[2] == "-" for line in rows)
