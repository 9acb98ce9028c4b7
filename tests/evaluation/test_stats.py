"""The evaluation's statistics against values computed by hand."""

import numpy as np
import pytest

from common.tracking import moving_average
from evaluation.stats import (
    RESAMPLES,
    SEED,
    bootstrap_ci,
    paired_difference_ci,
    scan_of,
    suite_mean,
    wilson,
)


def cases(values, prefix: str = "s") -> dict[str, float]:
    """One target per scan: ``{"s0/t": v0, "s1/t": v1, ...}``."""
    return {f"{prefix}{i}/t": float(v) for i, v in enumerate(values)}


def test_scan_of_is_the_part_before_the_last_slash():
    assert scan_of("ctorg_0003/left_kidney") == "ctorg_0003"
    assert scan_of("case_00012") == "case_00012"
    # M3D-Seg ids lead with the subset: the scan is subset and case, not the whole subset.
    assert scan_of("0004/case_00000/kidney") == "0004/case_00000"
    assert scan_of("0004/case_00000/kidney") != scan_of("0004/case_00001/kidney")


def test_suite_mean_weighs_every_suite_the_same():
    # suite a: mean 0.5 over 2 cases, suite b: 0.9 over 4 -> (0.5 + 0.9) / 2, not the case mean
    scores = {"a": cases([0.2, 0.8]), "b": cases([0.9] * 4)}
    assert suite_mean(scores) == pytest.approx(0.7)
    assert suite_mean({"a": [0.2, 0.8], "b": [0.9] * 4}) == pytest.approx(0.7)  # lists too
    with pytest.raises(ValueError, match="at least one case"):
        suite_mean({"a": {}})


def test_bootstrap_ci_brackets_the_mean_and_collapses_on_constant_scores():
    est, low, high = bootstrap_ci({"a": cases([0.4] * 5), "b": cases([0.6] * 3)})
    assert (est, low, high) == pytest.approx((0.5, 0.5, 0.5))
    rng = np.random.default_rng(1)
    scores = {"a": cases(rng.random(40)), "b": cases(rng.random(30))}
    est, low, high = bootstrap_ci(scores)
    assert low < est < high
    # the half-width of a mean of ~35 uniform scores per suite, averaged over two suites:
    # sd(U) / sqrt(n) / sqrt(2) * 1.96 = 0.2887 / 5.9 / 1.414 * 1.96 ~ 0.068
    assert 0.04 < (high - low) / 2 < 0.1
    assert bootstrap_ci(scores) == (est, low, high)  # seeded: reproducible


def test_duplicating_every_target_of_a_scan_leaves_the_ci_unchanged():
    rng = np.random.default_rng(2)
    scores = {
        "a": {f"scan{i}/t{j}": float(rng.random()) for i in range(9) for j in range(1 + i % 3)},
        "b": {f"scan{i}/t0": float(rng.random()) for i in range(20, 27)},
    }
    for k in (2, 5):
        copied = {
            suite: {f"{cid}#{c}": v for cid, v in targets.items() for c in range(k)}
            for suite, targets in scores.items()
        }
        assert bootstrap_ci(copied) == pytest.approx(bootstrap_ci(scores), abs=1e-12)
    # a bootstrap over rows would take the k copies for k independent targets and shrink
    rows = {
        suite: {f"{cid}#{c}".replace("/", "-"): v for cid, v in targets.items() for c in range(5)}
        for suite, targets in scores.items()
    }
    _, low, high = bootstrap_ci(scores)
    _, row_low, row_high = bootstrap_ci(rows)
    assert row_high - row_low < 0.6 * (high - low)


def test_identical_targets_of_a_scan_give_the_scan_level_bootstrap_by_hand():
    # Three targets per scan, all with the scan's value: the cluster bootstrap must be the plain
    # bootstrap of one value per scan, drawn with the same generator.
    scan_values = {"a": [0.1, 0.9, 0.4, 0.7, 0.3], "b": [0.2, 0.6, 0.8]}
    scores = {
        suite: {f"{suite}{i}/t{j}": v for i, v in enumerate(values) for j in range(3)}
        for suite, values in scan_values.items()
    }
    rng = np.random.default_rng(SEED)
    per_suite = []
    for values in scan_values.values():
        v = np.asarray(values)
        per_suite.append(v[rng.integers(0, len(v), size=(RESAMPLES, len(v)))].mean(axis=1))
    low, high = np.quantile(np.mean(per_suite, axis=0), [0.025, 0.975])
    expected = (float(np.mean([np.mean(v) for v in scan_values.values()])), low, high)
    assert bootstrap_ci(scores) == pytest.approx(expected, abs=1e-12)


def test_paired_difference_keeps_the_pairing():
    before = {"a": {"s1/c1": 0.1, "s1/c2": 0.5, "s2/c3": 0.9}, "b": {"s3/c4": 0.3}}
    after = {"a": {"s1/c1": 0.2, "s1/c2": 0.6, "s2/c3": 1.0, "s9/extra": 0.0}, "b": {"s3/c4": 0.5}}
    est, low, high, n = paired_difference_ci(before, after)
    # suite a: every case +0.1; suite b: +0.2 -> mean of suite means 0.15, no spread at all
    assert n == 4
    assert (est, low, high) == pytest.approx((0.15, 0.15, 0.15))
    with pytest.raises(ValueError, match="no case"):
        paired_difference_ci({"a": {"x": 1.0}}, {"a": {"y": 1.0}})


def test_paired_difference_resamples_scans():
    # Scan s1's two targets gain 0.4 each, scan s2's two lose 0.4: the mean is 0 and one draw of
    # s1 twice gives +0.4. A row bootstrap would also draw mixes such as +0.4, +0.4, +0.4, -0.4;
    # the scan bootstrap only ever sees the means of whole scans: -0.4, 0 or +0.4.
    before = {"a": {"s1/x": 0.5, "s1/y": 0.5, "s2/x": 0.5, "s2/y": 0.5}}
    after = {"a": {"s1/x": 0.9, "s1/y": 0.9, "s2/x": 0.1, "s2/y": 0.1}}
    est, low, high, n = paired_difference_ci(before, after)
    assert n == 4 and est == pytest.approx(0.0)
    assert (low, high) == pytest.approx((-0.4, 0.4))


def test_moving_average_is_trailing():
    assert moving_average([1, 2, 3, 4, 5], 3).tolist() == pytest.approx([1, 1.5, 2, 3, 4])
    with pytest.raises(ValueError, match="window"):
        moving_average([1.0], 0)


def test_wilson_interval_by_hand():
    # 5 of 10: centre (0.5 + 1.96^2/20) / (1 + 1.96^2/10) = 0.5; half-width 0.2634
    low, high = wilson(5, 10)
    assert (low, high) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    low, high = wilson(10, 10)
    assert high == 1.0 and low == pytest.approx(0.7225, abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)


def test_spearman_by_hand():
    from evaluation.stats import spearman

    # no ties: 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 2 / 60
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    # a tie shares its mean rank: ranks (1.5, 1.5, 3, 4) against (1, 2, 3, 4) give
    # 4.5 / sqrt(4.5 * 5) = sqrt(0.9)
    assert spearman([0.2, 0.2, 0.5, 0.9], [10, 20, 30, 40]) == pytest.approx(0.9**0.5)
    assert spearman([4, 3, 2, 1], [1, 2, 3, 4]) == pytest.approx(-1.0)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))  # constant: nothing to rank
    assert np.isnan(spearman([1], [2]))


def test_spearman_ci_resamples_scans_and_ignores_duplicated_targets():
    from evaluation.stats import spearman_ci

    rng = np.random.default_rng(3)
    x = rng.random(12)
    y = x + 0.3 * rng.random(12)
    one = {"a": {f"s{i}/t": (x[i], y[i]) for i in range(6)}}
    one["b"] = {f"r{i}/t": (x[i], y[i]) for i in range(6, 12)}
    rho, low, high, n_cases, n_scans = spearman_ci(one)
    assert (n_cases, n_scans) == (12, 12)
    assert low <= rho <= high and low > 0
    # three identical targets per scan: the same scans are drawn, every resample's ranks are
    # an affine map of the one-target ranks, so rho and its CI are unchanged
    triple = {
        suite: {f"{cid.split('/')[0]}/t{k}": xy for cid, xy in cases.items() for k in range(3)}
        for suite, cases in one.items()
    }
    rho3, low3, high3, n3, scans3 = spearman_ci(triple)
    assert (n3, scans3) == (36, 12)
    assert (rho3, low3, high3) == pytest.approx((rho, low, high), abs=1e-12)
    # rows treated as scans (every target its own scan) give a narrower, different interval
    rows = {s: {cid.replace("/", "-"): xy for cid, xy in c.items()} for s, c in triple.items()}
    _, low_r, high_r, _, scans_r = spearman_ci(rows)
    assert scans_r == 36 and high_r - low_r < high3 - low3


def test_spearman_ci_of_a_constant_side_is_undefined():
    from evaluation.stats import spearman_ci

    rho, low, high, n, scans = spearman_ci({"a": {"s0/t": (1.0, 0.2), "s1/t": (1.0, 0.5)}})
    assert np.isnan(rho) and np.isnan(low) and np.isnan(high) and (n, scans) == (2, 2)
