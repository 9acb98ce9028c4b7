"""Write a manifest for a folder of CT images and a folder of label maps (nnU-Net's layout or any).

::

    python -m data.manifest --images imagesTr --labels labelsTr --labels-json dataset.json \\
        --out-file manifest.jsonl [--suite NAME] [--test-fraction F --val-fraction F --seed S |
        --split-file FILE] [--queries-file FILE]

- Images are NIfTI files (``.nii``, ``.nii.gz``) or DICOM series, one folder per series. A label
  map is the NIfTI file of the same name in ``--labels``; nnU-Net's channel suffix is understood
  (image ``case_0000.nii.gz`` pairs with label ``case.nii.gz``), and ``case`` names the scan.
- ``--labels-json`` is nnU-Net v2's ``dataset.json`` (its ``labels`` map) or a bare map
  ``{"background": 0, "liver": 1, "tumour": 2}``; a value may be a list, as nnU-Net's region
  labels (``"kidney_and_masses": [1, 2, 3]``). Value 0 (background) is never a target.
- One row per (scan, label of the map present in that scan's label map), id
  ``<case>/<label_with_underscores>``, its ``label_values`` from the map and a query drawn with
  ``--seed`` from the label's phrasings (:mod:`data.queries`): training phrasings for train rows,
  held-out ones for val and test rows.
- Splits are made per scan, so every target of a scan is in one split: seeded fractions, or a
  split file ``{"train": [case, ...], "val": [...], "test": [...]}`` that lists every case.
- The manifest's paths are relative to its folder, and the dataset refuses paths that leave it:
  ``--out-file`` must lie in a folder that holds both ``--images`` and ``--labels``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from common.cli import ArgumentParser, UsageError, command, existing_file
from data.dataset import SPLITS
from data.queries import sample_query, use_queries_file
from data.volume import VolumeError, load_volume

log = logging.getLogger(__name__)

NIFTI = (".nii.gz", ".nii")
NNUNET_CHANNEL = "_0000"  # nnU-Net's suffix of a CT image's one channel


class ManifestInputError(ValueError):
    """Images, label maps, a labels JSON or a split file that cannot make a manifest; the
    message names the file."""


@dataclass(frozen=True)
class Case:
    """One scan: its image (a NIfTI file or a DICOM series folder) and its label map."""

    name: str
    image: Path
    label: Path


def _stem(path: Path) -> str | None:
    """A NIfTI file's name without its extension; None for any other file."""
    lower = path.name.lower()
    for ext in NIFTI:
        if lower.endswith(ext):
            return path.name[: -len(ext)]
    return None


def find_images(folder: Path) -> dict[str, Path]:
    """{name: image} of the NIfTI files and DICOM series folders directly in ``folder``."""
    from data.dicom import is_series_folder

    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        name = path.name if path.is_dir() and is_series_folder(path) else _stem(path)
        if name is not None and not name.startswith("."):
            found[name] = path
    return found


def find_labels(folder: Path) -> dict[str, Path]:
    """{name: label map} of the NIfTI files directly in ``folder``."""
    found = {_stem(p): p for p in sorted(folder.iterdir()) if p.is_file()}
    return {name: p for name, p in found.items() if name is not None and not name.startswith(".")}


def pair(images: dict[str, Path], labels: dict[str, Path]) -> list[Case]:
    """Cases of images and label maps of the same name, an image's nnU-Net channel suffix
    dropped when only that matches. Raises :class:`ManifestInputError` listing every image
    without a label map and every label map without an image."""
    cases, lonely = [], []
    for name, image in images.items():
        if name in labels:
            cases.append(Case(name, image, labels[name]))
        elif name.endswith(NNUNET_CHANNEL) and name.removesuffix(NNUNET_CHANNEL) in labels:
            case = name.removesuffix(NNUNET_CHANNEL)
            cases.append(Case(case, image, labels[case]))
        else:
            lonely.append(image)
    names = Counter(c.name for c in cases)
    twice = [str(c.image) for c in cases if names[c.name] > 1]
    if twice:
        raise ManifestInputError(f"images of the same case: {', '.join(twice)}")
    orphans = sorted(set(labels.values()) - {c.label for c in cases})
    problems = []
    if lonely:
        problems.append(f"images without a label map: {', '.join(map(str, lonely))}")
    if orphans:
        problems.append(f"label maps without an image: {', '.join(map(str, orphans))}")
    if problems:
        raise ManifestInputError("; ".join(problems))
    return cases


def read_label_map(path: Path) -> dict[str, list[int]]:
    """{label name: voxel values} of nnU-Net's ``dataset.json`` (its ``labels``) or a bare map,
    background (value 0) left out."""
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ManifestInputError(f"{path}: not JSON ({err.msg})") from None
    table = raw.get("labels", raw) if isinstance(raw, dict) else None
    if not isinstance(table, dict) or not table:
        raise ManifestInputError(
            f"{path}: no labels map; expected nnU-Net's dataset.json with 'labels' or "
            '{"background": 0, "liver": 1, ...}'
        )
    labels: dict[str, list[int]] = {}
    for name, value in table.items():
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ManifestInputError(
                f"{path}: label {name!r} must be a voxel value or a list of them, got {value!r}"
            )
        values = [v for v in values if v != 0]
        if values:
            labels[name] = values
    if not labels:
        raise ManifestInputError(f"{path}: the labels map names only the background")
    return labels


def read_split_file(path: Path, cases: list[str]) -> dict[str, str]:
    """{case: split} of a split file; every case listed once, no other names."""
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ManifestInputError(f"{path}: not JSON ({err.msg})") from None
    if not isinstance(raw, dict) or set(raw) - set(SPLITS):
        raise ManifestInputError(f"{path}: expected an object with keys among {SPLITS}")
    split_of: dict[str, str] = {}
    for split, names in raw.items():
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ManifestInputError(f"{path}: {split!r} must be a list of case names")
        for name in names:
            if name in split_of:
                raise ManifestInputError(
                    f"{path}: case {name!r} is in both {split_of[name]!r} and {split!r}"
                )
            split_of[name] = split
    unknown = sorted(set(split_of) - set(cases))
    missing = sorted(set(cases) - set(split_of))
    if unknown or missing:
        raise ManifestInputError(
            f"{path}: cases not found in the images: {unknown}; cases not listed: {missing}"
        )
    return split_of


def seeded_split(
    cases: list[str], test_fraction: float, val_fraction: float, seed: int
) -> dict[str, str]:
    """{case: split}: the cases shuffled with ``seed``, the first ``test_fraction`` of them
    (rounded) to test, the next ``val_fraction`` to val, the rest to train."""
    order = [cases[i] for i in np.random.default_rng(seed).permutation(len(cases))]
    n_test = round(test_fraction * len(cases))
    n_val = round(val_fraction * len(cases))
    return {
        case: "test" if k < n_test else "val" if k < n_test + n_val else "train"
        for k, case in enumerate(order)
    }


def _nifti_header(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    try:
        img = nib.load(str(path))
    except Exception as err:  # noqa: BLE001 - any unreadable header is reported the same way
        raise ManifestInputError(f"{path}: unreadable NIfTI ({err})") from None
    return tuple(int(s) for s in img.shape), np.asarray(img.affine)


def present_values(case: Case) -> np.ndarray:
    """The voxel values of a case's label map, after checking that it lies on its image's grid
    (stored shapes and affines for a NIfTI image, canonical ones for a DICOM series), as the
    dataset checks it."""
    if case.image.is_dir():
        try:
            image, labels = load_volume(case.image), load_volume(case.label, "mask")
        except VolumeError as err:
            raise ManifestInputError(str(err)) from None
        (image_shape, image_affine), (label_shape, label_affine) = (
            (image.array.shape, image.affine),
            (labels.array.shape, labels.affine),
        )
        data = labels.array
    else:
        image_shape, image_affine = _nifti_header(case.image)
        label_shape, label_affine = _nifti_header(case.label)
        data = np.asanyarray(nib.load(str(case.label)).dataobj)
    if image_shape != label_shape:
        raise ManifestInputError(
            f"label map {case.label} shape {label_shape} does not match image {case.image} "
            f"shape {image_shape}"
        )
    if not np.allclose(image_affine, label_affine, atol=1e-3):
        raise ManifestInputError(
            f"label map {case.label} affine does not match image {case.image}: "
            f"{label_affine[:3].round(3).tolist()} vs {image_affine[:3].round(3).tolist()}"
        )
    return np.unique(data)


def build_rows(
    cases: list[Case],
    labels: dict[str, list[int]],
    split_of: dict[str, str],
    suite: str,
    seed: int,
    progress: bool = True,
) -> tuple[list[dict], list[str]]:
    """Manifest rows (absolute paths) of every (case, label present in it), and the labels
    found in no case."""
    rng = np.random.default_rng(seed)
    rows, seen = [], set()
    for case in tqdm(cases, desc="label maps", disable=not progress or len(cases) < 10):
        present = present_values(case)
        split = split_of[case.name]
        for name, values in labels.items():
            if not np.isin(values, present).any():
                continue
            seen.add(name)
            rows.append(
                {
                    "id": f"{case.name}/{'_'.join(name.split())}",
                    "image": str(case.image),
                    "mask": str(case.label),
                    "label": " ".join(name.replace("_", " ").split()),
                    "query": sample_query(name, split, rng),
                    "split": split,
                    "suite": suite,
                    "label_values": values,
                }
            )
    return rows, [name for name in labels if name not in seen]


def write_manifest(rows: list[dict], manifest: Path) -> Path:
    """Write rows as JSONL with paths relative to the manifest's folder, under a temporary name
    renamed at the end."""
    base = manifest.parent.resolve()
    lines = []
    for row in rows:
        row = {
            **row,
            **{f: os.path.relpath(Path(row[f]).resolve(), base) for f in ("image", "mask")},
        }
        lines.append(json.dumps(row))
    tmp = manifest.with_name(f".{manifest.name}.partial")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(manifest)
    return manifest


def _fraction(value: str) -> float:
    try:
        f = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0 <= f < 1:
        raise argparse.ArgumentTypeError(f"{value} is not in [0, 1)")
    return f


def _folder(value: str) -> Path:
    path = Path(value)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value}: not a folder")
    return path


@command()
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m data.manifest", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--images",
        metavar="DIR",
        type=_folder,
        required=True,
        help="NIfTI files or DICOM series folders",
    )
    parser.add_argument(
        "--labels", metavar="DIR", type=_folder, required=True, help="NIfTI label maps"
    )
    parser.add_argument(
        "--labels-json",
        metavar="FILE",
        type=existing_file,
        required=True,
        help="nnU-Net's dataset.json or a bare {name: value} map",
    )
    parser.add_argument(
        "--out-file",
        metavar="MANIFEST",
        type=Path,
        required=True,
        help="manifest to write (JSONL)",
    )
    parser.add_argument(
        "--suite", metavar="NAME", default="default", help="suite of every row (default: default)"
    )
    parser.add_argument(
        "--test-fraction", metavar="F", type=_fraction, help="share of scans for test (0.2)"
    )
    parser.add_argument(
        "--val-fraction", metavar="F", type=_fraction, help="share of scans for val (0)"
    )
    parser.add_argument(
        "--seed", metavar="S", type=int, default=0, help="seeds the split and the queries"
    )
    parser.add_argument(
        "--split-file", metavar="FILE", type=existing_file, help="JSON {split: [case, ...]}"
    )
    parser.add_argument(
        "--queries-file",
        metavar="FILE",
        type=existing_file,
        help="YAML of phrasings (as data.queries_file)",
    )
    args = parser.parse_args(argv)
    if args.split_file is not None and (args.test_fraction, args.val_fraction) != (None, None):
        raise UsageError("--split-file: give it or --test-fraction/--val-fraction, not both")
    test_fraction = 0.2 if args.test_fraction is None else args.test_fraction
    val_fraction = args.val_fraction or 0.0
    if test_fraction + val_fraction >= 1:
        raise UsageError(
            f"--test-fraction {test_fraction} + --val-fraction {val_fraction}: no scan left "
            "for training"
        )
    base = args.out_file.parent.resolve()
    for flag, folder in (("--images", args.images), ("--labels", args.labels)):
        if not folder.resolve().is_relative_to(base):
            raise UsageError(
                f"--out-file {args.out_file}: the manifest's folder {base} must hold {flag} "
                f"{folder} "
                "(the dataset reads paths relative to the manifest and refuses any outside it)"
            )
    use_queries_file(args.queries_file)
    labels = read_label_map(args.labels_json)
    images = find_images(args.images)
    if not images:
        raise ManifestInputError(f"{args.images}: no NIfTI file or DICOM series folder")
    cases = pair(images, find_labels(args.labels))
    names = [c.name for c in cases]
    split_of = (
        read_split_file(args.split_file, names)
        if args.split_file is not None
        else seeded_split(names, test_fraction, val_fraction, args.seed)
    )
    rows, unseen = build_rows(cases, labels, split_of, args.suite, args.seed)
    for name in unseen:
        log.warning(
            "%s: label %r (values %s) is in no label map", args.labels_json, name, labels[name]
        )
    if not rows:
        raise ManifestInputError(f"{args.labels}: no label of {args.labels_json} in any label map")
    write_manifest(rows, args.out_file)
    scans = Counter(split_of.values())
    per_split = Counter(r["split"] for r in rows)
    print(
        f"{args.out_file}: {len(rows)} rows of {len(cases)} scans ("
        + ", ".join(f"{s} {per_split[s]} rows / {scans[s]} scans" for s in SPLITS if scans[s])
        + ")"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
