"""From a source volume to the policy's frame and back: intensity window, 64 slices, 256 px, cache.

The window is the suite's (``DataConfig.window_for``), the same for every target of a scan and
for a user's scan in ``evaluation.predict``; it never depends on the target label.

The cache keeps one folder per prepared sample, named by a hash of the source files' content,
the target's label values and every setting that changes the result. A folder is written under
a temporary name and renamed into place, so a half-written entry is never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
from skimage.transform import resize

from common.config import DataConfig
from data.records import PreparedVolume, Sample
from data.volume import Volume, VolumeError, check_pair, load_volume

CACHE_VERSION = 5  # bump when the preprocessing or the key changes (2: one window per suite,
# 3: keyed by the digests of the files' content, found by path, size and modification time,
# 4: grey levels truncated as MedSAM2 does, no longer rounded, 5: M3D-Seg arrays keyed by how
# they are read, intensity and axes)
DIGEST_FOLDER = "digests"  # under the cache folder: content digest per (path, size, mtime)
_digests: dict[tuple[str, int, int], str] = {}  # the same, in this process


class WindowMismatchWarning(UserWarning):
    """An image whose intensities do not fit its window (HU window on 0..1 data, or back)."""


def window_to_uint8(hu: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip HU to [low, high], scale linearly to 0..255 and truncate to uint8: MedSAM2's CT
    intensity step (its script casts with ``np.uint8``, which drops the fraction)."""
    scaled = (np.clip(hu.astype(np.float32), low, high) - low) * (255.0 / (high - low))
    return scaled.astype(np.uint8)


def _check_window_fits(values: np.ndarray, window: tuple[float, float], path: Path) -> None:
    # A CT in HU always holds air (about -1000), so an image inside [0, 1] is normalised data,
    # which an HU window turns into one flat grey; the reverse saturates nearly every voxel.
    lo, hi = float(values.min()), float(values.max())
    width = window[1] - window[0]
    normalised = lo >= 0.0 and hi <= 1.0
    if (normalised and width > 2.0) or (width <= 2.0 and (hi - lo) > 100.0):
        warnings.warn(
            f"{path}: intensities span [{lo:.4g}, {hi:.4g}] but the window is {list(window)}; "
            "set data.window or data.suite_windows: preset 'unit' for arrays normalised to "
            "0..1, an HU preset such as 'abdomen' otherwise",
            WindowMismatchWarning,
            stacklevel=3,
        )


def sample_indices(depth: int, num_slices: int) -> np.ndarray:
    """Source axial indices of ``num_slices`` uniformly spaced slices, ends included.

    A volume with fewer slices than ``num_slices`` repeats slices (nearest index)."""
    if depth < 1 or num_slices < 1:
        raise ValueError(f"cannot sample {num_slices} slices from depth {depth}")
    return np.rint(np.linspace(0, depth - 1, num_slices)).astype(np.int64)


def resize_slices(stack: np.ndarray, size: int, is_mask: bool) -> np.ndarray:
    """Resize (S, Y, X) slices to (S, size, size): linear with anti-aliasing for images,
    nearest for masks (no new label values)."""
    if stack.shape[1:] == (size, size):
        return stack.copy()
    out = resize(
        stack,
        (stack.shape[0], size, size),
        order=0 if is_mask else 1,
        anti_aliasing=not is_mask,
        preserve_range=True,
    )
    return out.astype(bool) if is_mask else np.rint(out).astype(np.uint8)


def prepare_arrays(
    image: Volume,
    labels: Volume | None,
    label_values: list[int],
    window: tuple[float, float],
    num_slices: int,
    size: int,
    sample_id: str,
) -> PreparedVolume:
    """Window, sample and resize one image and the binary target made of ``label_values``
    (an empty target when there are no ``labels``: a user's scan to predict on).

    ``window`` is the only intensity mapping, for every file format: arrays stored normalised to
    0..1 take the ``unit`` window (a per-volume min-max would map one tissue to different grey
    levels in different scans). A window that does not fit the data gives a
    :class:`WindowMismatchWarning`.
    """
    if labels is not None:
        check_pair(image, labels)
    index = sample_indices(image.array.shape[0], num_slices)
    hu = image.array[index]
    _check_window_fits(hu, window, image.path)
    slices = window_to_uint8(hu, *window)
    slices = resize_slices(slices, size, is_mask=False)
    if labels is None:
        mask = np.zeros(slices.shape, bool)
    else:
        mask = resize_slices(np.isin(labels.array[index], label_values), size, is_mask=True)
    return PreparedVolume(
        sample_id=sample_id,
        slices=slices,
        mask=mask,
        source_index=index,
        source_shape=tuple(int(s) for s in image.array.shape),
        affine=np.asarray(image.affine, dtype=np.float64),
    )


def _file_digest(path: Path) -> str:
    """sha256 of a file's content (reads the whole file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_digest(path: Path, cache_dir: Path | None = None) -> str:
    """The digest of a file's content, read once per (path, size, modification time): looked up
    in this process, then in ``cache_dir/digests`` (shared by every process and worker on the
    machine), and only computed when neither has it. A file rewritten in place gets a new
    modification time, so a new digest."""
    path = Path(path)
    if path.is_dir():  # a DICOM series: its files' digests in name order
        digest = hashlib.sha256()
        for file in sorted(p for p in path.iterdir() if p.is_file()):
            digest.update(f"{file.name}:{content_digest(file, cache_dir)}\n".encode())
        return digest.hexdigest()
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _digests:
        return _digests[key]
    entry = None
    if cache_dir is not None:
        name = hashlib.sha256(repr(key).encode()).hexdigest()[:32]
        entry = Path(cache_dir) / DIGEST_FOLDER / name
        if entry.exists():
            _digests[key] = entry.read_text().strip()
            return _digests[key]
    value = _file_digest(path)
    if entry is not None:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}")
        tmp.write_text(value)
        tmp.replace(entry)
    _digests[key] = value
    return value


def cache_key(sample: Sample, label_values: list[int], cfg: DataConfig) -> str:
    """Hash of the source content and every setting that changes the prepared arrays. The
    content is hashed once per file version (:func:`content_digest`), not on every access."""
    digest = hashlib.sha256()
    for path in (sample.image, sample.mask):
        digest.update(content_digest(path, cfg.cache_dir).encode())
    settings = {
        "version": CACHE_VERSION,
        "labels": sorted(int(v) for v in label_values),
        "window": list(cfg.window_for(sample.suite)),
        "num_slices": cfg.num_slices,
        "size": cfg.slice_size,
    }
    if sample.image.name.lower().endswith(".npy"):  # an M3D-Seg array: how it is read
        settings["m3d"] = [cfg.m3d_intensity, sample.m3d_axes]
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:32]


def _read_entry(folder: Path, sample_id: str) -> PreparedVolume:
    meta = json.loads((folder / "meta.json").read_text())
    return PreparedVolume(
        sample_id=sample_id,
        slices=np.load(folder / "slices.npy", mmap_mode="r"),
        mask=np.load(folder / "mask.npy", mmap_mode="r"),
        source_index=np.asarray(meta["source_index"], dtype=np.int64),
        source_shape=tuple(meta["source_shape"]),
        affine=np.asarray(meta["affine"], dtype=np.float64),
    )


def _write_entry(folder: Path, prepared: PreparedVolume) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        np.save(tmp / "slices.npy", prepared.slices)
        np.save(tmp / "mask.npy", prepared.mask)
        meta = {
            "source_index": prepared.source_index.tolist(),
            "source_shape": list(prepared.source_shape),
            "affine": prepared.affine.tolist(),
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "meta.json").exists():  # lost a race to a writer that failed
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_volume(sample: Sample, label_values: list[int], cfg: DataConfig) -> PreparedVolume:
    """The sample in the policy's frame, through the on-disk cache when ``cfg.cache_dir`` is set.

    Raises :class:`VolumeError` (naming the file) for unreadable or mismatched volumes and when
    none of ``label_values`` occurs in the mask; nothing is cached in that case.
    """
    folder = None
    if cfg.cache_dir is not None:
        folder = Path(cfg.cache_dir) / cache_key(sample, label_values, cfg)
        if (folder / "meta.json").exists():
            return _read_entry(folder, sample.id)
    image = load_volume(sample.image, "image", sample.m3d_axes, cfg.m3d_intensity)
    labels = load_volume(sample.mask, "mask", sample.m3d_axes)
    if not np.isin(labels.array, label_values).any():
        raise VolumeError(
            f"{sample.mask}: label {sample.label!r} (values {label_values}) is absent from the mask"
        )
    prepared = prepare_arrays(
        image,
        labels,
        label_values,
        cfg.window_for(sample.suite),
        cfg.num_slices,
        cfg.slice_size,
        sample.id,
    )
    if folder is not None:
        _write_entry(folder, prepared)
        return _read_entry(folder, sample.id)
    return prepared


def to_source_grid(mask: np.ndarray, prepared: PreparedVolume) -> np.ndarray:
    """Map an (S, H, W) mask on the sampled slices back to the (Z, Y, X) source grid.

    Each source slice takes the nearest sampled slice along z; in-plane is nearest-neighbour.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != prepared.slices.shape:
        raise ValueError(f"mask shape {mask.shape} != prepared slices {prepared.slices.shape}")
    z_count, height, width = prepared.source_shape
    nearest = np.abs(np.arange(z_count)[:, None] - prepared.source_index[None, :]).argmin(axis=1)
    rows = np.minimum((np.arange(height) + 0.5) * mask.shape[1] / height, mask.shape[1] - 1)
    cols = np.minimum((np.arange(width) + 0.5) * mask.shape[2] / width, mask.shape[2] - 1)
    small = mask[:, rows.astype(np.int64)][:, :, cols.astype(np.int64)]
    return small[nearest]


def box_to_source(box: tuple[int, int, int, int], prepared: PreparedVolume) -> tuple[float, ...]:
    """A [x1, y1, x2, y2] box in the resized slice frame as source-pixel coordinates."""
    _, height, width = prepared.source_shape
    sx, sy = width / prepared.size, height / prepared.size
    x1, y1, x2, y2 = box
    return (x1 * sx, y1 * sy, x2 * sx, y2 * sy)
