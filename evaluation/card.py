"""The evidence card: the key slice with its boxes, and the mask over the slices around it."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def evidence_card(
    path: Path,
    slices: np.ndarray,
    mask: np.ndarray,
    key_slice: int | None,
    boxes: tuple,
    title: str,
    source_index: np.ndarray | None = None,
) -> Path:
    """Write a PNG a clinician can check at a glance. ``slices``/``mask`` are (S, H, W) in the
    policy's frame; ``key_slice`` is 1-based (None when the answer was unusable)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num = slices.shape[0]
    k = (key_slice or (num // 2 + 1)) - 1
    around = [i for i in range(k - 2, k + 3) if 0 <= i < num and i != k][:4]
    fig, axes = plt.subplots(1, 1 + len(around), figsize=(3.2 * (1 + len(around)), 3.6))
    axes = np.atleast_1d(axes)

    def name(i: int) -> str:
        src = f" (source slice {int(source_index[i])})" if source_index is not None else ""
        return f"slice {i + 1}{src}"

    ax = axes[0]
    ax.imshow(slices[k], cmap="gray")
    for x1, y1, x2, y2 in boxes:
        ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="yellow", lw=1.5))
    if mask[k].any():
        ax.contour(mask[k], levels=[0.5], colors="red", linewidths=0.8)
    ax.set_title(("key " + name(k)) if key_slice else "no usable answer", fontsize=8)
    for ax, i in zip(axes[1:], around):
        ax.imshow(slices[i], cmap="gray")
        if mask[i].any():
            ax.imshow(np.ma.masked_where(~mask[i], mask[i]), cmap="autumn", alpha=0.45)
        ax.set_title(name(i), fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
