"""Settings of the data layer: slice sampling, resizing, the intensity window, Top-K and the cache.

The intensity window is chosen per dataset (suite), never per target label: every target of a
scan must be asked about on the same picture, or the picture itself tells which organ is wanted.
SFT, GRPO, the reward server and evaluation all prepare volumes through one ``DataConfig``, so
they see the same slices; ``python -m evaluation.predict --window`` takes the same presets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Named windows [low, high]: level L and width W give [L - W/2, L + W/2] in HU.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "abdomen": (-160.0, 240.0),  # L 40, W 400: abdominal soft tissue (the paper's suites)
    "soft_tissue": (-125.0, 225.0),  # L 50, W 350
    "lung": (-1350.0, 150.0),  # L -600, W 1500
    "bone": (-500.0, 1300.0),  # L 400, W 1800
    "brain": (0.0, 80.0),  # L 40, W 80
    "unit": (0.0, 1.0),  # arrays already normalised to 0..1, not HU (possibly M3D-Seg's .npy)
}

MIN_BOX_AREA = 4  # pixels; the reward server's reward.min_box_area has the same default


class WindowError(ValueError):
    """A window setting that is neither a known preset nor [low, high] with low < high."""


def resolve_window(value: str | Sequence[float], field: str) -> tuple[float, float]:
    """``(low, high)`` of a preset name or a ``[low, high]`` pair; ``field`` names the setting
    (``data.window``, ``data.suite_windows.kits23``, ``--window``) in the error."""
    if isinstance(value, str):
        if value not in WINDOW_PRESETS:
            raise WindowError(
                f"{field}: unknown window preset {value!r}; use one of "
                f"{sorted(WINDOW_PRESETS)} or [low, high]"
            )
        return WINDOW_PRESETS[value]
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise WindowError(
            f"{field}: {value!r} is neither a window preset nor [low, high]"
        ) from None
    if not low < high:
        raise WindowError(f"{field}: window [{low}, {high}] needs low below high")
    return low, high


@dataclass
class DataConfig:
    manifest: Path | None = None  # JSONL manifest of the dataset (paths relative to it)
    num_slices: int = 64  # axial slices sampled uniformly from each volume (paper: 64)
    slice_size: int = 256  # slices are resized to slice_size x slice_size (paper: 256)
    # SFT key slice drawn from the K slices of largest target area, K given for 64 slices (the
    # paper samples one of a Top-K without giving K; 5 here) and scaled to num_slices: the
    # same share of the volume, at least 1 (see key_slice_top_k).
    top_k: int = 5
    # Components smaller than this (pixels) give no box, in SFT targets as in the reward's true
    # boxes (keep equal to reward.min_box_area); a slice with none at least this big is never an
    # SFT key slice.
    min_box_area: int = MIN_BOX_AREA
    # Intensity window of every suite without its own entry: a preset name from WINDOW_PRESETS or
    # [low, high] (paper's suites are abdominal CT: "abdomen", level 40 width 400).
    window: str | list[float] = "abdomen"
    # Per-suite window (suite name -> preset name or [low, high]), e.g. {"ctorg": "unit"} for
    # arrays stored normalised to 0..1. Never per label: the picture must not depend on the target.
    suite_windows: dict[str, str | list[float]] = field(default_factory=dict)
    # M3D-Seg images (foreground z-scores, not HU): "unit" reads them min-max scaled to 0..1, M3D's
    # own input, for the `unit` window; "hu" maps them to approximate HU from their fat and
    # soft-tissue histogram peaks (data.volume.m3d_hu_map), for an HU window such as `abdomen`.
    # Other formats are in HU already and ignore it.
    m3d_intensity: str = "unit"
    cache_dir: Path | None = None  # preprocessed samples (memory-mappable); None = no cache
    # Training samples are asked with a phrasing drawn anew each time they are used (each SFT
    # epoch, each GRPO draw) from their target's training phrasings (data.queries), as
    # M3D-Seg's loaders draw a question per access; False: the manifest's one fixed query.
    resample_queries: bool = False
    queries_file: Path | None = None  # YAML adding to data/phrasings.yaml's targets; None: it alone
    seed: int = 0  # seeds Top-K key-slice sampling

    def key_slice_top_k(self, top_k: int | None = None) -> int:
        """K of the Top-K key-slice draw at this slice count: ``top_k`` (default ``self.top_k``),
        given for 64 slices, times num_slices / 64, rounded, at least 1 (5 of 64 -> 1 of 8)."""
        k = self.top_k if top_k is None else top_k
        return max(1, round(k * self.num_slices / 64))

    def __post_init__(self) -> None:
        # Resolve every window now, so a typo fails when the config loads, not mid-run.
        resolve_window(self.window, "data.window")
        for suite, value in self.suite_windows.items():
            resolve_window(value, f"data.suite_windows.{suite}")
        if self.m3d_intensity not in ("unit", "hu"):
            raise ValueError(
                f"data.m3d_intensity must be 'unit' or 'hu', got {self.m3d_intensity!r}"
            )
        if self.queries_file is not None:  # a malformed phrasings file fails here, not mid-run
            from data.queries import load_phrasings

            load_phrasings(Path(self.queries_file).resolve())
        if self.min_box_area < 1:
            raise ValueError(f"data.min_box_area must be >= 1, got {self.min_box_area}")

    def window_for(self, suite: str) -> tuple[float, float]:
        """The (low, high) window of every volume of ``suite``: its own entry, else the default."""
        if suite in self.suite_windows:
            return resolve_window(self.suite_windows[suite], f"data.suite_windows.{suite}")
        return resolve_window(self.window, "data.window")
