"""Paired significance tests for comparing two methods on the same questions.

* :func:`mcnemar_exact`: yes/no benchmarks. Only the discordant questions count: ``b`` answered right by
  the first method and wrong by the second, ``c`` the reverse. Under "no difference" each discordant
  question is a fair coin, so the two-sided exact p-value is ``min(1, 2 * P(X <= min(b, c)))`` with
  ``X ~ Binomial(b + c, 1/2)``.
* :func:`paired_bootstrap`: corpus metrics (CHAIR). Items are resampled with replacement, the same
  indices for both methods; each resample recomputes both metrics from summed per-item counts. The
  p-value is two-sided, ``min(1, 2 * min(P(d* <= 0), P(d* >= 0)))`` for the resampled differences
  ``d*``, and the 95% interval is their 2.5th and 97.5th percentiles.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Mapping, Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 1000


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


def paired_bootstrap(
    first: Sequence[Mapping[str, float]],
    second: Sequence[Mapping[str, float]],
    metrics: Callable[[Mapping[str, float], int], Dict[str, float]],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> Dict[str, Dict[str, float]]:
    """Per metric: the observed difference (second - first), its 95% bootstrap interval and p-value.

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
            result[name] = {"difference": value, "ci95": [float("nan"), float("nan")], "p": float("nan")}
            continue
        p = min(1.0, 2 * min(float(np.mean(d <= 0)), float(np.mean(d >= 0))))
        result[name] = {"difference": float(value), "ci95": [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))],
                        "p": p}
    return result
