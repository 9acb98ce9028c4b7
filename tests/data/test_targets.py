"""Evidence targets: per-slice areas, Top-K key-slice sampling and component boxes, by hand."""

import numpy as np
import pytest

from data.answer import EvidenceAnchor
from data.records import PreparedVolume
from data.targets import (
    EmptyTargetError,
    anchor_slices,
    boxes_on_slice,
    evidence_target,
    sample_key_slice,
    slice_areas,
)


def test_slice_areas_counts_foreground_per_slice():
    mask = np.zeros((3, 4, 4), bool)
    mask[0, :2, :2] = True
    mask[2] = True
    assert slice_areas(mask).tolist() == [4, 0, 16]


def test_top_k_draws_only_from_the_k_largest_slices():
    areas = np.array([0, 5, 9, 9, 1, 7])  # largest: slice 3 and 4 (9), then 6 (7), then 2 (5)
    rng = np.random.default_rng(0)
    drawn = {sample_key_slice(areas, 3, rng) for _ in range(200)}
    assert drawn == {3, 4, 6}
    assert {sample_key_slice(areas, 1, rng) for _ in range(50)} == {3}  # tie keeps the lower slice


def test_top_k_larger_than_visible_slices_uses_only_visible_ones():
    areas = np.array([0, 2, 0, 3])
    rng = np.random.default_rng(1)
    assert {sample_key_slice(areas, 10, rng) for _ in range(100)} == {2, 4}


def test_top_k_is_seeded():
    areas = np.arange(20)
    a = [sample_key_slice(areas, 5, np.random.default_rng(7)) for _ in range(3)]
    b = [sample_key_slice(areas, 5, np.random.default_rng(7)) for _ in range(3)]
    assert a == b and set(a) <= {16, 17, 18, 19, 20}


def test_two_components_give_two_boxes_in_pixel_edge_coordinates():
    mask = np.zeros((10, 12), bool)
    mask[1:3, 2:5] = True  # rows 1-2, columns 2-4
    mask[6:9, 8:11] = True  # rows 6-8, columns 8-10
    assert boxes_on_slice(mask) == ((2, 1, 5, 3), (8, 6, 11, 9))


def test_diagonal_pixels_are_one_component_and_small_ones_can_be_dropped():
    mask = np.zeros((6, 6), bool)
    mask[1, 1] = mask[2, 2] = True
    mask[4, 4] = True
    assert boxes_on_slice(mask) == ((1, 1, 3, 3), (4, 4, 5, 5))
    assert boxes_on_slice(mask, min_area=2) == ((1, 1, 3, 3),)


def prepared_with(mask: np.ndarray) -> PreparedVolume:
    return PreparedVolume(
        "case/x",
        np.zeros(mask.shape, np.uint8),
        mask,
        np.arange(mask.shape[0]),
        mask.shape,
        np.eye(4),
    )


def test_evidence_target_uses_the_key_slice_components():
    mask = np.zeros((4, 8, 8), bool)
    mask[2, 1:3, 1:3] = True
    mask[2, 5:7, 4:8] = True
    mask[1, 0, 0] = True
    anchor = evidence_target(prepared_with(mask), top_k=1, rng=np.random.default_rng(0))
    assert anchor == EvidenceAnchor(3, ((1, 1, 3, 3), (4, 5, 8, 7)))


def test_empty_target_is_a_clear_error_naming_the_sample():
    with pytest.raises(EmptyTargetError, match="case/x"):
        evidence_target(prepared_with(np.zeros((4, 8, 8), bool)), 5, np.random.default_rng(0))


def test_anchor_slices_are_those_with_a_component_the_reward_sees():
    mask = np.zeros((4, 8, 8), bool)
    mask[0, 0, 0:3] = True  # one 3 px component: under the 4 px minimum
    mask[1, 0, 0:3] = mask[1, 2, 0:3] = mask[1, 4, 0:3] = True  # three 3 px components (9 px)
    mask[2, 5:7, 5:7] = True  # one 4 px component
    assert anchor_slices(prepared_with(mask), 4).tolist() == [3]
    assert anchor_slices(prepared_with(mask), 1).tolist() == [1, 2, 3]


def test_a_slice_of_only_tiny_components_is_never_the_key_slice():
    mask = np.zeros((4, 8, 8), bool)
    mask[1, 0, 0:3] = mask[1, 2, 0:3] = mask[1, 4, 0:3] = True  # largest F_t (9 px), all tiny
    mask[2, 5:7, 5:7] = True  # 4 px: the only slice the reward has a true box on
    mask[2, 0, 0:2] = True  # plus a 2 px speck the reward drops
    mask[3, 7, 7] = True
    prepared = prepared_with(mask)
    anchors = {
        evidence_target(prepared, top_k=3, rng=np.random.default_rng(seed), min_area=4)
        for seed in range(50)
    }
    assert {a.key_slice for a in anchors} == {3}
    (anchor,) = anchors
    assert anchor.boxes == boxes_on_slice(mask[2], 4) == ((5, 5, 7, 7),)  # what Rs matches


def test_top_k_ranks_by_area_among_the_anchor_slices():
    mask = np.zeros((5, 12, 12), bool)
    mask[0, 0:2, 0:2] = True  # 4 px
    mask[1, 0:3, 0:3] = True  # 9 px
    mask[2, 0:4, 0:4] = True  # 16 px
    for col in range(0, 12, 2):  # 36 px in 3 px pieces: largest F_t, yet no anchor
        mask[3, 0:3, col] = True
        mask[3, 6:9, col] = True
    drawn = {
        evidence_target(prepared_with(mask), 2, np.random.default_rng(s), 4).key_slice
        for s in range(60)
    }
    assert drawn == {2, 3}


def test_a_target_of_only_tiny_components_is_an_error_naming_the_sample():
    mask = np.zeros((4, 8, 8), bool)
    mask[1, 0, 0:3] = True
    mask[2, 4, 4] = mask[2, 5, 5] = True  # 8-connected: one 2 px component
    prepared = prepared_with(mask)
    assert anchor_slices(prepared, 4).size == 0
    with pytest.raises(EmptyTargetError, match=r"sample case/x: no component of at least 4"):
        evidence_target(prepared, 5, np.random.default_rng(0), min_area=4)
    assert evidence_target(prepared, 5, np.random.default_rng(0), min_area=2).key_slice in (2, 3)
