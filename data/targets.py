"""Evidence targets from a mask: per-slice area F_t, Top-K key slice, component boxes.

One rule for small components, shared with the spatial reward Rs: a component under
``min_area`` pixels gives no box (the reward drops it from the true boxes too), and a slice with
no component of at least ``min_area`` pixels is never an SFT key slice, so every SFT anchor has
boxes the reward can match. Ranking still uses the raw areas F_t, as Ra does.
"""

from __future__ import annotations

import numpy as np
from skimage.measure import label as connected_components
from skimage.measure import regionprops

from common.config import MIN_BOX_AREA
from data.answer import Box, EvidenceAnchor
from data.records import PreparedVolume


class EmptyTargetError(ValueError):
    """No sampled slice can anchor the target (none holds a component of at least the minimum
    box area); names the sample."""


def slice_areas(mask: np.ndarray) -> np.ndarray:
    """F_t for t = 1..S: foreground pixel count of an (S, H, W) mask on each slice, shape (S,)."""
    mask = np.asarray(mask)
    return mask.reshape(mask.shape[0], -1).astype(bool).sum(axis=1).astype(np.int64)


def sample_key_slice(areas: np.ndarray, top_k: int, rng: np.random.Generator) -> int:
    """Draw the key slice k (1-based) uniformly from the Top-K slices by area F_t.

    Only slices with F_t > 0 are candidates, so K larger than the number of visible slices
    means "any visible slice". Ties in area keep the lower slice first (stable sort).
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    areas = np.asarray(areas)
    visible = int((areas > 0).sum())
    if visible == 0:
        raise EmptyTargetError("target has no foreground on any slice")
    order = np.argsort(-areas, kind="stable")[: min(top_k, visible)]
    return int(rng.choice(order)) + 1


def boxes_on_slice(mask2d: np.ndarray, min_area: int = 1) -> tuple[Box, ...]:
    """One box [x1, y1, x2, y2] per 8-connected component of a 2D mask (pixel-edge coordinates:
    x2 = last column + 1), sorted by (x1, y1). Components under ``min_area`` pixels are dropped.
    """
    components = connected_components(np.asarray(mask2d).astype(bool), connectivity=2)
    boxes = [
        (int(r.bbox[1]), int(r.bbox[0]), int(r.bbox[3]), int(r.bbox[2]))
        for r in regionprops(components)
        if r.area >= min_area
    ]
    return tuple(sorted(boxes))


def anchor_slices(prepared: PreparedVolume, min_area: int = MIN_BOX_AREA) -> np.ndarray:
    """The slices k (1-based, ascending) that can be a key slice: those holding at least one
    connected component of ``min_area`` pixels or more. Empty means the sample has no usable
    evidence anchor (SFT and GRPO skip it)."""
    areas = prepared.areas
    # A slice with fewer foreground pixels than min_area cannot hold a big enough component,
    # so components are labelled only on the few slices that might.
    candidates = np.flatnonzero(areas >= min_area)
    keep = [int(t) + 1 for t in candidates if boxes_on_slice(prepared.mask[t], min_area)]
    return np.asarray(keep, dtype=np.int64)


def evidence_target(
    prepared: PreparedVolume,
    top_k: int,
    rng: np.random.Generator,
    min_area: int = MIN_BOX_AREA,
) -> EvidenceAnchor:
    """The SFT target anchor: a key slice drawn from the Top-K by area F_t among the
    :func:`anchor_slices`, and the boxes of its components of at least ``min_area`` pixels
    (exactly the true boxes the spatial reward sees with ``data.min_box_area = min_area``).

    Raises :class:`EmptyTargetError` naming the sample when no slice can anchor the target.
    """
    areas = prepared.areas
    usable = anchor_slices(prepared, min_area)
    if usable.size == 0:
        raise EmptyTargetError(
            f"sample {prepared.sample_id}: no component of at least {min_area} pixels on any of "
            f"the {prepared.num_slices} sampled slices (largest slice area {int(areas.max())} "
            "px); no evidence anchor can be built"
        )
    ranked = np.zeros_like(areas)  # slices that cannot anchor drop out of the Top-K
    ranked[usable - 1] = areas[usable - 1]
    key_slice = sample_key_slice(ranked, top_k, rng)
    boxes = boxes_on_slice(prepared.mask[key_slice - 1], min_area=min_area)
    return EvidenceAnchor(key_slice=key_slice, boxes=boxes)
