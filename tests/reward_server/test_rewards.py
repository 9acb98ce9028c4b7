"""The reward terms on hand-computed cases, and their edge cases."""

import numpy as np
import pytest

from reward_server.rewards import (
    axial_reward,
    box_iou,
    consistency_reward,
    dice,
    match_boxes,
    spatial_reward,
    total_reward,
    window,
)


def test_axial_is_area_on_key_slice_over_peak_area():
    areas = np.array([0, 10, 40, 20])
    assert axial_reward(areas, 3) == 1.0
    assert axial_reward(areas, 4) == 0.5
    assert axial_reward(areas, 1) == 0.0
    assert axial_reward(np.zeros(4), 2) == 0.0  # empty target


def test_box_iou_by_hand():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (10, 10, 20, 20)) == 0.0


def test_two_true_boxes_one_prediction_with_iou_half_gives_a_quarter():
    true = ((0, 0, 10, 10), (50, 50, 60, 60))
    predicted = ((0, 0, 10, 20),)  # IoU with the first: 100 / 200 = 0.5
    assert spatial_reward(predicted, true) == pytest.approx(0.25)


def test_hungarian_matching_picks_the_best_assignment_not_the_greedy_one():
    true = ((0, 0, 10, 10), (6, 0, 16, 10))
    predicted = ((3, 0, 13, 10), (0, 0, 10, 10))
    # Greedy would give predicted[0] to true[0] (IoU 7/13) and leave predicted[1] with IoU 4/16;
    # the optimal assignment is p0 -> t1 (7/13) and p1 -> t0 (1.0).
    pairs = sorted(match_boxes(predicted, true))
    assert [(p, t) for p, t, _ in pairs] == [(0, 1), (1, 0)]
    assert spatial_reward(predicted, true) == pytest.approx((7 / 13 + 1.0) / 2)


def test_spatial_edge_cases():
    assert spatial_reward((), ((0, 0, 5, 5),)) == 0.0  # no predicted boxes
    assert spatial_reward(((0, 0, 5, 5),), ()) == 0.0  # target not visible on the key slice
    assert spatial_reward((), ()) == 0.0
    # an extra wrong box halves a perfect match
    assert spatial_reward(((0, 0, 5, 5), (100, 100, 110, 110)), ((0, 0, 5, 5),)) == 0.5


def test_window_clips_at_the_volume_ends():
    assert window(10, 5, 64) == (4, 15)  # slices 5..15
    assert window(2, 5, 64) == (0, 7)  # slices 1..7
    assert window(63, 5, 64) == (57, 64)  # slices 58..64
    assert window(5, 0, 64) == (4, 5)


def test_dice_by_hand():
    a = np.zeros((2, 4, 4), bool)
    b = np.zeros((2, 4, 4), bool)
    a[0, :2, :2] = True  # 4 voxels
    b[0, :2, :] = True  # 8 voxels, 4 shared
    assert dice(a, b) == pytest.approx(2 * 4 / 12)
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 0.0


def test_consistency_counts_only_the_window():
    true = np.zeros((20, 8, 8), bool)
    true[8:12, 2:6, 2:6] = True  # slices 9..12
    pred = true.copy()
    pred[0] = True  # outside the window of k=10, delta=2 (slices 8..12): ignored
    assert consistency_reward(pred, true, 10, 2) == 1.0
    half = true.copy()
    half[8:12, 2:6, 4:6] = False  # half the target in every window slice
    assert consistency_reward(half, true, 10, 2) == pytest.approx(2 * 32 / (32 + 64))
    assert consistency_reward(pred, true, 2, 2) == 0.0  # empty true window


def test_total_is_the_weighted_sum():
    assert total_reward(1.0, 0.5, 0.25, 0.8, (1, 1, 1, 1)) == pytest.approx(2.55)
    assert total_reward(1.0, 0.5, 0.25, 0.8, (0.5, 2, 0, 1)) == pytest.approx(0.5 + 1 + 0 + 0.8)


def test_a_relative1000_answer_scores_as_the_same_anchor_in_pixels(dataset, true_anchor):
    from common.config import RewardConfig
    from data.answer import EvidenceAnchor, format_answer
    from reward_server.scorer import RewardScorer

    _, prepared = dataset.by_id("ctorg_0000/liver")  # 32 slices of 128 px
    anchor = true_anchor(prepared)
    # one more hand-checked box on the 128 px slice: 10 -> 78.125 -> 78, 20 -> 156.25 -> 156,
    # 40 -> 312.5 -> 313 (half up), 64 -> 500; and back: 78 * 0.128 = 9.984 -> 10, ...
    moved = EvidenceAnchor(anchor.key_slice, (*anchor.boxes, (10, 20, 40, 64)))
    for a in (anchor, moved):
        pixels = format_answer(a, "t", 128)
        relative = format_answer(a, "t", 128, "relative1000")
        assert relative != pixels
        by_pixels = RewardScorer(RewardConfig(propagator="baseline"))
        by_relative = RewardScorer(RewardConfig(propagator="baseline", box_coords="relative1000"))
        (want,) = by_pixels.score_group(prepared, [pixels])
        (got,) = by_relative.score_group(prepared, [relative])
        assert got == want and want.failure is None
    assert "[10, 20, 40, 64]" in format_answer(moved, "t", 128)
    assert "[78, 156, 313, 500]" in format_answer(moved, "t", 128, "relative1000")
    (full,) = by_relative.score_group(prepared, [format_answer(anchor, "t", 128, "relative1000")])
    assert full.format == 1.0 and full.spatial == pytest.approx(1.0) and full.total > 3.0
    # read in the wrong frame, the relative text is not the anchor
    (wrong,) = by_pixels.score_group(prepared, [format_answer(anchor, "t", 128, "relative1000")])
    assert wrong != full
