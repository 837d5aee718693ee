"""Pure functions of DESIGN §4c checked against independent float64 / plain-loop re-computations."""
import math

import pytest
import torch

from hallupatch import layer_contrast as lc


# ---------------------------------------------------------------- candidate layers (transformers' rules)
@pytest.mark.parametrize(
    "n, tied, low, high",
    [
        (2, False, [0], [1]),
        (2, True, [1], [1]),
        (8, False, [0, 2], [4, 6]),
        (8, True, [2], [4, 6]),
        (32, False, list(range(0, 16, 2)), list(range(16, 32, 2))),
        (32, True, list(range(2, 16, 2)), list(range(16, 32, 2))),
        (48, False, list(range(0, 20, 2)), list(range(28, 48, 2))),
        (48, True, list(range(2, 20, 2)), list(range(28, 48, 2))),
        (1, True, [0], [0]),
        (1, False, [0], [0]),
        (40, True, list(range(2, 20, 2)), list(range(20, 40, 2))),
    ],
)
def test_candidate_layers_low_high(n, tied, low, high):
    assert lc.candidate_layers("low", n, tied) == low
    assert lc.candidate_layers("high", n, tied) == high


def test_candidate_layers_explicit_lists():
    assert lc.candidate_layers([0, 5, 7, 8, 12], 8, True) == [0, 5, 7]  # indices >= N dropped, order kept
    assert lc.candidate_layers((3,), 4, False) == [3]


@pytest.mark.parametrize("bad", ["middle", [-1], [1.5], [True], 3, None])
def test_candidate_layers_rejects_bad_specs(bad):
    with pytest.raises(ValueError, match="candidate_layers"):
        lc.candidate_layers(bad, 8, False)


def test_candidate_layers_empty_results_are_errors():
    with pytest.raises(ValueError, match="no premature layer"):
        lc.candidate_layers([8, 9], 8, False)
    # 3 tied layers: start = 2 > N // 2 = 1, so transformers' "low" range is empty
    with pytest.raises(ValueError, match="no premature layer"):
        lc.candidate_layers("low", 3, True)


# ---------------------------------------------------------------- divergence, filter, contrast
def _ref_softmax(row):
    m = max(row)
    e = [math.exp(x - m) for x in row]
    s = sum(e)
    return [x / s for x in e]


def _ref_divergence(f_row, g_row):
    """Plain-loop float64 re-computation of d_c: mean_v M (log M - log p), averaged over both sides."""
    pf, pg = _ref_softmax(f_row), _ref_softmax(g_row)
    v = len(pf)
    mix = [(a + b) / 2 for a, b in zip(pf, pg)]
    kl_f = sum(m * (math.log(m) - math.log(a)) for m, a in zip(mix, pf)) / v
    kl_g = sum(m * (math.log(m) - math.log(b)) for m, b in zip(mix, pg)) / v
    return 0.5 * (kl_f + kl_g)


def _ref_contrast(f_row, g_row):
    lf = [math.log(p) for p in _ref_softmax(f_row)]
    lg = [math.log(p) for p in _ref_softmax(g_row)]
    thr = max(lf) + math.log(0.1)
    return [a - b if a >= thr else -math.inf for a, b in zip(lf, lg)]


def _random_logits(seed, *shape, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def test_divergence_matches_plain_loops():
    f = _random_logits(0, 3, 17)
    g = _random_logits(1, 4, 3, 17)
    d = lc.layer_divergence(f, g)
    assert d.shape == (4, 3) and d.dtype == torch.float32
    for c in range(4):
        for b in range(3):
            ref = _ref_divergence(f[b].double().tolist(), g[c, b].double().tolist())
            assert d[c, b].item() == pytest.approx(ref, rel=1e-4, abs=1e-7)


def test_divergence_is_kl_of_mixture_not_textbook_js():
    # KL(M || p) differs from the textbook JS term KL(p || M); the published form is kept.
    f = _random_logits(2, 1, 9)
    g = _random_logits(3, 1, 1, 9)
    pf, pg = torch.softmax(f.double(), -1), torch.softmax(g[0].double(), -1)
    mix = (pf + pg) / 2
    textbook = 0.5 * ((pf * (pf / mix).log()).mean() + (pg * (pg / mix).log()).mean())
    assert lc.layer_divergence(f, g).item() != pytest.approx(textbook.item(), rel=1e-3)


def test_contrast_matches_plain_loops_and_keeps_argmax():
    f = _random_logits(4, 5, 23)
    g = _random_logits(5, 5, 23)
    out = lc.contrast_logits(f, g)
    for b in range(5):
        ref = _ref_contrast(f[b].double().tolist(), g[b].double().tolist())
        for v, r in enumerate(ref):
            if r == -math.inf:
                assert out[b, v].item() == -math.inf
            else:
                assert out[b, v].item() == pytest.approx(r, rel=1e-5, abs=1e-5)
        assert out[b, f[b].argmax()].item() > -math.inf


def test_contrast_flat_distribution_keeps_everything():
    f = torch.zeros(1, 6)
    g = torch.arange(6.0).unsqueeze(0)
    out = lc.contrast_logits(f, g)
    assert torch.isfinite(out).all()
    expected = torch.log_softmax(f, -1) - torch.log_softmax(g, -1)
    torch.testing.assert_close(out, expected)


def test_select_and_contrast_argmax_per_sample():
    f = _random_logits(6, 4, 11)
    g = _random_logits(7, 3, 4, 11)
    out, chosen, _ = lc.select_and_contrast(f, g)
    for b in range(4):
        ds = [_ref_divergence(f[b].double().tolist(), g[c, b].double().tolist()) for c in range(3)]
        best = max(range(3), key=lambda c: ds[c])
        assert chosen[b].item() == best
        ref = _ref_contrast(f[b].double().tolist(), g[best, b].double().tolist())
        finite = [r for r in ref if r != -math.inf]
        assert out[b][torch.isfinite(out[b])].tolist() == pytest.approx(finite, rel=1e-5, abs=1e-5)


def test_select_and_contrast_is_batch_invariant():
    f = _random_logits(8, 4, 13)
    g = _random_logits(9, 5, 4, 13)
    out, chosen, _ = lc.select_and_contrast(f, g)
    for b in range(4):
        single, c1, _ = lc.select_and_contrast(f[b : b + 1], g[:, b : b + 1])
        assert c1.item() == chosen[b].item()
        assert torch.equal(single[0], out[b])


def test_single_candidate_needs_no_divergence():
    f = _random_logits(10, 2, 7)
    g = _random_logits(11, 1, 2, 7)
    out, chosen, d = lc.select_and_contrast(f, g, prior=torch.tensor([5.0]))
    assert chosen.tolist() == [0, 0] and d is None
    torch.testing.assert_close(out, lc.contrast_logits(f, g[0]))


def test_prior_probabilities_and_inverse_cdf():
    d = torch.tensor([[0.1, 0.0], [0.3, 0.2], [0.05, 0.4]])  # (candidates, batch)
    prior = torch.tensor([0.5, 0.0, 1.0])
    probs = lc.layer_probabilities(d, prior)
    for b in range(2):
        col = [d[c, b].item() for c in range(3)]
        inner = _ref_softmax(col)
        ref = _ref_softmax([inner[c] + prior[c].item() for c in range(3)])
        assert probs[b].tolist() == pytest.approx(ref, rel=1e-5)
    # inverse CDF: u just below / above the first boundary
    p0 = probs[:, 0]
    chosen = lc.choose_premature(d, prior, uniform=p0 - 1e-4)
    assert chosen.tolist() == [0, 0]
    chosen = lc.choose_premature(d, prior, uniform=p0 + 1e-4)
    assert chosen.tolist() == [1, 1]
    assert lc.choose_premature(d, prior, uniform=torch.tensor([0.999999, 0.999999])).tolist() == [2, 2]


def test_prior_sampling_frequencies_match_distribution():
    d = torch.tensor([[0.02], [0.5], [0.3], [0.1]])
    prior = torch.tensor([1.0, 0.0, 0.3, -0.5])
    expected = lc.layer_probabilities(d, prior)[0]
    torch.manual_seed(0)
    draws = 20000
    counts = torch.zeros(4)
    for _ in range(20):
        chosen = lc.choose_premature(d.expand(4, draws // 20), prior)
        counts += torch.bincount(chosen, minlength=4).float()
    freq = counts / draws
    tol = 4 * torch.sqrt(expected * (1 - expected) / draws)
    assert torch.all((freq - expected).abs() <= tol), (freq, expected)


def test_check_candidate_spec_normalises_sequences():
    import numpy as np

    assert lc.check_candidate_spec(np.array([1, 3])) == [1, 3]
    assert lc.check_candidate_spec((0, 2)) == [0, 2]
    assert lc.check_candidate_spec(torch.tensor([4])) == [4]
    assert lc.check_candidate_spec("high") == "high"
    with pytest.raises(ValueError, match="empty"):
        lc.check_candidate_spec([])
