"""Voxel overlap metrics of a predicted against a true 3D mask."""

from __future__ import annotations

import numpy as np


def dsc(pred: np.ndarray, true: np.ndarray) -> float:
    """Dice similarity coefficient 2|P∩G| / (|P| + |G|); 1.0 when both masks are empty (a
    correct "nothing there"), 0.0 when exactly one is."""
    p, g = np.asarray(pred, bool), np.asarray(true, bool)
    if p.shape != g.shape:
        raise ValueError(f"mask shapes differ: {p.shape} vs {g.shape}")
    denom = int(p.sum()) + int(g.sum())
    return 1.0 if denom == 0 else 2.0 * int((p & g).sum()) / denom


def iou(pred: np.ndarray, true: np.ndarray) -> float:
    """Intersection over union |P∩G| / |P∪G|; same empty-mask convention as :func:`dsc`."""
    p, g = np.asarray(pred, bool), np.asarray(true, bool)
    if p.shape != g.shape:
        raise ValueError(f"mask shapes differ: {p.shape} vs {g.shape}")
    union = int((p | g).sum())
    return 1.0 if union == 0 else int((p & g).sum()) / union
