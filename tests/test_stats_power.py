"""Power, minimum detectable effects and the Holm correction (issue 22, items 1 and 4), against
independent references: scipy's binomial distribution and exact binomial test, statsmodels'
``multipletests``, a Monte-Carlo simulation and Connor's (1987) normal-approximation sample size."""
import math

import numpy as np
import pytest
from scipy import optimize as scipy_optimize
from scipy import stats as scipy_stats
from statsmodels.stats.multitest import multipletests

from hallupatch.eval import stats


# ------------------------------------------------------------------ references
def scipy_exact_p(b: int, c: int) -> float:
    return 1.0 if b + c == 0 else scipy_stats.binomtest(c, b + c, 0.5).pvalue


def enumerated_power(n, discordance, effect, alpha=0.05):
    """Every (D, c) table: scipy's pmf for D and c, scipy's exact binomial test for the decision."""
    q = (1 + effect / discordance) / 2
    power = 0.0
    for d in range(n + 1):
        p_d = scipy_stats.binom.pmf(d, n, discordance)
        for c in range(d + 1):
            if scipy_exact_p(d - c, c) < alpha:
                power += p_d * scipy_stats.binom.pmf(c, d, q)
    return power


def scipy_power(n, discordance, effect, alpha=0.05):
    """The same sum with scipy's binomial tails: per D the critical count from scipy's ppf and cdf
    (D where scipy's pmf is below 1e-20 left out: they cannot move the sum by 1e-15)."""
    q = (1 + effect / discordance) / 2
    d = np.arange(1, n + 1)
    weight = scipy_stats.binom.pmf(d, n, discordance)
    d, weight = d[weight > 1e-20], weight[weight > 1e-20]
    crit = scipy_stats.binom.ppf(alpha / 2, d, 0.5).astype(int)   # smallest k with cdf >= alpha / 2
    crit = np.where(2 * scipy_stats.binom.cdf(crit, d, 0.5) < alpha, crit, crit - 1)
    assert np.all(2 * scipy_stats.binom.cdf(crit + 1, d, 0.5) >= alpha)
    given_d = np.where(crit >= 0, scipy_stats.binom.cdf(crit, d, q) + scipy_stats.binom.sf(d - crit - 1, d, q), 0.0)
    return float(weight @ given_d)


def connor_sample_size(discordance, effect, power=0.8, alpha=0.05):
    """Connor (1987): n = (z_a sqrt(psi) + z_b sqrt(psi - delta^2))^2 / delta^2."""
    za, zb = scipy_stats.norm.ppf(1 - alpha / 2), scipy_stats.norm.ppf(power)
    return (za * math.sqrt(discordance) + zb * math.sqrt(discordance - effect ** 2)) ** 2 / effect ** 2


# ------------------------------------------------------------------ the exact test's critical counts
def test_critical_counts_are_where_the_exact_test_starts_to_reject():
    counts = stats._critical_counts(400, 0.05)
    for d, k in enumerate(counts):
        if k >= 0:
            assert stats.mcnemar_exact(int(k), d - int(k)) < 0.05
        assert stats.mcnemar_exact(int(k) + 1, d - int(k) - 1) >= 0.05
    assert counts[5] == -1 and counts[6] == 0   # 2 / 2^6 < 0.05 <= 2 / 2^5


# ------------------------------------------------------------------ power
@pytest.mark.parametrize("n, discordance, effect", [(1, 0.5, 0.2), (7, 1.0, 1.0), (25, 0.4, 0.2), (60, 0.3, -0.15),
                                                    (80, 0.1, 0.0), (90, 0.9, 0.3)])
def test_power_equals_scipy_enumeration_of_every_table(n, discordance, effect):
    assert stats.mcnemar_power(n, discordance, effect) == pytest.approx(
        enumerated_power(n, discordance, effect), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("n, discordance, effect, alpha", [(600, 0.1, 0.03, 0.05), (1500, 0.25, 0.02, 0.05),
                                                           (400, 0.05, 0.02, 0.01), (3000, 0.6, -0.05, 0.1)])
def test_power_equals_scipy_binomial_tails(n, discordance, effect, alpha):
    assert stats.mcnemar_power(n, discordance, effect, alpha) == pytest.approx(
        scipy_power(n, discordance, effect, alpha), rel=1e-8, abs=1e-12)


def test_power_agrees_with_a_monte_carlo_of_the_packages_test():
    n, discordance, effect, studies = 300, 0.15, 0.05, 4000
    rng = np.random.default_rng(11)
    # per question: discordant favouring the first (b), favouring the second (c), or concordant
    cells = rng.multinomial(n, [(discordance - effect) / 2, (discordance + effect) / 2, 1 - discordance], studies)
    rejected = np.mean([stats.mcnemar_exact(int(b), int(c)) < 0.05 for b, c, _ in cells])
    exact = stats.mcnemar_power(n, discordance, effect)
    assert abs(rejected - exact) < 4 * math.sqrt(exact * (1 - exact) / studies)
    assert 0.3 < exact < 0.9   # a case where the check can fail either way


def test_power_at_no_effect_is_the_tests_size_and_grows_with_the_effect():
    size = stats.mcnemar_power(500, 0.2, 0.0)
    assert 0 < size < 0.05
    powers = [stats.mcnemar_power(500, 0.2, e) for e in (0.0, 0.02, 0.04, 0.06, 0.1)]
    assert powers == sorted(powers) and powers[-1] > 0.99
    assert stats.mcnemar_power(500, 0.2, -0.04) == pytest.approx(stats.mcnemar_power(500, 0.2, 0.04))
    assert stats.mcnemar_power(500, 0.0, 0.0) == 0.0   # no discordant question: p = 1


def test_power_of_a_large_study_equals_scipys_tails():
    # 20000 questions: one vectorised sum
    assert stats.mcnemar_power(20000, 0.1, 0.01) == pytest.approx(scipy_power(20000, 0.1, 0.01), rel=1e-7)


# ------------------------------------------------------------------ minimum detectable effect, sample size
@pytest.mark.parametrize("n, discordance, power", [(600, 0.1, 0.8), (200, 0.3, 0.9), (5000, 0.05, 0.8)])
def test_mde_round_trips(n, discordance, power):
    mde = stats.mcnemar_mde(n, discordance, power)
    assert 0 < mde <= discordance
    assert stats.mcnemar_power(n, discordance, mde) >= power
    assert stats.mcnemar_power(n, discordance, mde - 2e-6) < power
    # the normal approximation (Connor) gives nearly the same difference at this n
    assert connor_sample_size(discordance, mde, power) == pytest.approx(n, rel=0.2)


def test_mde_is_infinite_when_nothing_is_detectable():
    assert stats.mcnemar_mde(600, 0.0) == math.inf   # the two methods never disagree
    assert stats.mcnemar_mde(5, 1.0) == math.inf     # 5 discordant questions can never give p < 0.05
    # 6 discordant questions reject only when all favour one method: power q^6 + (1 - q)^6, q = (1 + effect) / 2
    mde = stats.mcnemar_mde(6, 1.0, power=0.5)
    q = scipy_optimize.brentq(lambda q: q ** 6 + (1 - q) ** 6 - 0.5, 0.5, 1.0)
    assert mde == pytest.approx(2 * q - 1, abs=2e-6)


@pytest.mark.parametrize("discordance, effect, power", [(0.2, 0.08, 0.8), (0.1, 0.05, 0.9), (0.4, 0.1, 0.8)])
def test_sample_size_is_the_smallest_n_reaching_the_power(discordance, effect, power):
    n = stats.mcnemar_sample_size(discordance, effect, power)
    assert stats.mcnemar_power(n, discordance, effect) >= power
    assert all(stats.mcnemar_power(m, discordance, effect) < power for m in range(1, n))
    connor = connor_sample_size(discordance, effect, power)
    assert 0.9 * connor <= n <= 1.25 * connor


def test_sample_size_for_the_issues_two_point_change_is_in_connors_band():
    n = stats.mcnemar_sample_size(0.1, 0.02)
    assert 0.95 * connor_sample_size(0.1, 0.02) <= n <= 1.15 * connor_sample_size(0.1, 0.02)
    assert scipy_power(n, 0.1, 0.02) >= 0.8 > scipy_power(n - 1, 0.1, 0.02) or n == 1


# ------------------------------------------------------------------ bad input
def test_bad_input_is_refused_with_what_to_do():
    with pytest.raises(ValueError, match="effect must be between -discordance and discordance"):
        stats.mcnemar_power(100, 0.1, 0.2)
    with pytest.raises(ValueError, match=r"discordance must be in \[0, 1\]"):
        stats.mcnemar_power(100, 1.5, 0.1)
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\)"):
        stats.mcnemar_power(100, 0.1, 0.05, alpha=0)
    with pytest.raises(ValueError, match="n must be >= 1"):
        stats.mcnemar_power(0, 0.1, 0.05)
    with pytest.raises(TypeError, match="whole number"):
        stats.mcnemar_power(10.5, 0.1, 0.05)
    with pytest.raises(ValueError, match=r"power must be in \(0, 1\)"):
        stats.mcnemar_mde(100, 0.1, power=1.0)
    with pytest.raises(ValueError, match="effect must be non-zero"):
        stats.mcnemar_sample_size(0.1, 0.0)
    with pytest.raises(ValueError, match="pass a larger max_n"):
        stats.mcnemar_sample_size(0.5, 0.001, max_n=1000)
    with pytest.raises(ValueError, match=r"p-values must be in \[0, 1\]"):
        stats.holm([0.1, 1.2])
    with pytest.raises(TypeError, match="must be numbers"):
        stats.holm([0.1, None])


# ------------------------------------------------------------------ the bootstrap's minimum detectable difference
def test_bootstrap_mde_is_the_normal_approximation_of_the_resampled_spread():
    d = np.random.default_rng(2).normal(1.0, 3.0, size=500)
    expected = (scipy_stats.norm.ppf(0.975) + scipy_stats.norm.ppf(0.8)) * np.std(d, ddof=1)
    assert stats.bootstrap_mde(d) == pytest.approx(expected)
    expected_90 = (scipy_stats.norm.ppf(0.995) + scipy_stats.norm.ppf(0.9)) * np.std(d, ddof=1)
    assert stats.bootstrap_mde(list(d) + [float("nan")], power=0.9, alpha=0.01) == pytest.approx(expected_90)
    assert math.isnan(stats.bootstrap_mde([0.0] * 100))   # never varies: nothing to say
    assert math.isnan(stats.bootstrap_mde([1.0]))


def test_bootstrap_sample_size_scales_the_spread_as_one_over_root_n():
    # per-item counts of a CHAIR-like rate: the bootstrap's MDE at 100 and at 900 items of the same kind
    rng = np.random.default_rng(7)
    items = 900
    first = [{"x": float(rng.random() < 0.3), "y": 1.0} for _ in range(items)]
    second = [{"x": float(rng.random() < 0.2), "y": 1.0} for _ in range(items)]

    def rate(sums, count):
        return {"rate": 100.0 * sums["x"] / count}

    small = stats.paired_bootstrap(first[:100], second[:100], rate, resamples=400)["rate"]["mde"]
    large = stats.paired_bootstrap(first, second, rate, resamples=400)["rate"]["mde"]
    assert stats.bootstrap_sample_size(100, small, large) == pytest.approx(items, rel=0.2)
    # and the MDE itself is the normal test's: 2.80 standard errors of a difference of two independent rates
    se = 100 * math.sqrt((0.3 * 0.7 + 0.2 * 0.8) / items)
    assert large == pytest.approx((scipy_stats.norm.ppf(0.975) + scipy_stats.norm.ppf(0.8)) * se, rel=0.15)
    assert stats.bootstrap_sample_size(100, 4.0, 2.0) == 400 and stats.bootstrap_sample_size(100, 1.0, 2.0) == 25
    with pytest.raises(ValueError, match="effect must be a positive number"):
        stats.bootstrap_sample_size(100, 4.0, 0.0)


# ------------------------------------------------------------------ Holm
def test_holm_equals_statsmodels():
    rng = np.random.default_rng(4)
    for m in (1, 2, 5, 17, 40):
        p = rng.uniform(0, 0.2, size=m) ** 2
        p[rng.integers(0, m)] = p[0]   # a tie
        assert stats.holm(list(p)) == pytest.approx(list(multipletests(p, method="holm")[1]), rel=1e-12)
    p = [0.2, 0.001, 0.04, 1.0, 0.03]
    assert stats.holm(p) == pytest.approx(list(multipletests(p, method="holm")[1]))


def test_holm_leaves_missing_tests_out_of_the_family():
    p = [0.01, float("nan"), 0.04, 0.03]
    adjusted = stats.holm(p)
    assert math.isnan(adjusted[1])
    reference = multipletests([0.01, 0.04, 0.03], method="holm")[1]
    assert [adjusted[0], adjusted[2], adjusted[3]] == pytest.approx(list(reference))
    assert stats.holm([]) == [] and all(math.isnan(x) for x in stats.holm([float("nan")] * 2))
