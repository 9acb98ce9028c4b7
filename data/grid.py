"""A volume on its scanner grid: the canonical (z, y, x) record and the one orientation step.

Every reader (NIfTI and M3D-Seg in :mod:`data.volume`, DICOM in :mod:`data.dicom`) builds a
:class:`Volume` through :func:`to_canonical`, and every writer goes back through
:func:`to_stored`, so the same scan stored either way gives the same array.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

CANONICAL_AXES = ("L", "P", "S")  # nibabel axis codes of array axes (x, y, z)


class VolumeError(ValueError):
    """A volume file that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True, eq=False)
class Volume:
    """A volume in canonical (z, y, x) orientation, with the affine of that canonical array."""

    path: Path
    array: np.ndarray  # (Z, Y, X)
    affine: np.ndarray  # (4, 4): canonical voxel (x, y, z) -> world, like a NIfTI affine
    source_affine: np.ndarray  # (4, 4): the affine stored in the file (or made from DICOM)
    # False for an M3D-Seg array: it stores no geometry, its identity affine is a stand-in
    has_geometry: bool = True

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size along the canonical (z, y, x) axes (the affine's column lengths, so an
        oblique grid gives its true spacing): mm, or 1 voxel where ``has_geometry`` is False."""
        z, y, x = (float(np.linalg.norm(self.affine[:3, axis])) for axis in (2, 1, 0))
        return z, y, x


def to_canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A stored 3D array (voxel axes i, j, k of ``affine``, a NIfTI-style RAS affine) as the
    canonical (z, y, x) array and the affine of that array.

    The one orientation step of every reader: NIfTI files and DICOM series both come through
    here, so the same scan stored either way gives the same array (an oblique affine is turned to
    its nearest axes, as nibabel's ``io_orientation`` rounds it; the affine keeps the obliquity).
    """
    transform = ornt_transform(io_orientation(affine), axcodes2ornt(CANONICAL_AXES))
    data_c = nib.orientations.apply_orientation(data, transform)
    affine_c = affine @ nib.orientations.inv_ornt_aff(transform, data.shape)
    return np.ascontiguousarray(data_c.transpose(2, 1, 0)), affine_c


def to_stored(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """A canonical (z, y, x) array back in the stored voxel order (i, j, k) of ``affine``:
    the inverse of :func:`to_canonical`."""
    back = ornt_transform(axcodes2ornt(CANONICAL_AXES), io_orientation(affine))
    return np.ascontiguousarray(
        nib.orientations.apply_orientation(np.asarray(mask).transpose(2, 1, 0), back)
    )
