"""Metrics of a predicted against a true 3D mask: voxel overlap (DSC, IoU) and surface distance
(NSD, HD95) in the unit of the spacing given.

Surface metrics are MONAI's (``monai.metrics.compute_surface_dice`` and
``compute_hausdorff_distance``, the implementations MONAI-based and MSD-style evaluations
report), given the voxel spacing so distances are in mm on anisotropic CT. A grid with no known
voxel size (an M3D-Seg array without a spacing) is given 1 per axis: distances and the NSD
tolerance are then in voxels (``data.volume.surface_spacing`` says which):

- A mask's surface is its boundary voxels: the voxels of the mask with a background neighbour
  (6-connectivity; the mask minus its erosion). Distances run between boundary voxel centres.
- NSD at tolerance tau: (|S_P within tau of S_G| + |S_G within tau of S_P|) / (|S_P| + |S_G|),
  counting boundary voxels (MONAI without sub-voxel surface elements).
- HD95: max of the two directed 95th percentiles (linear interpolation) of the boundary-voxel
  distances P -> G and G -> P.

Empty masks (MONAI leaves them undefined, NaN; a table needs a number), decided like DSC:
- both empty (a correct "nothing there"): DSC = IoU = NSD = 1, HD95 = 0;
- exactly one empty: DSC = IoU = NSD = 0, HD95 = the grid's diagonal (the largest distance two
  voxels of the volume can have: the worst finite value, so a mean stays a number and a missed
  target weighs like the worst possible miss).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.config import NSD_TOLERANCE_MM


def _pair(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, g = np.asarray(pred, bool), np.asarray(true, bool)
    if p.shape != g.shape:
        raise ValueError(f"mask shapes differ: {p.shape} vs {g.shape}")
    return p, g


def dsc(pred: np.ndarray, true: np.ndarray) -> float:
    """Dice similarity coefficient 2|P∩G| / (|P| + |G|); 1.0 when both masks are empty (a
    correct "nothing there"), 0.0 when exactly one is."""
    p, g = _pair(pred, true)
    denom = int(p.sum()) + int(g.sum())
    return 1.0 if denom == 0 else 2.0 * int((p & g).sum()) / denom


def iou(pred: np.ndarray, true: np.ndarray) -> float:
    """Intersection over union |P∩G| / |P∪G|; same empty-mask convention as :func:`dsc`."""
    p, g = _pair(pred, true)
    union = int((p | g).sum())
    return 1.0 if union == 0 else int((p & g).sum()) / union


def _spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    out = tuple(float(s) for s in spacing)
    if len(out) != ndim or not all(s > 0 for s in out):
        raise ValueError(f"spacing {tuple(spacing)} must be {ndim} positive numbers")
    return out


def _monai_pair(p: np.ndarray, g: np.ndarray):
    import torch

    # MONAI takes one-hot batches (B, C, *spatial); one channel, counted as foreground
    def batch(mask: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(mask[None, None].astype(np.float32))

    return batch(p), batch(g)


def diagonal(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """The largest distance between two voxel centres of a grid, in the unit of ``spacing``."""
    return float(np.linalg.norm([(n - 1) * s for n, s in zip(shape, spacing)]))


def nsd(
    pred: np.ndarray,
    true: np.ndarray,
    spacing: Sequence[float],
    tolerance: float = NSD_TOLERANCE_MM,
) -> float:
    """Normalised surface Dice at ``tolerance`` (see the module docstring), in the unit of
    ``spacing`` (per array axis: mm, or 1 for voxels); 1.0 when both masks are empty, 0.0 when
    exactly one is."""
    from monai.metrics import compute_surface_dice

    p, g = _pair(pred, true)
    spacing = _spacing(spacing, p.ndim)
    if tolerance < 0:
        raise ValueError(f"NSD tolerance must be >= 0, got {tolerance}")
    if not p.any() and not g.any():
        return 1.0
    if not p.any() or not g.any():
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # MONAI's own deprecated internal argument
        value = compute_surface_dice(
            *_monai_pair(p, g), [float(tolerance)], include_background=True, spacing=spacing
        )
    return float(value.item())


def hd95(pred: np.ndarray, true: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance in the unit of ``spacing`` (see the module
    docstring); 0.0 when both masks are empty, the grid's diagonal when exactly one is."""
    from monai.metrics import compute_hausdorff_distance

    p, g = _pair(pred, true)
    spacing = _spacing(spacing, p.ndim)
    if not p.any() and not g.any():
        return 0.0
    if not p.any() or not g.any():
        return diagonal(p.shape, spacing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        value = compute_hausdorff_distance(
            *_monai_pair(p, g), include_background=True, percentile=95, spacing=spacing
        )
    return float(value.item())


def mask_agreement(masks: Sequence[np.ndarray]) -> float:
    """The mean pairwise Dice 2|A∩B| / (|A| + |B|) over the N(N-1)/2 pairs of ``masks``; two
    empty masks agree (Dice 1, as evaluation.metrics.dsc), one empty and one not give 0. One
    mask (or none) agrees with itself: 1."""
    pairs = [dsc(a, b) for i, a in enumerate(masks) for b in masks[i + 1 :]]
    return float(np.mean(pairs)) if pairs else 1.0


def consensus_mask(masks: Sequence[np.ndarray]) -> np.ndarray:
    """The voxel majority of N masks: a voxel is in when more than half of them (count > N/2)
    hold it, so a tie of an even N is out."""
    if not len(masks):
        raise ValueError("consensus of no masks")
    count = np.zeros(np.shape(masks[0]), np.int32)
    for mask in masks:
        count += np.asarray(mask, bool)
    return 2 * count > len(masks)


@dataclass(frozen=True)
class Draw:
    """One sampled answer as a consensus records it: its text and anchor, or why it failed."""

    answer: str | None
    key_slice: int | None  # None: the answer did not parse (its mask is empty)
    boxes: tuple = ()
    failure: str | None = None


@dataclass(frozen=True)
class DrawConsensus:
    """N draws' voxel majority, their agreement, one record per draw and the representative:
    the index of the first well-formed draw with the highest Dice to the majority (None when
    none is well formed)."""

    mask: np.ndarray
    agreement: float
    anchors: list[dict]
    representative: int | None


def consensus_of_draws(draws: Sequence[Draw], masks: Sequence[np.ndarray]) -> DrawConsensus:
    """The consensus of N draws and their masks (``predict --samples``, ``evaluate
    --samples``). Each draw's record: ``sample`` (1-based), ``answer``, ``ok``, ``key_slice``
    and ``boxes`` or ``failure``, ``agreement`` (its mean Dice with the other masks) and
    ``dice_to_consensus``, rounded to 4 places."""
    consensus = consensus_mask(masks)
    anchors = []
    for n, (draw, mask) in enumerate(zip(draws, masks)):
        others = [dsc(mask, m) for i, m in enumerate(masks) if i != n]
        record: dict = {"sample": n + 1, "answer": draw.answer, "ok": draw.key_slice is not None}
        if draw.key_slice is None:
            record["failure"] = draw.failure
        else:
            record.update(key_slice=draw.key_slice, boxes=[list(b) for b in draw.boxes])
        record.update(
            agreement=round(float(np.mean(others)), 4) if others else 1.0,
            dice_to_consensus=round(dsc(mask, consensus), 4),
        )
        anchors.append(record)
    well_formed = [n for n, d in enumerate(draws) if d.key_slice is not None]
    best = (
        max(well_formed, key=lambda n: (anchors[n]["dice_to_consensus"], -n))
        if well_formed
        else None
    )
    return DrawConsensus(consensus, mask_agreement(masks), anchors, best)
