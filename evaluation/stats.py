"""Confidence intervals for the evaluation table and the training curves, as pure functions.

- Suite mean: the table's headline number is the mean over suites of each suite's mean per-case
  score (every suite weighs the same, as the paper reports per dataset). Its 95% CI is a
  percentile bootstrap that resamples cases *within* each suite (stratified), so a resample
  always holds every suite with its own number of cases.
- Paired difference: two checkpoints scored on the same cases; the per-case difference d_i =
  b_i - a_i is resampled the same stratified way, which keeps the pairing (a case's two scores
  move together) and so is far tighter than comparing two independent CIs.
- Share: the Wilson score interval of a share of hits among n trials (a binomial proportion).
- Slope: least-squares slope of a curve (reward per GRPO step) with a 95% CI from a bootstrap
  over the (step, value) points.
Bootstraps use a fixed seed: the same results give the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

RESAMPLES = 4000
SEED = 0


def suite_mean(scores: Mapping[str, Sequence[float]]) -> float:
    """Mean over suites of the mean score of each suite's cases."""
    if not scores or any(len(v) == 0 for v in scores.values()):
        raise ValueError("every suite needs at least one case")
    return float(np.mean([np.mean(v) for v in scores.values()]))


def _stratified_means(
    scores: Mapping[str, Sequence[float]], resamples: int, rng: np.random.Generator
) -> np.ndarray:
    """Suite mean of ``resamples`` stratified bootstrap resamples: shape (resamples,)."""
    per_suite = []
    for values in scores.values():
        values = np.asarray(values, dtype=np.float64)
        picks = rng.integers(0, len(values), size=(resamples, len(values)))
        per_suite.append(values[picks].mean(axis=1))
    return np.mean(per_suite, axis=0)


def bootstrap_ci(
    scores: Mapping[str, Sequence[float]],
    level: float = 0.95,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> tuple[float, float, float]:
    """(suite mean, CI low, CI high) of per-case ``scores`` grouped by suite."""
    estimate = suite_mean(scores)
    means = _stratified_means(scores, resamples, np.random.default_rng(seed))
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return estimate, float(low), float(high)


def paired_difference_ci(
    before: Mapping[str, Mapping[str, float]],
    after: Mapping[str, Mapping[str, float]],
    level: float = 0.95,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> tuple[float, float, float, int]:
    """(mean difference, CI low, CI high, cases) of ``after - before``, per suite
    ``{suite: {case id: score}}``; only cases scored in both count."""
    diffs: dict[str, list[float]] = {}
    for suite, cases in before.items():
        shared = sorted(set(cases) & set(after.get(suite, {})))
        if shared:
            diffs[suite] = [after[suite][c] - cases[c] for c in shared]
    if not diffs:
        raise ValueError("no case was scored by both checkpoints")
    estimate, low, high = bootstrap_ci(diffs, level, resamples, seed)
    return estimate, low, high, sum(len(v) for v in diffs.values())


def slope(steps: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of ``values`` over ``steps``."""
    x = np.asarray(steps, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    if len(x) < 2 or np.ptp(x) == 0:
        raise ValueError("a slope needs at least two distinct steps")
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())


def slope_ci(
    steps: Sequence[float],
    values: Sequence[float],
    level: float = 0.95,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> tuple[float, float, float]:
    """(slope, CI low, CI high): bootstrap over the (step, value) points."""
    x = np.asarray(steps, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    estimate = slope(x, y)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(x), size=(resamples, len(x)))
    xs, ys = x[picks], y[picks]
    xc = xs - xs.mean(axis=1, keepdims=True)
    denom = (xc * xc).sum(axis=1)
    ok = denom > 0  # a resample of one repeated step has no slope
    slopes = (xc * (ys - ys.mean(axis=1, keepdims=True))).sum(axis=1)[ok] / denom[ok]
    tail = (1 - level) / 2
    low, high = np.quantile(slopes, [tail, 1 - tail])
    return estimate, float(low), float(high)


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean over up to ``window`` points (shorter at the start): same length as input."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    v = np.asarray(values, dtype=np.float64)
    sums = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(0, idx - window)
    return (sums[idx] - sums[lo]) / (idx - lo)


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a share hits / n (0 to 1 when n is 0)."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
