"""Evidence targets from a mask: per-slice area F_t, Top-K key slice, component boxes."""

from __future__ import annotations

import numpy as np
from skimage.measure import label as connected_components
from skimage.measure import regionprops

from data.answer import Box, EvidenceAnchor
from data.records import PreparedVolume


class EmptyTargetError(ValueError):
    """The target has no foreground voxels on the sampled slices; names the sample."""


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


def evidence_target(
    prepared: PreparedVolume, top_k: int, rng: np.random.Generator, min_area: int = 1
) -> EvidenceAnchor:
    """The SFT target anchor: a Top-K key slice and the boxes of the mask's components on it."""
    try:
        key_slice = sample_key_slice(prepared.areas, top_k, rng)
    except EmptyTargetError:
        raise EmptyTargetError(
            f"sample {prepared.sample_id}: target is empty on all {prepared.num_slices} sampled "
            "slices; no evidence anchor can be built"
        ) from None
    boxes = boxes_on_slice(prepared.mask[key_slice - 1], min_area=min_area)
    if not boxes:  # every component on the key slice is under min_area: keep them all
        boxes = boxes_on_slice(prepared.mask[key_slice - 1])
    return EvidenceAnchor(key_slice=key_slice, boxes=boxes)
