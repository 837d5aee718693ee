"""The patched 4.40 ``generate()`` reproduces transformers' own DoLa (4.46.3, recorded in tests/data) at
batch size 1: same candidate layers for tied/untied "low"/"high"/list, same scores at every step (after
repetition penalty, and temperature/top-k when sampling) and the same tokens, greedy and sampled."""
import warnings

import pytest
import torch

import hallupatch
from hallupatch.engine import get_patch

from dola_oracle import CASES, DATA, PROMPT, build_model, generate_kwargs, key


@pytest.fixture(scope="module")
def reference():
    return torch.load(DATA)


@pytest.mark.parametrize("tie, layers, sample", CASES, ids=[key(*case) for case in CASES])
def test_matches_transformers_dola(reference, tie, layers, sample):
    expected = reference[key(tie, layers, sample)]
    model = build_model(tie)
    hallupatch.apply(model, method="dola", candidate_layers=layers)
    try:
        torch.manual_seed(123)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            out = model.generate(torch.tensor(PROMPT), **generate_kwargs(sample))
    finally:
        candidates = get_patch(model).methods["dola"].candidates
        hallupatch.remove(model)
    if layers == "low":
        assert candidates == ([2] if tie else [0, 2])
    scores = torch.stack(out.scores)
    want = expected["scores"]
    assert torch.equal(torch.isinf(scores), torch.isinf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(scores[finite], want[finite], rtol=1e-4, atol=1e-4)
    assert torch.equal(out.sequences, expected["sequences"])
