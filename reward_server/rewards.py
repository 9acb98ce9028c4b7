"""The four reward terms of MedVol-R1 and their weighted sum, as pure functions.

R = w_f Rf + w_a Ra + w_s Rs + w_c Rc (paper: all weights 1.0). Edge cases, decided here:

- A malformed answer (see ``data.answer``) scores 0 on every term.
- No true boxes on the predicted key slice (the target is not visible there): Rs = 0 and Rc = 0
  whatever was predicted, so an anchor away from the target earns only Rf (and Ra = 0 too).
- No predicted boxes while the target is visible: Rs = 0; Rc = 0 (nothing prompts propagation).
- The +-Delta window is clipped to the volume's ends (slices 1..S); it is never wrapped or
  padded, so a key slice at an end has a shorter window.
- An empty true window (possible only when no true box is on the key slice) gives Rc = 0.
- A target empty on every slice (max_t F_t = 0): Ra = 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from data.answer import AnswerFailure, Box, ParsedAnswer


@dataclass(frozen=True)
class RewardBreakdown:
    """Every reward term of one completion, the weighted total, and why it failed if it did."""

    format: float
    axial: float
    spatial: float
    consistency: float
    total: float
    failure: str | None = None  # parser's reason when the answer is malformed


def format_reward(parsed: ParsedAnswer | AnswerFailure) -> float:
    """Rf: 1 if the completion has valid <think> and <answer> blocks that parse to the schema."""
    return 1.0 if isinstance(parsed, ParsedAnswer) else 0.0


def axial_reward(areas: np.ndarray, key_slice: int) -> float:
    """Ra = F_k / max_t F_t: foreground area on the predicted key slice k (1-based) relative to
    the slice of largest area."""
    areas = np.asarray(areas)
    peak = float(areas.max()) if areas.size else 0.0
    if peak <= 0 or not 1 <= key_slice <= areas.size:
        return 0.0
    return float(areas[key_slice - 1]) / peak


def box_iou(a: Box, b: Box) -> float:
    """IoU of two [x1, y1, x2, y2] boxes in pixel-edge coordinates."""
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_boxes(predicted: tuple[Box, ...], true: tuple[Box, ...]) -> list[tuple[int, int, float]]:
    """Hungarian matching of predicted to true boxes with cost 1 - IoU.

    Returns (predicted index, true index, IoU) for each of the min(N, N*) matched pairs.
    """
    if not predicted or not true:
        return []
    iou = np.array([[box_iou(p, t) for t in true] for p in predicted])
    rows, cols = linear_sum_assignment(1.0 - iou)
    return [(int(r), int(c), float(iou[r, c])) for r, c in zip(rows, cols)]


def spatial_reward(predicted: tuple[Box, ...], true: tuple[Box, ...]) -> float:
    """Rs = (sum of matched IoUs) / max(N, N*), N predicted and N* true boxes on the key slice.

    Unmatched boxes on either side count in the denominator, so extra or missing boxes cost.
    """
    if not true or not predicted:
        return 0.0
    matched = match_boxes(predicted, true)
    return sum(iou for _, _, iou in matched) / max(len(predicted), len(true))


def window(key_slice: int, delta: int, num_slices: int) -> tuple[int, int]:
    """The 0-based half-open slice range [lo, hi) of slices k-Delta..k+Delta, clipped to 1..S."""
    lo = max(1, key_slice - delta)
    hi = min(num_slices, key_slice + delta)
    return lo - 1, hi


def dice(predicted: np.ndarray, true: np.ndarray) -> float:
    """Dice = 2|P ∩ G| / (|P| + |G|); 0 when both are empty (nothing to agree on)."""
    p, g = np.asarray(predicted, bool), np.asarray(true, bool)
    denom = int(p.sum()) + int(g.sum())
    return 2.0 * int((p & g).sum()) / denom if denom else 0.0


def consistency_reward(
    propagated: np.ndarray, true_mask: np.ndarray, key_slice: int, delta: int
) -> float:
    """Rc: Dice between the propagated and the true mask on the slices within +-Delta of k.

    ``propagated`` and ``true_mask`` are (S, H, W); outside the window ``propagated`` is ignored.
    An empty true window gives 0 (see the module docstring).
    """
    lo, hi = window(key_slice, delta, true_mask.shape[0])
    true_window = np.asarray(true_mask[lo:hi], bool)
    if not true_window.any():
        return 0.0
    return dice(propagated[lo:hi], true_window)


def total_reward(rf: float, ra: float, rs: float, rc: float, weights: tuple[float, ...]) -> float:
    """R = w_f Rf + w_a Ra + w_s Rs + w_c Rc."""
    w_f, w_a, w_s, w_c = weights
    return w_f * rf + w_a * ra + w_s * rs + w_c * rc
