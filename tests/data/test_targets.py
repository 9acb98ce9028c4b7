"""Evidence targets: per-slice areas, Top-K key-slice sampling and component boxes, by hand."""

import numpy as np
import pytest

from data.answer import EvidenceAnchor
from data.records import PreparedVolume
from data.targets import (
    EmptyTargetError,
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
