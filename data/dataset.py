"""A manifest-driven dataset of typed samples, validated up front, prepared through the cache.

Manifest: JSONL, one sample per line, paths relative to the manifest's folder (the data root)::

    {"id": "kits23_0002/kidney_tumour", "image": "images/kits23_0002.nii.gz",
     "mask": "labels/kits23_0002.nii.gz", "label": "kidney tumour", "query": "...",
     "split": "train", "suite": "kits23", "label_values": [9, 10]}

``label_values`` (the voxel values of the label map that form the target) and ``suite`` are
optional: without ``label_values`` the mask is read as binary (any non-zero voxel), without
``suite`` the sample belongs to suite "default".

Two more optional fields are for M3D-Seg arrays (.npy / .npz), which store no geometry;
``python -m data.m3dseg`` writes them, and a NIfTI or DICOM row may not carry them:

- ``"spacing": [z, y, x]``: the voxel size in mm along the canonical axes of
  :mod:`data.volume` (z: slice spacing, y: row, x: column; :attr:`data.volume.Volume.spacing`
  uses the same order). Without it, surface metrics on the case are in voxels.
- ``"m3d_axes"``: ``"depth-last"`` or ``"axial-first"``, how the stored axes are read
  (:mod:`data.volume`); without it the shape tells, and a cube is read depth-last.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from common.config import DataConfig
from data.preprocess import cache_key, prepare_volume
from data.queries import use_queries_file
from data.records import PreparedVolume, Sample
from data.volume import M3D_AXES, VolumeError

REQUIRED = ("id", "image", "mask", "label", "query", "split")
SPLITS = ("train", "test", "val")


class ManifestError(ValueError):
    """A manifest row that cannot be used; names the manifest, row number, field and file."""


def _header_geometry(path: Path) -> tuple[tuple[int, ...], np.ndarray] | None:
    """Shape and affine from a NIfTI header without reading voxels (None for other formats)."""
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return None
    img = nib.load(str(path))
    return tuple(int(s) for s in img.shape[:3]), np.asarray(img.affine)


class VolumeDataset:
    """Samples of a manifest, each prepared to the policy's frame on first use and cached.

    ``ds[i]`` gives ``(Sample, PreparedVolume)``; ``ds.by_id(id)`` the same by sample id.
    """

    def __init__(
        self,
        manifest: str | Path,
        cfg: DataConfig,
        split: str | None = None,
        check_labels: bool = True,
    ):
        self.manifest = Path(manifest).resolve()
        self.root = self.manifest.parent
        self.cfg = cfg
        use_queries_file(cfg.queries_file)  # training draws ask from the config's phrasings
        if split is not None and split not in SPLITS:
            raise ManifestError(f"{self.manifest}: unknown split {split!r}; use one of {SPLITS}")
        samples, values = self._read(check_labels)
        keep = [i for i, s in enumerate(samples) if split is None or s.split == split]
        self.samples: list[Sample] = [samples[i] for i in keep]
        self._values = {samples[i].id: values[i] for i in keep}
        self._index = {s.id: i for i, s in enumerate(self.samples)}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Sample, PreparedVolume]:
        sample = self.samples[i]
        return sample, self.prepare(sample)

    def by_id(self, sample_id: str) -> tuple[Sample, PreparedVolume]:
        if sample_id not in self._index:
            raise KeyError(f"{self.manifest}: no sample with id {sample_id!r}")
        return self[self._index[sample_id]]

    def label_values(self, sample_id: str) -> list[int]:
        return self._values[sample_id]

    def prepare(self, sample: Sample) -> PreparedVolume:
        try:
            return prepare_volume(sample, self._values[sample.id], self.cfg)
        except VolumeError as err:
            raise VolumeError(f"{self.manifest} sample {sample.id!r}: {err}") from None

    def _fail(self, row: int, message: str) -> ManifestError:
        return ManifestError(f"{self.manifest}, row {row}: {message}")

    def _path(self, row: int, record: dict, field: str) -> Path:
        raw = record[field]
        if not isinstance(raw, str) or not raw:
            raise self._fail(row, f"field {field!r} must be a non-empty path, got {raw!r}")
        path = (self.root / raw).resolve()
        if not path.is_relative_to(self.root):
            raise self._fail(row, f"field {field!r} path {raw!r} leaves the data root {self.root}")
        if not (path.is_file() or (field == "image" and path.is_dir())):  # a DICOM series
            raise self._fail(row, f"field {field!r}: file not found: {path}")
        return path

    def _read(self, check_labels: bool) -> tuple[list[Sample], list[list[int]]]:
        try:
            lines = self.manifest.read_text().splitlines()
        except FileNotFoundError:
            raise ManifestError(f"{self.manifest}: manifest not found") from None
        samples: list[Sample] = []
        values: list[list[int]] = []
        seen: set[str] = set()
        for row, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise self._fail(row, f"not JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise self._fail(row, "not a JSON object")
            missing = [f for f in REQUIRED if f not in record]
            if missing:
                raise self._fail(row, f"missing field(s) {missing}")
            for field in ("id", "label", "query", "split"):
                if not isinstance(record[field], str) or not record[field].strip():
                    raise self._fail(
                        row, f"field {field!r} must be a non-empty string, got {record[field]!r}"
                    )
            if record["id"] in seen:
                raise self._fail(row, f"duplicate id {record['id']!r}")
            seen.add(record["id"])
            if record["split"] not in SPLITS:
                raise self._fail(row, f"field 'split' is {record['split']!r}, not one of {SPLITS}")
            label_values = record.get("label_values")
            if label_values is None:
                label_values = list(range(1, 256))
            elif (
                not isinstance(label_values, list)
                or not label_values
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in label_values)
            ):
                raise self._fail(
                    row,
                    f"field 'label_values' must be a non-empty list of "
                    f"integers, got {label_values!r}",
                )
            image = self._path(row, record, "image")
            mask = self._path(row, record, "mask")
            sample = Sample(
                id=record["id"],
                image=image,
                mask=mask,
                label=record["label"],
                query=record["query"],
                split=record["split"],
                suite=str(record.get("suite", "default")),
                spacing=self._spacing(row, record, image),
                m3d_axes=self._m3d_axes(row, record, image),
            )
            self._check_pair(row, sample)
            if check_labels:
                self._check_label(row, sample, label_values)
            samples.append(sample)
            values.append(label_values)
        if not samples:
            raise ManifestError(f"{self.manifest}: no samples")
        return samples, values

    def _no_geometry(self, row: int, field: str, image: Path) -> None:
        if not image.name.lower().endswith(".npy"):
            raise self._fail(
                row,
                f"field {field!r} is for M3D-Seg arrays (.npy), which store no geometry; "
                f"{image} carries its own",
            )

    def _spacing(self, row: int, record: dict, image: Path) -> tuple[float, float, float] | None:
        value = record.get("spacing")
        if value is None:
            return None
        self._no_geometry(row, "spacing", image)
        if (
            not isinstance(value, list)
            or len(value) != 3
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
            or not all(v > 0 for v in value)
        ):
            raise self._fail(
                row, f"field 'spacing' must be [z, y, x], three positive mm, got {value!r}"
            )
        z, y, x = (float(v) for v in value)
        return z, y, x

    def _m3d_axes(self, row: int, record: dict, image: Path) -> str | None:
        value = record.get("m3d_axes")
        if value is None:
            return None
        self._no_geometry(row, "m3d_axes", image)
        if value not in M3D_AXES:
            raise self._fail(row, f"field 'm3d_axes' is {value!r}, not one of {M3D_AXES}")
        return value

    def _check_pair(self, row: int, sample: Sample) -> None:
        try:
            image, mask = _header_geometry(sample.image), _header_geometry(sample.mask)
        except Exception as err:  # noqa: BLE001 - any unreadable header is reported the same way
            raise self._fail(row, f"unreadable NIfTI header ({err})") from None
        if image is None or mask is None:
            return
        if image[0] != mask[0]:
            raise self._fail(
                row,
                f"mask {sample.mask} shape {mask[0]} does not match image "
                f"{sample.image} shape {image[0]}",
            )
        if not np.allclose(image[1], mask[1], atol=1e-3):
            raise self._fail(row, f"mask {sample.mask} affine does not match image {sample.image}")

    def _check_label(self, row: int, sample: Sample, label_values: list[int]) -> None:
        if self.cfg.cache_dir is not None:
            folder = Path(self.cfg.cache_dir) / cache_key(sample, label_values, self.cfg)
            if (folder / "meta.json").exists():  # cached entries were checked when written
                return
        try:
            data = (
                np.asanyarray(nib.load(str(sample.mask)).dataobj)
                if sample.mask.name.lower().endswith((".nii", ".nii.gz"))
                else None
            )
        except Exception as err:  # noqa: BLE001
            raise self._fail(row, f"{sample.mask}: unreadable mask ({err})") from None
        if data is not None and not np.isin(data, label_values).any():
            raise self._fail(
                row,
                f"label {sample.label!r} (values {label_values[:8]}) is absent "
                f"from mask {sample.mask}",
            )


def anchorable(dataset: VolumeDataset) -> tuple[list[int], list[str]]:
    """Indices of the samples that can anchor an answer, and the ids of those that cannot: no
    sampled slice holds a component of the target of ``min_box_area`` pixels (a small target
    can fall between sampled slices). SFT has no target for them and GRPO no learning signal
    (every completion would score alike), so both skip them."""
    from data.targets import anchor_slices

    usable, skipped = [], []
    for i, sample in enumerate(dataset.samples):
        if anchor_slices(dataset[i][1], dataset.cfg.min_box_area).size:
            usable.append(i)
        else:
            skipped.append(sample.id)
    return usable, skipped
