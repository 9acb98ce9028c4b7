"""The evaluation's statistics against values computed by hand."""

import numpy as np
import pytest

from evaluation.stats import (
    bootstrap_ci,
    moving_average,
    paired_difference_ci,
    slope,
    slope_ci,
    suite_mean,
    wilson,
)


def test_suite_mean_weighs_every_suite_the_same():
    # suite a: mean 0.5 over 2 cases, suite b: 0.9 over 4 -> (0.5 + 0.9) / 2, not the case mean
    scores = {"a": [0.2, 0.8], "b": [0.9, 0.9, 0.9, 0.9]}
    assert suite_mean(scores) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="at least one case"):
        suite_mean({"a": []})


def test_bootstrap_ci_brackets_the_mean_and_collapses_on_constant_scores():
    est, low, high = bootstrap_ci({"a": [0.4] * 5, "b": [0.6] * 3})
    assert (est, low, high) == pytest.approx((0.5, 0.5, 0.5))
    rng = np.random.default_rng(1)
    scores = {"a": rng.random(40).tolist(), "b": rng.random(30).tolist()}
    est, low, high = bootstrap_ci(scores)
    assert low < est < high
    # the half-width of a mean of ~35 uniform scores per suite, averaged over two suites:
    # sd(U) / sqrt(n) / sqrt(2) * 1.96 = 0.2887 / 5.9 / 1.414 * 1.96 ~ 0.068
    assert 0.04 < (high - low) / 2 < 0.1
    assert bootstrap_ci(scores) == (est, low, high)  # seeded: reproducible


def test_paired_difference_keeps_the_pairing():
    before = {"a": {"c1": 0.1, "c2": 0.5, "c3": 0.9}, "b": {"c4": 0.3}}
    after = {"a": {"c1": 0.2, "c2": 0.6, "c3": 1.0, "extra": 0.0}, "b": {"c4": 0.5}}
    est, low, high, n = paired_difference_ci(before, after)
    # suite a: every case +0.1; suite b: +0.2 -> mean of suite means 0.15, no spread at all
    assert n == 4
    assert (est, low, high) == pytest.approx((0.15, 0.15, 0.15))
    with pytest.raises(ValueError, match="no case"):
        paired_difference_ci({"a": {"x": 1.0}}, {"a": {"y": 1.0}})


def test_slope_by_hand_and_its_ci():
    assert slope([1, 2, 3, 4], [1.0, 3.0, 5.0, 7.0]) == pytest.approx(2.0)
    # x centred: -1.5 -0.5 0.5 1.5; y centred: -1 1 -1 1 -> sum xy = 1.5 - 0.5 - 0.5 + 1.5 = 2; / 5
    assert slope([1, 2, 3, 4], [0.0, 2.0, 0.0, 2.0]) == pytest.approx(0.4)
    est, low, high = slope_ci(range(10), [2.0 * s + 1 for s in range(10)])
    assert (est, low, high) == pytest.approx((2.0, 2.0, 2.0))
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 1, 200)
    est, low, high = slope_ci(range(200), noise)  # no trend: the CI holds 0
    assert low < 0 < high
    est, low, high = slope_ci(range(200), 0.02 * np.arange(200) + noise)
    assert low > 0
    with pytest.raises(ValueError, match="two distinct steps"):
        slope([3, 3], [1.0, 2.0])


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
