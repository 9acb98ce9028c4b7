"""Confidence intervals for the evaluation table and the training curves, as pure functions.

- The unit that is resampled is the scan, not the row. An evaluation row is one target of one
  scan (a CT-ORG scan has up to six); targets of one scan share its anatomy, contrast and noise,
  so their scores move together. Treating them as independent draws makes intervals too narrow.
  A case id is ``<scan>/<target>``: its part before the last ``/`` names its scan
  (``ctorg_0003/liver`` -> ``ctorg_0003``; M3D-Seg's ``0004/case_00000/kidney`` ->
  ``0004/case_00000``); an id without ``/`` is a scan of its own.
- Suite mean: the table's headline number is the mean over suites of each suite's mean per-target
  score (every suite weighs the same, as the paper reports per dataset). Its 95% CI is a
  percentile cluster bootstrap: within each suite (stratified), draw as many scans as the suite
  has, with replacement, keep every target of a drawn scan, and take the mean over the targets
  drawn. Duplicating targets of a scan changes nothing; a scan with one target is a row.
- Paired difference: two checkpoints scored on the same targets; the per-target difference
  d_i = b_i - a_i is resampled the same way, which keeps the pairing (a target's two scores move
  together) and so is far tighter than comparing two independent CIs.
- Share: the Wilson score interval of a share of hits among n trials (a binomial proportion).
Bootstraps use a fixed seed: the same results give the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

RESAMPLES = 4000
SEED = 0


def scan_of(case_id: str) -> str:
    """The scan a case id belongs to: its part before the last ``/`` (the whole id without)."""
    return case_id.rsplit("/", 1)[0]


def suite_mean(scores: Mapping[str, Mapping[str, float] | Sequence[float]]) -> float:
    """Mean over suites of the mean score of each suite's targets, ``{suite: {case id: score}}``
    (or ``{suite: [score, ...]}``: no interval is drawn, so no scan is needed)."""
    if not scores or any(len(v) == 0 for v in scores.values()):
        raise ValueError("every suite needs at least one case")
    return float(
        np.mean(
            [np.mean(list(v.values() if isinstance(v, Mapping) else v)) for v in scores.values()]
        )
    )


def _scan_totals(cases: Mapping[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """Per scan: the sum of its targets' scores and how many targets it has."""
    index: dict[str, int] = {}
    sums: list[float] = []
    counts: list[int] = []
    for case_id, value in cases.items():
        i = index.setdefault(scan_of(case_id), len(sums))
        if i == len(sums):
            sums.append(0.0)
            counts.append(0)
        sums[i] += float(value)
        counts[i] += 1
    return np.asarray(sums), np.asarray(counts, dtype=np.float64)


def _cluster_means(
    scores: Mapping[str, Mapping[str, float]], resamples: int, rng: np.random.Generator
) -> np.ndarray:
    """Suite mean of ``resamples`` scan-level bootstrap resamples, stratified by suite:
    shape (resamples,)."""
    per_suite = []
    for cases in scores.values():
        sums, counts = _scan_totals(cases)
        picks = rng.integers(0, len(sums), size=(resamples, len(sums)))
        per_suite.append(sums[picks].sum(axis=1) / counts[picks].sum(axis=1))
    return np.mean(per_suite, axis=0)


def bootstrap_ci(
    scores: Mapping[str, Mapping[str, float]],
    level: float = 0.95,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> tuple[float, float, float]:
    """(suite mean, CI low, CI high) of per-target ``scores``, ``{suite: {case id: score}}``,
    resampling scans within each suite."""
    estimate = suite_mean(scores)
    means = _cluster_means(scores, resamples, np.random.default_rng(seed))
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
    ``{suite: {case id: score}}``; only cases scored in both count; scans are resampled."""
    diffs: dict[str, dict[str, float]] = {}
    for suite, cases in before.items():
        shared = sorted(set(cases) & set(after.get(suite, {})))
        if shared:
            diffs[suite] = {c: after[suite][c] - cases[c] for c in shared}
    if not diffs:
        raise ValueError("no case was scored by both checkpoints")
    estimate, low, high = bootstrap_ci(diffs, level, resamples, seed)
    return estimate, low, high, sum(len(v) for v in diffs.values())


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a share hits / n (0 to 1 when n is 0)."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's r of the ranks, tied values sharing their mean
    rank. NaN when either side is constant (no ranking to correlate) or has under two values."""
    from scipy.stats import rankdata

    if len(x) != len(y):
        raise ValueError(f"spearman of {len(x)} and {len(y)} values")
    if len(x) < 2:
        return math.nan
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    norm = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / norm) if norm > 0 else math.nan


def spearman_ci(
    pairs: Mapping[str, Mapping[str, tuple[float, float]]],
    level: float = 0.95,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> tuple[float, float, float, int, int]:
    """(rho, CI low, CI high, cases, scans) of Spearman's rho between the two numbers of each
    case, ``{suite: {case id: (x, y)}}``, pooled over suites. The CI is a percentile bootstrap
    that resamples scans within each suite and keeps every target of a drawn scan (as
    :func:`bootstrap_ci`); resamples where one side is constant are left out. NaN bounds when
    rho itself is undefined."""
    scans: list[list[tuple[float, float]]] = []
    strata: list[list[int]] = []
    for cases in pairs.values():
        index: dict[str, int] = {}
        for case_id, xy in cases.items():
            key = scan_of(case_id)
            if key not in index:
                index[key] = len(scans)
                scans.append([])
            scans[index[key]].append((float(xy[0]), float(xy[1])))
        strata.append(sorted(set(index.values())))
    every = [xy for scan in scans for xy in scan]
    if not every:
        raise ValueError("no case to correlate")
    rho = spearman([a for a, _ in every], [b for _, b in every])
    if math.isnan(rho):
        return rho, math.nan, math.nan, len(every), len(scans)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        drawn = [xy for s in strata for i in rng.choice(s, size=len(s)) for xy in scans[i]]
        draws.append(spearman([a for a, _ in drawn], [b for _, b in drawn]))
    tail = (1 - level) / 2
    low, high = np.nanquantile(np.asarray(draws), [tail, 1 - tail])
    return rho, float(low), float(high), len(every), len(scans)
