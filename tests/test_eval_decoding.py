"""Generation options of the eval command line (issue 10 §4): passed to generate(), recorded in run.json,
a resume with others refused, bad values one error line."""
import json

import pytest

from hallupatch.eval import cli
from hallupatch.eval.store import StoreError


def _args(data, out, *extra):
    return ["mme", "--data", str(data), "--output", str(out), "--limit", "4", "--max-new-tokens", "3", "--no-progress",
            *extra]


@pytest.fixture()
def seen(backend, monkeypatch):
    """The keyword arguments of every model.generate call."""
    calls = []
    real = backend.model.generate

    def spy(*args, **kwargs):
        calls.append({k: v for k, v in kwargs.items() if k in GENERATION_KEYS})
        return real(*args, **kwargs)

    monkeypatch.setattr(backend.model, "generate", spy)
    return calls


GENERATION_KEYS = ("do_sample", "temperature", "top_p", "num_beams", "repetition_penalty")


def test_default_is_greedy_and_recorded(tmp_path, backend, mme_folder, seen):
    cli.run(_args(mme_folder, tmp_path), backend=backend)
    assert seen and all(call == {"do_sample": False, "num_beams": 1} for call in seen)
    decoding = json.loads((tmp_path / "run.json").read_text())["decoding"]
    assert decoding == {"do_sample": False, "temperature": None, "top_p": None, "num_beams": 1,
                        "repetition_penalty": None, "seed": None}


def test_sampling_options_reach_generate_and_a_seed_reproduces_the_answers(tmp_path, backend, mme_folder, seen):
    options = ["--do-sample", "--temperature", "1.5", "--top-p", "0.9", "--repetition-penalty", "1.05", "--seed", "7"]
    cli.run(_args(mme_folder, tmp_path / "a", *options), backend=backend)
    assert seen and all(call == {"do_sample": True, "temperature": 1.5, "top_p": 0.9, "num_beams": 1,
                                 "repetition_penalty": 1.05} for call in seen)
    recorded = json.loads((tmp_path / "a" / "run.json").read_text())["decoding"]
    assert recorded == {"do_sample": True, "temperature": 1.5, "top_p": 0.9, "num_beams": 1,
                        "repetition_penalty": 1.05, "seed": 7}
    cli.run(_args(mme_folder, tmp_path / "b", *options), backend=backend)
    first, again = ((tmp_path / d / "answers.jsonl").read_text() for d in "ab")
    assert first == again
    with pytest.raises(StoreError, match=r"decoding"):
        cli.run(_args(mme_folder, tmp_path / "a", *options[:-1], "8"), backend=backend)


def test_beams_reach_generate(tmp_path, backend, mme_folder, seen):
    cli.run(_args(mme_folder, tmp_path, "--num-beams", "2"), backend=backend)
    assert seen and all(call == {"do_sample": False, "num_beams": 2} for call in seen)


@pytest.mark.parametrize("options, message", [
    (["--temperature", "0.7"], "--temperature only apply when sampling: add --do-sample"),
    (["--do-sample", "--top-p", "1.5"], r"--top-p must lie in \(0, 1\]"),
    (["--do-sample", "--temperature", "0"], "--temperature must be a number > 0"),
    (["--num-beams", "0"], "--num-beams must be an integer >= 1"),
    (["--repetition-penalty", "-1"], "--repetition-penalty must be a number > 0"),
    (["--seed", "-1"], r"--seed must be an integer in \[0, 2\*\*32\)"),
])
def test_bad_decoding_options_are_one_error_line(tmp_path, mme_folder, capsys, options, message):
    assert cli.main(_args(mme_folder, tmp_path, *options)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert __import__("re").search(message, err[0]), err[0]


def test_decoding_options_do_not_apply_to_answers_made_elsewhere(tmp_path, mme_folder):
    answers = tmp_path / "a.jsonl"
    answers.write_text(json.dumps({"question_id": "existence/x.png", "text": "yes"}) + "\n")
    with pytest.raises(ValueError, match="--answers scores answers made elsewhere"):
        cli.run(["mme", "--answers", str(answers), "--data", str(mme_folder), "--output", str(tmp_path / "o"),
                 "--do-sample"])
