"""The typed records that flow from the data layer into rollout, rewards and the learner."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Sample:
    """One manifest row: a CT volume, its label map, the target label and a query about it.

    Paths are absolute (resolved against the manifest's folder and checked to stay inside it).
    """

    id: str
    image: Path
    mask: Path
    label: str  # target name, e.g. "liver", "left kidney", "kidney tumour"
    query: str  # the free-form clinical query the policy reads
    split: str  # "train" or "test"
    suite: str  # dataset the case belongs to: "ctorg", "abdomenct1k", "kits23", or a user's name
    # Voxel size in mm along the canonical (z, y, x) axes, for an image that stores none (an
    # M3D-Seg array); None: the file's own (NIfTI, DICOM), or surface metrics in voxels.
    spacing: tuple[float, float, float] | None = None
    # How an M3D-Seg array's stored axes are read ("depth-last" or "axial-first", see
    # data.volume); None: told by its shape. Ignored for NIfTI and DICOM.
    m3d_axes: str | None = None


@dataclass(frozen=True, eq=False)
class PreparedVolume:
    """A volume and one target resampled to the policy's frame: S axial slices of H x W pixels.

    Slice k of the paper (1-based ``key_slice``) is ``slices[k - 1]``; pixel (x, y) of that
    slice is ``slices[k - 1, y, x]``. Arrays may be read-only memory maps from the cache.
    """

    sample_id: str
    slices: np.ndarray  # (S, H, W) uint8: HU-windowed and scaled to 0..255
    mask: np.ndarray  # (S, H, W) bool: the target on the sampled slices
    source_index: np.ndarray  # (S,) int64: source axial index (0-based) of each sampled slice
    source_shape: tuple[int, int, int]  # (Z, Y, X) of the source volume in canonical orientation
    affine: np.ndarray  # (4, 4) float64: the source file's affine, canonical orientation

    @property
    def num_slices(self) -> int:
        return int(self.slices.shape[0])

    @property
    def size(self) -> int:
        return int(self.slices.shape[-1])

    @property
    def areas(self) -> np.ndarray:
        """F_t: foreground pixel count of the target on each sampled slice, shape (S,)."""
        return self.mask.reshape(self.mask.shape[0], -1).sum(axis=1).astype(np.int64)
