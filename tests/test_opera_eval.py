"""OPERA in the evaluation harness: ``--method opera`` and the ``opera`` / ``opera-fast`` presets."""
import json

from hallupatch.eval import cli
from hallupatch.eval.decoding import Decoding


def test_opera_preset_runs_pope_in_five_beams_with_the_published_length(tmp_path):
    out = tmp_path / "pope"
    cli.run(["pope", "--preset", "opera-fast", "--limit", "3", "--output", str(out), "--no-progress"])
    settings = json.loads((out / "run.json").read_text())
    assert settings["method"] == "opera" and settings["preset"] == "opera-fast"
    assert settings["knobs"] == {"threshold": 25, "num_attn_candidates": 1}
    assert settings["decoding"]["num_beams"] == 5 and settings["max_new_tokens"] == 10
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 3 and all(a["opera_rollbacks"] == [] for a in answers)   # short answers: no room


def test_opera_next_to_greedy_gets_its_beams_and_the_others_keep_theirs(tmp_path):
    out = tmp_path / "cmp"
    result = cli.run(["pope", "--method", "none,opera", "--opera-threshold", "20", "--limit", "2",
                      "--output", str(out), "--no-progress"])
    assert list(result["methods"]) == ["none", "opera"]
    none = json.loads((out / "none" / "run.json").read_text())
    opera = json.loads((out / "opera" / "run.json").read_text())
    assert none["decoding"]["num_beams"] == 1 and none["knobs"] == {}
    assert opera["decoding"]["num_beams"] == 5 and opera["knobs"] == {"threshold": 20}


def test_a_width_given_is_kept_and_other_methods_stay_greedy():
    assert Decoding(num_beams=3).for_method("opera").num_beams == 3
    assert Decoding().for_method("opera").num_beams == 5
    assert Decoding().for_method("memvr").num_beams == 1


def test_opera_with_sampling_is_refused_with_one_error_line(tmp_path, capsys):
    code = cli.main(["pope", "--method", "opera", "--do-sample", "--limit", "1", "--output", str(tmp_path / "s"),
                     "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "do_sample=False" in err and "Traceback" not in err
