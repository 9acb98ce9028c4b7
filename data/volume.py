"""Reading CT volumes and label maps (NIfTI, M3D-Seg arrays) in one orientation, and writing masks.

Canonical orientation: arrays are indexed ``(z, y, x)`` with z running inferior -> superior, y
anterior -> posterior and x patient-right -> patient-left (LPS, the DICOM patient frame). Axial
slice z shown with ``imshow(arr[z])`` is then in the radiological convention (anterior at the
top, the patient's right on the left of the image) for every file, whatever its stored
orientation. Masks are written back on the source file's own grid, orientation and affine.
"""

from __future__ import annotations

import ast
import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

CANONICAL_AXES = ("L", "P", "S")  # nibabel axis codes of array axes (x, y, z)
MIN_SHAPE = (8, 16, 16)  # smallest (z, y, x) volume that can be sampled into slices


class VolumeError(ValueError):
    """A volume file that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True, eq=False)
class Volume:
    """A volume in canonical (z, y, x) orientation, with the affine of that canonical array."""

    path: Path
    array: np.ndarray  # (Z, Y, X)
    affine: np.ndarray  # (4, 4): canonical voxel (x, y, z) -> world, like a NIfTI affine
    source_affine: np.ndarray  # (4, 4): the affine stored in the file


def _load_nifti(path: Path, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except FileNotFoundError:
        raise VolumeError(f"{path}: {what} file not found") from None
    except (
        nib.filebasedimages.ImageFileError,
        EOFError,
        OSError,
        zlib.error,
        gzip.BadGzipFile,
        ValueError,
    ) as err:
        raise VolumeError(f"{path}: {what} is not a readable NIfTI file ({err})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise VolumeError(f"{path}: {what} must be a 3D volume, got shape {data.shape}")
    transform = ornt_transform(io_orientation(img.affine), axcodes2ornt(CANONICAL_AXES))
    data_c = nib.orientations.apply_orientation(data, transform)
    affine_c = img.affine @ nib.orientations.inv_ornt_aff(transform, data.shape)
    return np.ascontiguousarray(data_c.transpose(2, 1, 0)), affine_c, np.asarray(img.affine)


def _load_m3d_image(path: Path) -> np.ndarray:
    try:
        arr = np.load(path)
    except FileNotFoundError:
        raise VolumeError(f"{path}: image file not found") from None
    except (ValueError, OSError, EOFError) as err:
        raise VolumeError(f"{path}: not a readable .npy array ({err})") from None
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise VolumeError(f"{path}: image must be (1, H, W, D) or (H, W, D), got {arr.shape}")
    return np.ascontiguousarray(arr.transpose(2, 0, 1))  # M3D-Seg stores (H, W, D): D is axial


def _load_m3d_mask(path: Path) -> np.ndarray:
    from scipy import sparse

    try:
        shape = ast.literal_eval(path.name.split("_", 1)[1].rsplit(".", 1)[0])
        matrix = sparse.load_npz(path)
        channels = matrix.toarray().reshape(shape)
    except FileNotFoundError:
        raise VolumeError(f"{path}: mask file not found") from None
    except (ValueError, SyntaxError, IndexError, OSError, EOFError) as err:
        raise VolumeError(
            f"{path}: not an M3D-Seg mask 'mask_(C, H, W, D).npz' ({type(err).__name__}: {err})"
        ) from None
    if len(shape) != 4:
        raise VolumeError(f"{path}: mask shape {shape} is not (C, H, W, D)")
    # One channel per label: channel c holds label value c + 1 (later channels win overlaps).
    labels = np.zeros(shape[1:], dtype=np.int16)
    for c in range(shape[0]):
        labels[channels[c] > 0] = c + 1
    return np.ascontiguousarray(labels.transpose(2, 0, 1))


def load_volume(path: str | Path, what: str = "image") -> Volume:
    """Read a CT (``what="image"``) or label map (``what="mask"``) in canonical orientation.

    NIfTI (.nii, .nii.gz) via nibabel; M3D-Seg arrays (image .npy of (1, H, W, D), mask sparse
    ``mask_(C, H, W, D).npz``) with an identity affine, since that layout stores no geometry.
    Raises :class:`VolumeError` naming the file for a missing, truncated or corrupt file, a shape
    that is not 3D, NaN or infinite voxels, or a volume too small to sample.
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        array, affine, source_affine = _load_nifti(path, what)
    elif name.endswith(".npy"):
        array = _load_m3d_image(path)
        affine = source_affine = np.eye(4)
    elif name.endswith(".npz"):
        array = _load_m3d_mask(path)
        affine = source_affine = np.eye(4)
    else:
        raise VolumeError(f"{path}: unknown volume format (expected .nii, .nii.gz, .npy or .npz)")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise VolumeError(f"{path}: {what} has {bad} NaN or infinite voxels")
    if any(s < m for s, m in zip(array.shape, MIN_SHAPE)):
        raise VolumeError(
            f"{path}: {what} of shape (z, y, x) = {array.shape} is too small to sample "
            f"(at least {MIN_SHAPE})"
        )
    return Volume(path=path, array=array, affine=affine, source_affine=source_affine)


def check_pair(image: Volume, mask: Volume) -> None:
    """Raise :class:`VolumeError` unless image and mask share shape and geometry."""
    if image.array.shape != mask.array.shape:
        raise VolumeError(
            f"{mask.path}: mask shape {mask.array.shape} does not match image {image.path} "
            f"shape {image.array.shape} (z, y, x)"
        )
    if not np.allclose(image.affine, mask.affine, atol=1e-3):
        raise VolumeError(
            f"{mask.path}: mask affine does not match image {image.path}:\n"
            f"{np.round(mask.affine, 4)}\nvs\n{np.round(image.affine, 4)}"
        )


def save_mask(mask: np.ndarray, like: str | Path, out: str | Path) -> Path:
    """Write a canonical (z, y, x) mask as NIfTI on the grid, orientation and affine of ``like``.

    ``like`` is the source NIfTI the mask was predicted on; the written file overlays it in any
    viewer. The file is written to a temporary name and renamed, so no partial file is left.
    """
    like, out = Path(like), Path(out)
    src = nib.load(str(like))
    src_shape = src.shape[:3]
    transform = ornt_transform(io_orientation(src.affine), axcodes2ornt(CANONICAL_AXES))
    canonical_shape = tuple(
        int(src_shape[int(axis)]) for axis in sorted(range(3), key=lambda i: transform[i, 0])
    )
    xyz = np.asarray(mask).transpose(2, 1, 0)
    if xyz.shape != canonical_shape:
        raise VolumeError(
            f"{out}: mask shape (z, y, x) {mask.shape} does not fit {like} "
            f"(canonical (x, y, z) {canonical_shape})"
        )
    back = ornt_transform(axcodes2ornt(CANONICAL_AXES), io_orientation(src.affine))
    data = nib.orientations.apply_orientation(xyz.astype(np.uint8), back)
    header = src.header.copy()
    header.set_data_dtype(np.uint8)
    img = nib.Nifti1Image(np.ascontiguousarray(data), src.affine, header)
    img.header.set_slope_inter(1, 0)
    out.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if out.name.endswith(".gz") else ".nii"
    tmp = out.with_name(f".{out.name}.partial{suffix}")
    try:
        nib.save(img, str(tmp))
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
