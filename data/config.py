"""Settings of the data layer: slice sampling, resizing, HU windows, Top-K and the cache."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# Abdominal soft-tissue window (level 40, width 400), the usual reading window for these organs.
ABDOMEN_WINDOW = [-160.0, 240.0]


def _default_windows() -> dict[str, list[float]]:
    return {
        "default": list(ABDOMEN_WINDOW),
        "lungs": [-1000.0, 200.0],  # lung parenchyma needs a wide window
        "vertebrae": [-200.0, 1000.0],  # bone window
    }


@dataclass
class DataConfig:
    manifest: Path | None = None  # JSONL manifest of the dataset (paths relative to it)
    num_slices: int = 64  # axial slices sampled uniformly from each volume (paper: 64)
    slice_size: int = 256  # slices are resized to slice_size x slice_size (paper: 256)
    top_k: int = 5  # SFT key slice drawn from the K slices of largest target area (paper: unstated)
    min_box_area: int = 4  # connected components smaller than this (pixels) give no box
    # HU window [low, high] per label name or suite name; "default" for the rest. A label's own
    # window wins over its suite's.
    windows: dict[str, list[float]] = field(default_factory=_default_windows)
    cache_dir: Path | None = None  # preprocessed samples (memory-mappable); None = no cache
    seed: int = 0  # seeds Top-K key-slice sampling

    def window_for(self, label: str, suite: str) -> tuple[float, float]:
        """The HU window for a target: its label's, else its suite's, else the default."""
        for key in (label, suite, "default"):
            if key in self.windows:
                low, high = self.windows[key]
                if not low < high:
                    raise ValueError(f"data.windows.{key}: low {low} must be below high {high}")
                return float(low), float(high)
        return float(ABDOMEN_WINDOW[0]), float(ABDOMEN_WINDOW[1])
