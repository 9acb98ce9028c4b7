"""Reading CT volumes and label maps (NIfTI, M3D-Seg arrays) in one orientation, and writing masks.

Canonical orientation: arrays are indexed ``(z, y, x)`` with z running inferior -> superior, y
anterior -> posterior and x patient-right -> patient-left (LPS, the DICOM patient frame). Axial
slice z shown with ``imshow(arr[z])`` is then in the radiological convention (anterior at the
top, the patient's right on the left of the image) for every file, whatever its stored
orientation. Masks are written back on the source file's own grid, orientation and affine.

M3D-Seg arrays (see :mod:`data.m3dseg` for the published layout and sources) carry no affine.
They hold the source NIfTI's voxels in its stored order, as MONAI's loader gave them with no
reorientation: ``(H, W, D)`` = (column, row, slice) of the DICOM-ordered source, read here as
``(z, y, x) = transpose(2, 1, 0)``, which is M3D's own ``swapaxes(-1, -3)`` (``depth-last``). A
source stored axial-first (KiTS's ``(z, y, x)`` layout) shows as two equal trailing axes and is
already ``(z, y, x)`` (``axial-first``). A cube (H = W = D) does not tell: a manifest row's
``m3d_axes`` says which (``data.m3dseg`` writes it, deciding a cube by its subset's majority),
else it is read depth-last. Images are z-scores of the foreground, not HU: by default they are
rescaled to 0..1 by their own minimum and maximum (M3D's own input scaling) and take the ``unit``
window; ``intensity="hu"`` maps them instead to approximate HU (:func:`m3d_hu_map`) for an HU
window. A mask's channels become a label map with channel c at value c + 1; channels that overlap
are refused, since one voxel cannot hold two values.

Surface metrics need the voxel size: a NIfTI file or DICOM series has it (mm), an M3D-Seg array
has none (:attr:`Volume.has_geometry` is False) and takes it from the manifest, else is measured
in voxels (:func:`surface_spacing`).
"""

from __future__ import annotations

import gzip
import re
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

from data.grid import CANONICAL_AXES, Volume, VolumeError, to_canonical, to_stored

MIN_SHAPE = (8, 16, 16)  # smallest (z, y, x) volume that can be sampled into slices
M3D_AXES = ("depth-last", "axial-first")  # stored (H, W, D) read as M3D does; already (z, y, x)
M3D_INTENSITIES = ("unit", "hu")  # min-max to 0..1 (M3D's input); approximate HU (m3d_hu_map)

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
    array, affine_c = to_canonical(data, img.affine)
    return array, affine_c, np.asarray(img.affine)


# The dense (C, H, W, D) shape M3D-Seg writes into a mask's file name, in both published forms:
# "case_00000.(3, 512, 512, 611).npz" and "mask_(3, 512, 512, 611).npz".
_M3D_MASK_SHAPE = re.compile(r"\(\s*(\d+(?:\s*,\s*\d+)*)\s*,?\s*\)\.npz$", re.IGNORECASE)


def m3d_mask_shape(path: str | Path) -> tuple[int, int, int, int]:
    """The dense ``(C, H, W, D)`` shape an M3D-Seg mask's file name carries.

    Raises :class:`VolumeError` naming the file when the name holds no 4-number shape.
    """
    path = Path(path)
    match = _M3D_MASK_SHAPE.search(path.name)
    if match is None:
        raise VolumeError(
            f"{path}: M3D-Seg mask name carries no dense shape "
            "(expected '<name>.(C, H, W, D).npz' or '<name>_(C, H, W, D).npz')"
        )
    shape = tuple(int(v) for v in match.group(1).split(","))
    if len(shape) != 4 or min(shape) < 1:
        raise VolumeError(f"{path}: mask shape {shape} in the file name is not (C, H, W, D)")
    return shape  # type: ignore[return-value]


def _m3d_sparse(path: Path):
    """The mask's (C, H*W*D) sparse matrix in CSR form, explicit zeros dropped, and its shape."""
    from scipy import sparse

    shape = m3d_mask_shape(path)
    try:
        matrix = sparse.load_npz(path)
    except FileNotFoundError:
        raise VolumeError(f"{path}: mask file not found") from None
    except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise VolumeError(
            f"{path}: not a scipy sparse matrix saved with save_npz ({type(err).__name__}: {err})"
        ) from None
    channels, h, w, d = shape
    if matrix.shape != (channels, h * w * d):
        raise VolumeError(
            f"{path}: sparse matrix of shape {matrix.shape} is not the (C, H*W*D) = "
            f"({channels}, {h * w * d}) its file name's shape {shape} gives"
        )
    matrix = matrix.tocsr()
    matrix.eliminate_zeros()
    return matrix, shape


def m3d_channel_voxels(path: str | Path) -> np.ndarray:
    """Foreground voxel count of each channel of an M3D-Seg mask, shape (C,), without
    building the dense array (M3D-Seg keeps an all-zero channel for a label a case lacks)."""
    matrix, _ = _m3d_sparse(Path(path))
    return np.diff(matrix.indptr).astype(np.int64)


def surface_spacing(
    volume: Volume, given: Sequence[float] | None = None
) -> tuple[tuple[float, float, float], str]:
    """The (z, y, x) voxel size that surface distances are measured with, and its unit: a file's
    own geometry in mm; for an array that stores none (M3D-Seg), ``given`` (a manifest row's
    ``spacing``, mm) or else 1 along each axis, in voxels."""
    if volume.has_geometry:
        return volume.spacing, "mm"
    if given is not None:
        z, y, x = (float(s) for s in given)
        return (z, y, x), "mm"
    return (1.0, 1.0, 1.0), "voxel"


def m3d_axes_of(shape: Sequence[int]) -> str | None:
    """How an M3D-Seg array of stored shape (H, W, D) is read, when its shape tells: two equal
    trailing axes and a different first (``(z, n, n)``) are ``axial-first``, anything else but a
    cube ``depth-last``; None for a cube (H = W = D), which either could be."""
    h, w, d = (int(n) for n in shape)
    if h == w == d:
        return None
    return "axial-first" if w == d else "depth-last"


def _m3d_canonical(array: np.ndarray, axes: str | None = None) -> np.ndarray:
    # No affine survives in M3D-Seg: the stored order is the source NIfTI's. Most sources are
    # DICOM-ordered (i = column, j = row, k = slice), read as M3D reads them; a source stored
    # axial-first (KiTS) has its two in-plane axes last and equal, and is already (z, y, x).
    # A cube is read depth-last unless the manifest row says otherwise.
    if (axes or m3d_axes_of(array.shape) or "depth-last") == "axial-first":
        return np.ascontiguousarray(array)
    return np.ascontiguousarray(array.transpose(2, 1, 0))


# Approximate HU of M3D-Seg's z-scores (m3d_hu_map): two tissues of known HU fix the line.
FAT_HU = -100.0  # subcutaneous and visceral fat
SOFT_TISSUE_HU = 40.0  # muscle and abdominal organs (the abdominal window's level)
_HIST_BIN = 0.01  # histogram bin, z units (1-3 HU at a foreground std of 100-300 HU)
_HIST_SMOOTH = 0.05  # Gaussian smoothing of the histogram, z units: merges noise peaks
_PEAK_SHARE = 0.05  # a peak counts when at least this share of the tallest one
_PEAK_DIP = 0.8  # fat and soft tissue are told apart: the valley between them is lower than this
# share of the lower peak (noise on one broad peak makes bumps with no valley)
# Least fat-to-soft-tissue distance, z units: their 140 HU are 0.47-1.75 z at a foreground std
# of 80-300 HU, while two soft tissues (20-60 HU) are closer.
_PEAK_GAP = 0.35
_HIST_VOXELS = 1 << 22  # voxels the histogram reads at most (a strided subsample)


def m3d_hu_map(z: np.ndarray) -> tuple[float, float]:
    """``(scale, offset)`` with HU ~= scale * z + offset for an M3D-Seg image ``z``.

    M3D stored ``z = (clip(HU, lo, hi) - mu) / sigma``, mu and sigma of the foreground (voxels
    above the volume mean), so between the clip bounds HU = sigma * z + mu: a line, fixed by two
    tissues of known HU that lie in that foreground on an abdominal CT with air around the body,
    fat (``FAT_HU``) and soft tissue (``SOFT_TISSUE_HU``). They are the two tallest well-separated
    peaks of the histogram of the voxels strictly inside the clip bounds: the tallest peak is soft
    tissue when a peak lies at least ``_PEAK_GAP`` below it (fat: the tallest of those), else it
    is fat and soft tissue is the tallest peak at least ``_PEAK_GAP`` above it; the valley between
    them must dip below ``_PEAK_DIP`` of the lower one. The result is approximate: a scan's
    soft-tissue mode sits anywhere in 20-60 HU (contrast, organ mix), which moves the map by up to
    ~20 HU in the abdominal window (40 phantoms: mean |error| 19 HU inside it, at most 29;
    ``tests/data/test_m3dseg.py``).

    Raises :class:`VolumeError` when the histogram has no such pair of peaks, or when the map
    puts the lower clip bound (about the volume mean) outside [-1100 HU, fat): not an abdominal
    CT with air around the body, whose values this cannot place.
    """
    from scipy.ndimage import gaussian_filter1d

    flat = np.asarray(z).reshape(-1)
    flat = flat[:: max(1, flat.size // _HIST_VOXELS)]
    low, high = float(flat.min()), float(flat.max())
    inner = flat[(flat > low) & (flat < high)]
    if inner.size == 0 or high - low < 4 * _PEAK_GAP:
        raise VolumeError(f"intensities span only [{low:.4g}, {high:.4g}]: no tissue peaks")
    edges = np.arange(low, high + _HIST_BIN, _HIST_BIN)
    counts, _ = np.histogram(inner, edges)
    smooth = gaussian_filter1d(counts.astype(np.float64), _HIST_SMOOTH / _HIST_BIN)
    centres = (edges[:-1] + edges[1:]) / 2
    peaks = np.flatnonzero((smooth[1:-1] > smooth[:-2]) & (smooth[1:-1] >= smooth[2:])) + 1
    peaks = peaks[smooth[peaks] >= _PEAK_SHARE * smooth[peaks].max()] if peaks.size else peaks
    if peaks.size < 2:
        raise VolumeError(f"{peaks.size} tissue peak(s) in the histogram; fat and soft tissue: 2")
    top = peaks[np.argmax(smooth[peaks])]
    below = peaks[centres[peaks] <= centres[top] - _PEAK_GAP]
    above = peaks[centres[peaks] >= centres[top] + _PEAK_GAP]
    if below.size:
        fat, soft = below[np.argmax(smooth[below])], top
    elif above.size:
        fat, soft = top, above[np.argmax(smooth[above])]
    else:
        raise VolumeError(
            f"no two tissue peaks {_PEAK_GAP} apart (peaks at z = "
            f"{[round(float(c), 2) for c in centres[peaks]]}): fat and soft tissue not found"
        )
    valley = float(smooth[fat : soft + 1].min())
    if valley >= _PEAK_DIP * min(smooth[fat], smooth[soft]):
        raise VolumeError(
            f"the peaks at z = {centres[fat]:.2f} and {centres[soft]:.2f} have no valley between "
            "them: fat and soft tissue not told apart"
        )
    scale = (SOFT_TISSUE_HU - FAT_HU) / float(centres[soft] - centres[fat])
    offset = FAT_HU - scale * float(centres[fat])
    floor = scale * low + offset
    if not -1100.0 <= floor < FAT_HU:
        raise VolumeError(
            f"fat and soft tissue taken at z = {centres[fat]:.2f} and {centres[soft]:.2f} put the "
            f"lower clip bound at {floor:.0f} HU, outside [-1100, {FAT_HU:.0f}): not an abdominal "
            "CT with air around the body"
        )
    return scale, offset


def _load_m3d_image(path: Path, intensity: str) -> np.ndarray:
    """The stored (H, W, D) image, as 0..1 (``unit``) or approximate HU (``hu``)."""
    try:
        arr = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise VolumeError(f"{path}: image file not found") from None
    except (ValueError, OSError, EOFError) as err:
        raise VolumeError(f"{path}: not a readable .npy array ({err})") from None
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3 or not np.issubdtype(arr.dtype, np.number):
        raise VolumeError(
            f"{path}: M3D-Seg image must be a numeric (1, H, W, D) array, got {arr.dtype} "
            f"{tuple(arr.shape)}"
        )
    arr = np.asarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        return arr  # load_volume reports the bad voxels
    if intensity == "hu":
        try:
            scale, offset = m3d_hu_map(arr)
        except VolumeError as err:
            raise VolumeError(
                f"{path}: cannot recover HU ({err}); read it with data.m3d_intensity=unit"
            ) from None
        return arr * np.float32(scale) + np.float32(offset)
    # Stored as foreground z-scores clipped to the foreground's 0.05-99.95 percentiles, so the
    # minimum and maximum are those clip bounds: min-max is a per-case window on them, the
    # scaling M3D's own models were trained with.
    low, high = float(arr.min()), float(arr.max())
    return (arr - low) / (high - low) if high > low else np.zeros_like(arr)


def _load_m3d_mask(path: Path) -> np.ndarray:
    """The stored (H, W, D) label map."""
    matrix, (channels, h, w, d) = _m3d_sparse(path)
    # M3D builds channel c as (label map == c + 1), so published channels never overlap and the
    # label map loses nothing; a mask whose channels do overlap is refused, not collapsed.
    labels = np.zeros(h * w * d, dtype=np.uint8 if channels < 256 else np.uint16)
    for c in range(channels):
        voxels = matrix.indices[matrix.indptr[c] : matrix.indptr[c + 1]]
        taken = labels[voxels]
        if taken.any():
            other = int(taken[taken > 0][0]) - 1
            raise VolumeError(
                f"{path}: channels {other} and {c} overlap in {int((taken > 0).sum())} voxels; "
                "a label map (channel c -> value c + 1) cannot hold both"
            )
        labels[voxels] = c + 1
    return labels.reshape(h, w, d)


def load_volume(
    path: str | Path,
    what: str = "image",
    m3d_axes: str | None = None,
    m3d_intensity: str = "unit",
) -> Volume:
    """Read a CT (``what="image"``) or label map (``what="mask"``) in canonical orientation.

    NIfTI (.nii, .nii.gz) via nibabel; a folder holding one DICOM series via
    :func:`data.dicom.read_series` (same orientation step); M3D-Seg arrays with an identity
    affine and ``has_geometry`` False, since that layout stores no geometry: an image .npy of
    (1, H, W, D) comes rescaled to 0..1 (``m3d_intensity="unit"``) or as approximate HU
    (``"hu"``), a sparse mask ``<name>.(C, H, W, D).npz`` or ``<name>_(C, H, W, D).npz`` comes as a
    label map with channel c at value c + 1; ``m3d_axes`` (one of ``M3D_AXES``; None: told by the
    shape, a cube depth-last) says how the stored axes are read (see the module docstring). Both
    are ignored for NIfTI and DICOM.
    Raises :class:`VolumeError` naming the file for a missing, truncated or corrupt file, a shape
    that is not 3D, NaN or infinite voxels, a volume too small to sample, or an M3D-Seg image
    whose HU cannot be recovered.
    """
    path = Path(path)
    name = path.name.lower()
    if m3d_axes not in (None, *M3D_AXES):
        raise VolumeError(f"{path}: m3d_axes {m3d_axes!r} is not one of {M3D_AXES}")
    if m3d_intensity not in M3D_INTENSITIES:
        raise VolumeError(
            f"{path}: m3d_intensity {m3d_intensity!r} is not one of {M3D_INTENSITIES}"
        )
    if path.is_dir():
        from data.dicom import read_series

        return read_series(path).volume
    if name.endswith((".nii", ".nii.gz")):
        array, affine, source_affine = _load_nifti(path, what)
    elif name.endswith(".npy"):
        array = _m3d_canonical(_load_m3d_image(path, m3d_intensity), m3d_axes)
        affine = source_affine = np.eye(4)
    elif name.endswith(".npz"):
        array = _m3d_canonical(_load_m3d_mask(path), m3d_axes)
        affine = source_affine = np.eye(4)
    else:
        raise VolumeError(
            f"{path}: unknown volume format (expected .nii, .nii.gz, .npy, .npz or a folder "
            "holding one DICOM series)"
        )
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise VolumeError(f"{path}: {what} has {bad} NaN or infinite voxels")
    if any(s < m for s, m in zip(array.shape, MIN_SHAPE)):
        raise VolumeError(
            f"{path}: {what} of shape (z, y, x) = {array.shape} is too small to sample "
            f"(at least {MIN_SHAPE})"
        )
    return Volume(
        path=path,
        array=array,
        affine=affine,
        source_affine=source_affine,
        has_geometry=not name.endswith((".npy", ".npz")),
    )


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


def save_mask(mask: np.ndarray, like: str | Path | Volume, out: str | Path) -> Path:
    """Write a canonical (z, y, x) mask or label map as NIfTI on the grid, orientation and affine
    of ``like``.

    ``like`` is the source NIfTI the mask was predicted on (its header is kept), or the
    :class:`Volume` it was read into (a DICOM series: the affine made from its geometry); the
    written file overlays the source in any viewer. Values are stored as uint8 (a label map of at
    most 255 labels). The file is written to a temporary name and renamed, so no partial file is
    left.
    """
    out = Path(out)
    if isinstance(like, Volume):
        affine, header, canonical_shape = like.source_affine, None, like.array.shape
    else:
        like = Path(like)
        src = nib.load(str(like))
        affine, header = src.affine, src.header.copy()
        transform = ornt_transform(io_orientation(src.affine), axcodes2ornt(CANONICAL_AXES))
        xyz_shape = tuple(
            int(src.shape[int(axis)]) for axis in sorted(range(3), key=lambda i: transform[i, 0])
        )
        canonical_shape = xyz_shape[::-1]
    mask = np.asarray(mask)
    if mask.shape != tuple(canonical_shape):
        raise VolumeError(
            f"{out}: mask shape (z, y, x) {mask.shape} does not fit {like} "
            f"(canonical (z, y, x) {tuple(canonical_shape)})"
        )
    if mask.size and int(mask.max()) > 255:
        raise VolumeError(f"{out}: label value {int(mask.max())} does not fit uint8")
    data = to_stored(mask.astype(np.uint8), affine)
    img = nib.Nifti1Image(data, affine, header)
    img.header.set_data_dtype(np.uint8)
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
