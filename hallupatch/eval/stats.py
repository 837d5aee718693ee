"""Paired significance tests for comparing two methods on the same questions, their power, and a
multiple-comparison correction.

* :func:`mcnemar_exact`: yes/no benchmarks. Only the discordant questions count: ``b`` answered right by
  the first method and wrong by the second, ``c`` the reverse. Under "no difference" each discordant
  question is a fair coin, so the two-sided exact p-value is ``min(1, 2 * P(X <= min(b, c)))`` with
  ``X ~ Binomial(b + c, 1/2)``.
* :func:`paired_bootstrap`: corpus metrics (CHAIR). Items are resampled with replacement, the same
  indices for both methods; each resample recomputes both metrics from summed per-item counts. The
  p-value is two-sided, ``min(1, 2 * min(P(d* <= 0), P(d* >= 0)))`` for the resampled differences
  ``d*``, and the 95% interval is their 2.5th and 97.5th percentiles.
* Power: :func:`mcnemar_power` (exact), :func:`mcnemar_mde`, :func:`mcnemar_sample_size`, and
  :func:`bootstrap_mde` and :func:`bootstrap_sample_size` (normal approximation) for the bootstrap.
* :func:`holm`: Holm's step-down adjustment of a family of p-values.

A test *rejects* ("finds a difference") when its p-value is **below** ``alpha`` (``p < alpha``), the rule the
package's findings use. For :func:`mcnemar_exact` the p-values are multiples of ``2 ** -(b + c - 1)``, so
for ``alpha = 0.05`` ``p < alpha`` and ``p <= alpha`` reject the same tables.
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Callable, Dict, List, Mapping, Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 1000
ALPHA = 0.05          # the significance level of every reported test and minimum detectable effect
PLANNED_POWER = 0.8   # the power a minimum detectable effect is computed for
MAX_SAMPLE_SIZE = 200_000   # mcnemar_sample_size searches no further by default


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts ``b`` and ``c``."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0; got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def wilson_interval(successes: int, trials: int, z: float = 1.959963984540054) -> tuple:
    """The 95% Wilson score interval of a proportion (``(nan, nan)`` without trials)."""
    if trials <= 0:
        return float("nan"), float("nan")
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return centre - half, centre + half


def mcnemar_counts(first: Sequence[bool], second: Sequence[bool]) -> Dict[str, int]:
    """``b`` (first right, second wrong) and ``c`` (first wrong, second right) of paired outcomes."""
    if len(first) != len(second):
        raise ValueError(f"paired outcomes need equal lengths; got {len(first)} and {len(second)}")
    b = sum(1 for x, y in zip(first, second) if x and not y)
    c = sum(1 for x, y in zip(first, second) if y and not x)
    return {"b": b, "c": c}


# --------------------------------------------------------------------------- power of the exact McNemar test
def _check_probability(name: str, value: float, low_open: bool, high_open: bool, hint: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number; got {type(value).__name__}")
    value = float(value)
    ok = math.isfinite(value) and (0 < value if low_open else 0 <= value) and (value < 1 if high_open else value <= 1)
    if not ok:
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise ValueError(f"{name} must be in {interval}; got {value}{hint}")
    return value


def _check_questions(name: str, n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"{name} must be a whole number of paired questions; got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"{name} must be >= 1 paired question; got {n}")
    return int(n)


_LOG_FACTORIALS = np.zeros(1)


def _log_factorials(m: int) -> np.ndarray:
    """``log(i!)`` for ``i = 0..m`` (math.lgamma, kept and extended between calls)."""
    global _LOG_FACTORIALS
    if len(_LOG_FACTORIALS) <= m:
        _LOG_FACTORIALS = np.array([math.lgamma(i + 1.0) for i in range(max(m + 1, 2 * len(_LOG_FACTORIALS)))])
    return _LOG_FACTORIALS[: m + 1]


def _xlogy(x: np.ndarray, y: float) -> np.ndarray:
    """``x * log(y)`` with ``0 * log(0) = 0`` (a certain outcome at probability 0 or 1)."""
    if y > 0:
        return x * math.log(y)
    return np.where(x == 0, 0.0, -np.inf)


def _binomial_log_pmf(trials: np.ndarray, successes: np.ndarray, p: float) -> np.ndarray:
    """``log P(Binomial(trials, p) = successes)``, elementwise; ``-inf`` outside ``0 <= successes <= trials``."""
    trials, successes = np.broadcast_arrays(np.asarray(trials), np.asarray(successes))
    inside = (successes >= 0) & (successes <= trials)
    t, s = np.where(inside, trials, 0), np.where(inside, successes, 0)
    lf = _log_factorials(int(t.max()) if t.size else 0)
    with np.errstate(invalid="ignore"):
        log_pmf = lf[t] - lf[s] - lf[t - s] + _xlogy(s, p) + _xlogy(t - s, 1 - p)
    return np.where(inside, log_pmf, -np.inf)


_CRITICAL: Dict[float, np.ndarray] = {}


def _critical_counts(max_discordant: int, alpha: float) -> np.ndarray:
    """Per number of discordant questions ``D = 0..max_discordant``: the largest ``k`` with
    ``mcnemar_exact(k, D - k) < alpha`` (``-1`` where no table with ``D`` discordant questions rejects).

    Found in one walk over ``D``: with ``X_D ~ Binomial(D, 1/2)``, ``P(X_{D+1} <= k) = P(X_D <= k) - P(X_D = k)/2``,
    and the critical count grows by at most one from ``D`` to ``D + 1``."""
    known = _CRITICAL.get(alpha)
    if known is not None and len(known) > max_discordant:
        return known[: max_discordant + 1]
    size = max(max_discordant + 1, 2 * len(known) if known is not None else 0, 64)
    lf = _log_factorials(size)
    log_half = math.log(0.5)

    def pmf(d: int, k: int) -> float:   # P(X_d = k)
        return math.exp(lf[d] - lf[k] - lf[d - k] + d * log_half) if 0 <= k <= d else 0.0

    counts = np.empty(size, dtype=np.int64)
    k, tail = -1, 0.0   # tail = P(X_D <= k)
    for d in range(size):
        if d > 0:
            tail -= 0.5 * pmf(d - 1, k)   # P(X_d <= k) from P(X_{d-1} <= k)
        while k + 1 <= d and 2 * (tail + pmf(d, k + 1)) < alpha:
            k += 1
            tail += pmf(d, k)
        counts[d] = k
    _CRITICAL[alpha] = counts
    return counts[: max_discordant + 1]


def _rejection_given_discordant(max_discordant: int, q: float, alpha: float) -> np.ndarray:
    """Per ``D = 0..max_discordant``: the probability that the exact McNemar test rejects when ``D``
    questions are discordant and each discordant one favours the second method with probability ``q``.

    With ``k_D`` the critical count, it rejects when ``c <= k_D`` or ``b = D - c <= k_D``, ``c ~ Binomial(D, q)``.
    ``L_D = P(Binomial(D, q) <= k_D)`` follows one recurrence, summed as a cumulative sum:
    ``L_{D+1} = L_D - q P(X_D = k_D) + [k_{D+1} > k_D] P(X_{D+1} = k_{D+1})``."""
    k = _critical_counts(max_discordant, alpha)
    d = np.arange(max_discordant + 1)

    def lower_tail(p: float) -> np.ndarray:
        steps = np.zeros(max_discordant + 1)
        leave = np.exp(_binomial_log_pmf(d[:-1], k[:-1], p))      # P(X_D = k_D), leaving the tail
        enter = np.exp(_binomial_log_pmf(d[1:], k[1:], p)) * (k[1:] > k[:-1])
        steps[1:] = enter - p * leave
        return np.clip(np.cumsum(steps), 0.0, 1.0)

    return np.clip(lower_tail(q) + lower_tail(1 - q), 0.0, 1.0)


def _discordance_and_effect(discordance: float, effect: float) -> tuple:
    discordance = _check_probability("discordance", discordance, low_open=False, high_open=False,
                                     hint=" (the share of questions the two methods answer differently)")
    if isinstance(effect, bool) or not isinstance(effect, (int, float, np.integer, np.floating)):
        raise TypeError(f"effect must be a number; got {type(effect).__name__}")
    effect = float(effect)
    if not math.isfinite(effect) or abs(effect) > discordance:
        raise ValueError(f"effect must be between -discordance and discordance ({-discordance}, {discordance}): an "
                         f"accuracy difference cannot exceed the share of discordant questions; got {effect}")
    return discordance, effect


def _power_curve(max_n: int, discordance: float, effect: float, alpha: float) -> np.ndarray:
    """Exact power for every ``n = 0..max_n`` (the binomial of ``D`` grown one question at a time)."""
    q = 0.5 if discordance == 0 else (1 + effect / discordance) / 2
    rejection = _rejection_given_discordant(max_n, q, alpha)
    power = np.empty(max_n + 1)
    pmf, low = np.ones(1), 0                      # P(D = low + i) for the current n, negligible ends trimmed
    for n in range(max_n + 1):
        if n > 0:
            grown = np.zeros(len(pmf) + 1)
            grown[:-1] += (1 - discordance) * pmf
            grown[1:] += discordance * pmf
            keep = np.flatnonzero(grown > 1e-300)
            pmf, low = grown[keep[0]: keep[-1] + 1], low + keep[0]
        power[n] = float(pmf @ rejection[low: low + len(pmf)])
    return power


def mcnemar_power(n: int, discordance: float, effect: float, alpha: float = ALPHA) -> float:
    """Exact power of :func:`mcnemar_exact` (rejecting when ``p < alpha``) on ``n`` paired questions.

    Each question is discordant (the two methods disagree on it) with probability ``discordance``, and
    ``effect`` is the accuracy difference, second minus first (a share, not points). So the number of
    discordant questions is ``D ~ Binomial(n, discordance)`` and, given ``D``, the count ``c`` (second right,
    first wrong) is ``Binomial(D, (1 + effect / discordance) / 2)``; the power sums the probability of
    every rejected table ``(b, c)`` (log-space binomial terms, nothing approximated). Symmetric in ``effect``.
    """
    n = _check_questions("n", n)
    discordance, effect = _discordance_and_effect(discordance, effect)
    alpha = _check_probability("alpha", alpha, low_open=True, high_open=True)
    if discordance == 0:
        return 0.0   # no discordant question, p = 1: never rejects
    q = (1 + effect / discordance) / 2
    rejection = _rejection_given_discordant(n, q, alpha)
    d_pmf = np.exp(_binomial_log_pmf(np.full(n + 1, n), np.arange(n + 1), discordance))
    return float(min(1.0, d_pmf @ rejection))


def mcnemar_mde(n: int, discordance: float, power: float = PLANNED_POWER, alpha: float = ALPHA) -> float:
    """Minimum detectable accuracy difference (a share, not points): the smallest ``effect >= 0`` whose
    :func:`mcnemar_power` reaches ``power`` with ``n`` paired questions at this ``discordance``.

    The power grows with ``|effect|`` (the rejection region is symmetric), so bisection finds it to
    ``1e-6``; the value returned has power ``>= power``. ``inf`` when even the largest possible difference
    (``effect = discordance``: every discordant question favours one method) falls short, which includes
    ``discordance = 0`` (two methods that never disagree show no difference).
    """
    n = _check_questions("n", n)
    discordance = _check_probability("discordance", discordance, low_open=False, high_open=False,
                                     hint=" (the share of questions the two methods answer differently)")
    target = _check_probability("power", power, low_open=True, high_open=True)
    alpha = _check_probability("alpha", alpha, low_open=True, high_open=True)
    if discordance == 0 or mcnemar_power(n, discordance, discordance, alpha) < target:
        return math.inf
    low, high = 0.0, discordance
    if mcnemar_power(n, discordance, 0.0, alpha) >= target:
        return 0.0
    while high - low > 1e-6:
        middle = (low + high) / 2
        if mcnemar_power(n, discordance, middle, alpha) >= target:
            high = middle
        else:
            low = middle
    return high


def mcnemar_sample_size(discordance: float, effect: float, power: float = PLANNED_POWER, alpha: float = ALPHA,
                        max_n: int = MAX_SAMPLE_SIZE) -> int:
    """The smallest number of paired questions ``n`` whose :func:`mcnemar_power` reaches ``power``.

    The exact test's power is not monotone in ``n`` (it saw-tooths as the critical count steps), so a
    somewhat larger ``n`` can fall slightly below ``power`` again; check the ``n`` you plan with
    :func:`mcnemar_power`. Every ``n`` up to ``max_n`` is evaluated exactly; a ``ValueError`` when none reaches it.
    """
    discordance, effect = _discordance_and_effect(discordance, effect)
    target = _check_probability("power", power, low_open=True, high_open=True)
    alpha = _check_probability("alpha", alpha, low_open=True, high_open=True)
    max_n = _check_questions("max_n", max_n)
    if effect == 0 or discordance == 0:
        raise ValueError("effect must be non-zero (and so discordance > 0): no n detects a zero difference")
    # grow the horizon geometrically: the work is about quadratic in it
    horizon = 64
    while True:
        horizon = min(horizon, max_n)
        curve = _power_curve(horizon, discordance, effect, alpha)
        reached = np.flatnonzero(curve >= target)
        if reached.size:
            return int(reached[0])
        if horizon == max_n:
            raise ValueError(f"no n up to max_n={max_n} gives power {target} for effect {effect} at discordance "
                             f"{discordance}; pass a larger max_n (or plan for a larger effect)")
        horizon *= 4


def normal_mde_factor(power: float = PLANNED_POWER, alpha: float = ALPHA) -> float:
    """``z_{1 - alpha/2} + z_{power}``: a two-sided normal test's minimum detectable effect in standard errors."""
    normal = NormalDist()
    return normal.inv_cdf(1 - alpha / 2) + normal.inv_cdf(power)


def bootstrap_mde(resampled_differences: Sequence[float], power: float = PLANNED_POWER, alpha: float = ALPHA) -> float:
    """Minimum detectable difference of a paired bootstrap, by the normal approximation:
    ``(z_{1 - alpha/2} + z_{power}) * sd`` of the resampled differences (``sd`` with ``ddof=1``; non-finite
    resamples left out), in the metric's own units. ``nan`` with fewer than two finite resamples, or when
    they never vary (``sd = 0``: the two methods agree on every item, so the data say nothing about the
    spread a real difference would have)."""
    target = _check_probability("power", power, low_open=True, high_open=True)
    alpha = _check_probability("alpha", alpha, low_open=True, high_open=True)
    d = np.asarray(resampled_differences, dtype=float)
    d = d[np.isfinite(d)]
    if d.size < 2:
        return float("nan")
    sd = float(np.std(d, ddof=1))
    if sd == 0:
        return float("nan")
    return normal_mde_factor(target, alpha) * sd


def bootstrap_sample_size(n: int, mde: float, effect: float) -> int:
    """Items a paired bootstrap needs for its minimum detectable difference to reach ``effect``, from a
    run of ``n`` items whose :func:`bootstrap_mde` was ``mde`` (same power and alpha): the spread of a
    mean of ``n`` items shrinks as ``1 / sqrt(n)``, so ``ceil(n * (mde / effect) ** 2)``."""
    n = _check_questions("n", n)
    for name, value in (("mde", mde), ("effect", effect)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(f"{name} must be a number; got {type(value).__name__}")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number (in the metric's units); got {value}")
    return max(1, math.ceil(n * (mde / effect) ** 2 - 1e-9))


# --------------------------------------------------------------------------- multiplicity
def holm(pvalues: Sequence[float]) -> List[float]:
    """Holm's step-down adjusted p-values, in the input's order: sorted ascending, the ``i``-th smallest
    (from 1) is multiplied by ``m - i + 1``, made non-decreasing along the order and capped at 1.

    ``nan`` means "no test" (e.g. a bootstrap p with no finite resample): it stays ``nan`` and is not
    counted in the family size ``m``. Other values must lie in ``[0, 1]``."""
    values = []
    for p in pvalues:
        if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)):
            raise TypeError(f"p-values must be numbers (nan for a missing test); got {p!r}")
        p = float(p)
        if not math.isnan(p) and not 0 <= p <= 1:
            raise ValueError(f"p-values must be in [0, 1] (nan for a missing test); got {p}")
        values.append(p)
    tested = sorted((i for i, p in enumerate(values) if not math.isnan(p)), key=lambda i: values[i])
    m = len(tested)
    adjusted = [float("nan")] * len(values)
    running = 0.0
    for rank, i in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * values[i]))
        adjusted[i] = running
    return adjusted


# --------------------------------------------------------------------------- the paired bootstrap
def paired_bootstrap(
    first: Sequence[Mapping[str, float]],
    second: Sequence[Mapping[str, float]],
    metrics: Callable[[Mapping[str, float], int], Dict[str, float]],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> Dict[str, Dict[str, float]]:
    """Per metric: the observed difference (second - first), its 95% bootstrap interval, p-value and
    minimum detectable difference (``mde``: :func:`bootstrap_mde` at 80% power and alpha 0.05).

    ``first[i]`` and ``second[i]`` are the two methods' additive counts for the same item ``i``;
    ``metrics(sums, count)`` turns summed counts of ``count`` items into metric values.
    """
    if len(first) != len(second) or not first:
        raise ValueError(f"paired items need equal, non-zero lengths; got {len(first)} and {len(second)}")
    keys = sorted(first[0])
    a = np.array([[float(item[k]) for k in keys] for item in first])
    b = np.array([[float(item[k]) for k in keys] for item in second])
    n = len(first)

    def evaluate(rows_a: np.ndarray, rows_b: np.ndarray) -> Dict[str, float]:
        m_a = metrics(dict(zip(keys, rows_a.sum(axis=0))), n)
        m_b = metrics(dict(zip(keys, rows_b.sum(axis=0))), n)
        return {name: m_b[name] - m_a[name] for name in m_a}

    observed = evaluate(a, b)
    rng = np.random.default_rng(seed)
    draws: Dict[str, list] = {name: [] for name in observed}
    for _ in range(resamples):
        index = rng.integers(0, n, size=n)
        for name, value in evaluate(a[index], b[index]).items():
            draws[name].append(value)
    result = {}
    for name, value in observed.items():
        d = np.array([x for x in draws[name] if not math.isnan(x)])
        if math.isnan(value) or d.size == 0:
            result[name] = {"difference": value, "ci95": [float("nan"), float("nan")], "p": float("nan"),
                            "mde": float("nan")}
            continue
        p = min(1.0, 2 * min(float(np.mean(d <= 0)), float(np.mean(d >= 0))))
        result[name] = {"difference": float(value), "ci95": [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))],
                        "p": p, "mde": bootstrap_mde(d)}
    return result
