"""Turning M3D-Seg subsets (the paper's AbdomenCT-1k, KiTS23 and CT-ORG) into manifest rows.

    python -m data.m3dseg --root M3D_Seg --subsets 0003 0004 0012 \
        --out-file M3D_Seg/manifest.jsonl [--spacing spacing.csv] [--drop-cross-split]

The published layout (dataset card of ``GoodBaiBai88/M3D-Seg`` on Hugging Face: its README,
``data_load_demo.py`` and ``dataset_info.txt``/``dataset_info.json``; the preparation script
``Data/process/m3d_seg_data_preprocess.py`` of ``BAAI-DCAI/M3D``, first written as
``data_process/train_data_process.py`` of ``BAAI-DCAI/SegVol``, of which the card's
``data_process.py`` and ``train_data_prepare.py`` are versions):

- ``<root>/<code>/<code>.json`` lists the cases of subset ``<code>`` (``0000``-``0024``) under
  ``train`` and ``test``; each entry is ``{"image": ..., "label": ...}``, paths relative to
  ``<root>``. Older copies (the first ``data_load_demo.py``) use ``training`` and ``validation``:
  ``training`` is read as ``train``, and ``validation`` as ``test``, since it is the one held-out
  part of the card's "train, validation/test" split (test rows get the held-out phrasings). A
  case listed under both names of one split is read once.
- The image is a ``.npy`` of shape ``(1, H, W, D)``; ``np.load(path)[0]`` is the volume.
- The mask is the dense ``(C, H, W, D)`` array reshaped to ``(C, H*W*D)`` and saved with
  ``scipy.sparse.save_npz``; the dense shape is in the file name, after the last ``.`` of the
  stem (``case_00000.(3, 512, 512, 611).npz``, first demo) or after its last ``_``
  (``mask_(3, 512, 512, 611).npz``, as the preparation script writes it).
- Channel i is the subset's i-th label name in ``dataset_info``; a label a case lacks is an
  all-zero channel (no row is made for it). The preparation script builds channel i as
  ``label map == i + 1``, so channels never overlap: KiTS23's "kidney" channel is the kidney
  without its tumour and cyst (KiTS23 labels 1 kidney, 2 tumor, 3 cyst, one value per voxel).

Label names: the three subsets of the paper are shipped here (``SUBSETS``, the lists of the
card's ``dataset_info.txt`` and of M3D's ``LaMed/src/dataset/dataset_info.py``). For them the
root's ``dataset_info`` is not read: the shipped lists are the published ones, and every mask's
channel count is checked against them, which a different release would fail. Any other subset
takes its list from ``<root>/dataset_info.json`` (an object of code -> names, at the top level or
under ``dataset_info``, ``dataset`` or ``dataset_info_raw``), else ``<root>/dataset_info.txt``
(the card's Python literals, preferring ``dataset_info``, then ``dataset``, then
``dataset_info_raw``), else the ``labels`` map that M3D's preparation script writes into
``<code>.json`` (``{"0": "background", "1": ...}``). Names are kept as published ("kidney
tumor"); :func:`data.queries.target_of` maps them to query targets, and a name with no target
gets the explicit query "Segment the <name>.".

Intensities (the preparation script's ``normalize``): the stored image is not HU and not 0..1.
It is a z-score of the foreground: voxels above the volume's mean are the foreground, the
volume is clipped to the foreground's 0.05 and 99.95 percentiles, then has the foreground's
mean subtracted and is divided by its standard deviation. HU is not stored (the mean and
standard deviation are lost). M3D's own training input (``m3d_seg_data_prepare.py``) is that
array min-max scaled to 0..1, which equals a per-case HU window on the two clip percentiles;
:func:`data.volume.load_volume` returns exactly that by default, for the ``unit`` window
(``WINDOW``). That window spans the whole clip range, about [-155, 1294] HU on a synthetic case:
17.6 grey levels per 100 HU against 63.8 for the abdominal window. ``data.m3d_intensity: hu``
reads the images as approximate HU instead (:func:`data.volume.m3d_hu_map`: the line through
each scan's fat and soft-tissue histogram peaks), so the ``abdomen`` window applies;
configs/paper.yaml says which it uses and why.

Axes: the script loads each NIfTI with MONAI's ``LoadImaged`` and ``AddChanneld`` and its
``Orientationd`` commented out, so ``(H, W, D)`` is the source file's stored voxel order and no
affine is kept. M3D reads it as ``swapaxes(-1, -3)`` -> ``(D, W, H)``, the depth axis last;
:mod:`data.volume` does the same, ``(z, y, x) = (D, W, H)``, which for DICOM-ordered sources
(i = column, j = row, slices inferior to superior) is the canonical LPS frame. Sources stored
axial-first (KiTS, whose own tools index ``shape[0]`` as z) show as two equal trailing axes
and are taken as already ``(z, y, x)``. A cube (512 x 512 x 512) could be either: it is read as
the majority of its subset's other cases is (depth-last on a tie or with no other case). Every
row carries the decision as ``m3d_axes`` (``depth-last`` or ``axial-first``). In-plane flips of
a source are not recoverable without its affine; they move image and mask together, so boxes
and Dice are unaffected, and no label of the three subsets is lateral ("kidney", "kidneys").

Mask values: each row's ``label_values`` is ``[i + 1]`` for channel i; the loader turns the
channels into a label map holding channel i at value i + 1 (and refuses overlapping channels),
so each row selects exactly its channel.

Voxel size: the arrays keep none (the preparation script drops the affine), so surface metrics
(NSD, HD95) on them are in voxels. ``--spacing FILE`` gives it from the source datasets' headers:
a CSV with the header line ``case,h,w,d``, one line per scan: ``case`` is ``<code>/<case name>``
(a row id without its label, ``0004/case_00000``), ``h,w,d`` the voxel size in mm along the
stored (H, W, D) axes, which are the source NIfTI's own axes, so its ``pixdim[1:4]`` in that
order. Rows of a listed scan carry ``spacing`` in the manifest's canonical (z, y, x) order
(:mod:`data.dataset`), turned by the scan's ``m3d_axes``; a scan not listed keeps voxels.

Cross-split scans (beyond M3D-Seg's protocol, which splits each subset at random on its own):
AbdomenCT-1K holds LiTS and KiTS19 scans, CT-ORG is mostly LiTS, KiTS23 holds KiTS19, so one scan
can be in one subset's test split and another's training split. Every image read is
fingerprinted (:func:`fingerprint`: its shape and a hash of a 16^3 thumbnail, the same for the
scan in any axis order or flipped); a test scan whose fingerprint is a training scan's is
reported, with ``--drop-cross-split`` its test rows are dropped. The z-scores depend only on the
voxels, so a scan copied as is into two sources gives the same image; one a source re-cropped,
resampled or re-padded is not found.
"""

from __future__ import annotations

import argparse
import ast
import csv
import hashlib
import itertools
import json
import os
import sys
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from common.cli import ArgumentParser, command
from data.queries import sample_query, target_of
from data.volume import VolumeError, m3d_axes_of, m3d_channel_voxels, m3d_mask_shape

WINDOW = "unit"  # data.window / data.suite_windows preset for M3D-Seg images (loaded as 0..1)


@dataclass(frozen=True)
class Subset:
    """One M3D-Seg subset of the paper: its code, source dataset, suite and channel names."""

    code: str
    dataset: str  # name in dataset_info's dataset_name
    suite: str  # suite its rows are scored under
    labels: tuple[str, ...]  # channel i of every mask is labels[i]


SUBSETS: dict[str, Subset] = {
    s.code: s
    for s in (
        Subset("0003", "AbdomenCT-1k", "abdomenct1k", ("liver", "kidney", "spleen", "pancreas")),
        Subset("0004", "KiTS23", "kits23", ("kidney", "kidney tumor", "kidney cyst")),
        Subset(
            "0012", "CT-ORG", "ctorg", ("liver", "bladder", "lungs", "kidneys", "bone", "brain")
        ),
    )
}

# <code>.json keys and the split each is read as (older copies: training / validation).
SPLIT_KEYS = (("train", "train"), ("training", "train"), ("test", "test"), ("validation", "test"))
INFO_FILES = ("dataset_info.json", "dataset_info.txt")
INFO_NAMES = ("dataset_info", "dataset", "dataset_info_raw")  # preferred first


class M3DSegError(ValueError):
    """An M3D-Seg folder that cannot be read; the message starts with the file at fault."""


def _is_code_map(value: object) -> bool:
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(k, str) and isinstance(v, list) for k, v in value.items())
    )


def _parse_info(path: Path) -> dict[str, list]:
    """The code -> label names map of a ``dataset_info.json`` or ``dataset_info.txt``."""
    try:
        text = path.read_text()
    except OSError as err:
        raise M3DSegError(f"{path}: unreadable ({err.strerror})") from None
    candidates: dict[str, object] = {}
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise M3DSegError(f"{path}: not JSON ({err.msg}, line {err.lineno})") from None
        if _is_code_map(data):
            return data
        if isinstance(data, dict):
            candidates = data
    else:
        try:
            tree = ast.parse(text, filename=str(path))
        except SyntaxError as err:
            raise M3DSegError(
                f"{path}: not Python literals (line {err.lineno}: {err.msg})"
            ) from None
        for node in tree.body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target = node.targets[0]
                if isinstance(target, ast.Name):
                    try:
                        candidates[target.id] = ast.literal_eval(node.value)
                    except ValueError:
                        continue  # not a literal: nothing the card writes that way
    for name in INFO_NAMES:
        if _is_code_map(candidates.get(name)):
            return candidates[name]  # type: ignore[return-value]
    raise M3DSegError(
        f"{path}: no map of subset code -> label names (looked for one of {list(INFO_NAMES)})"
    )


def label_names(root: str | Path, code: str, meta: dict | None = None) -> tuple[str, ...]:
    """The channel names of subset ``code``: shipped, else from the root's ``dataset_info``,
    else from the ``labels`` of its ``<code>.json`` (``meta``); see the module docstring."""
    if code in SUBSETS:
        return SUBSETS[code].labels
    root = Path(root)
    for name in INFO_FILES:
        path = root / name
        if path.is_file():
            info = _parse_info(path)
            if code in info:
                names = info[code]
                if not names or not all(isinstance(n, str) and n.strip() for n in names):
                    raise M3DSegError(f"{path}: subset {code!r} must list label names, got {names}")
                return tuple(" ".join(n.split()) for n in names)
    labels = (meta or {}).get("labels")
    if isinstance(labels, dict):
        try:
            numbered = sorted((int(k), str(v)) for k, v in labels.items() if int(k) > 0)
        except ValueError:
            numbered = []
        if numbered and [k for k, _ in numbered] == list(range(1, len(numbered) + 1)):
            return tuple(" ".join(v.split()) for _, v in numbered)
    raise M3DSegError(
        f"{root / code / f'{code}.json'}: no label names for subset {code!r}: it is not one of the "
        f"shipped subsets {sorted(SUBSETS)}, and neither {' nor '.join(INFO_FILES)} in {root} "
        "nor a 'labels' map numbered 1..C in the index lists it"
    )


def _read_index(root: Path, code: str) -> tuple[Path, dict]:
    if not root.is_dir():
        raise M3DSegError(f"{root}: M3D-Seg root not found (not a folder)")
    index = root / code / f"{code}.json"
    try:
        meta = json.loads(index.read_text())
    except FileNotFoundError:
        raise M3DSegError(f"{index}: index of subset {code!r} not found") from None
    except json.JSONDecodeError as err:
        raise M3DSegError(f"{index}: not JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(meta, dict):
        raise M3DSegError(f"{index}: must be a JSON object with 'train' and 'test' lists")
    return index, meta


def _entries(index: Path, meta: dict) -> list[tuple[str, str, dict]]:
    """(split, where in the index, entry) for every case, train before test, each case once."""
    out, seen = [], set()
    for key, split in SPLIT_KEYS:
        items = meta.get(key)
        if items is None:
            continue
        if not isinstance(items, list):
            raise M3DSegError(f"{index}: field {key!r} must be a list, got {type(items).__name__}")
        for n, entry in enumerate(items):
            if not (
                isinstance(entry, dict)
                and isinstance(entry.get("image"), str)
                and isinstance(entry.get("label"), str)
            ):
                raise M3DSegError(
                    f"{index}: {key}[{n}] must be {{'image': path, 'label': path}}, "
                    f"got {entry!r:.120}"
                )
            pair = (entry["image"], entry["label"])
            if pair not in seen:
                seen.add(pair)
                out.append((split, f"{key}[{n}]", entry))
    if not out:
        raise M3DSegError(f"{index}: no cases under any of {[k for k, _ in SPLIT_KEYS]}")
    return out


def _case_name(image: str) -> str:
    # "0003/case_00000/image.npy" (preparation script) and "0000/ct/case_00000.npy" (first card)
    path = PurePosixPath(image.replace("\\", "/"))
    return path.parent.name if path.stem == "image" else path.stem


def _image_shape(path: Path) -> tuple[int, ...]:
    try:
        shape = np.load(path, mmap_mode="r").shape  # header only
    except (ValueError, OSError, EOFError) as err:
        raise M3DSegError(f"{path}: not a readable .npy array ({err})") from None
    return tuple(shape[1:]) if len(shape) == 4 and shape[0] == 1 else tuple(shape)


def subset_axes(shapes: list[tuple[int, int, int]]) -> str:
    """How a subset's cubes are read: as the majority of its cases whose (H, W, D) shape tells
    (:func:`data.volume.m3d_axes_of`), ``depth-last`` on a tie or when no shape tells."""
    told = Counter(axes for axes in map(m3d_axes_of, shapes) if axes is not None)
    return "axial-first" if told["axial-first"] > told["depth-last"] else "depth-last"


def canonical_spacing(hwd: tuple[float, float, float], axes: str) -> list[float]:
    """A voxel size along the stored (H, W, D) axes as the canonical (z, y, x) the manifest
    takes: reversed for a depth-last array, as is for an axial-first one."""
    return [float(v) for v in (hwd[::-1] if axes == "depth-last" else hwd)]


def read_subset(
    root: str | Path,
    code: str,
    suite: str | None = None,
    seed: int = 0,
    check_masks: bool = True,
    spacing: Mapping[str, tuple[float, float, float]] | None = None,
) -> list[dict]:
    """Manifest rows for every (case, non-empty channel) of subset ``code`` under ``root``.

    Rows carry absolute paths (write them with :func:`write_manifest`), the suite of a shipped
    subset (else ``suite``, else the code), ``label_values`` ``[i + 1]`` for channel i,
    ``m3d_axes`` (a cube decided by :func:`subset_axes`), ``spacing`` (z, y, x) for a scan
    ``spacing`` lists (``<code>/<case>`` -> (H, W, D) mm, :func:`read_spacing`), and a query
    drawn from the split's phrasings of the label's target. With ``check_masks`` False no mask is
    read and every channel gets a row.
    """
    root = Path(root)
    index, meta = _read_index(root, code)
    names = label_names(root, code, meta)
    suite = SUBSETS[code].suite if code in SUBSETS else (suite or code)
    rng = np.random.default_rng(seed)
    cases: dict[str, str] = {}
    found = []
    for split, where, entry in _entries(index, meta):
        image, mask = root / entry["image"], root / entry["label"]
        for field, path in (("image", image), ("label", mask)):
            if not path.is_file():
                raise M3DSegError(f"{path}: file not found ({index}: {where}.{field})")
        case = _case_name(entry["image"])
        if cases.setdefault(case, where) != where:
            raise M3DSegError(
                f"{index}: {where} and {cases[case]} are both case {case!r} "
                f"({entry['image']}); case names must be unique"
            )
        try:
            shape = m3d_mask_shape(mask)
            voxels = m3d_channel_voxels(mask) if check_masks else np.ones(shape[0], np.int64)
        except VolumeError as err:
            raise M3DSegError(str(err)) from None
        if shape[0] != len(names):
            raise M3DSegError(
                f"{mask}: {shape[0]} channels, but subset {code!r} has {len(names)} labels {names}"
            )
        if _image_shape(image) != shape[1:]:
            raise M3DSegError(
                f"{mask}: mask (H, W, D) {shape[1:]} does not match image {image} "
                f"{_image_shape(image)}"
            )
        found.append((split, case, image, mask, shape[1:], voxels))
    cube_axes = subset_axes([shape for *_, shape, _ in found])
    rows: list[dict] = []
    for split, case, image, mask, shape, voxels in found:
        axes = m3d_axes_of(shape) or cube_axes
        size = (spacing or {}).get(f"{code}/{case}")
        for channel, name in enumerate(names):
            if voxels[channel] == 0:
                continue
            target = target_of(name)
            row = {
                "id": f"{code}/{case}/{name.replace(' ', '_')}",
                "image": str(image),
                "mask": str(mask),
                "label": name,
                "query": sample_query(target, split, rng) if target else f"Segment the {name}.",
                "split": split,
                "suite": suite,
                "label_values": [channel + 1],
                "m3d_axes": axes,
            }
            if size is not None:
                row["spacing"] = canonical_spacing(size, axes)
            rows.append(row)
    if not rows:
        raise M3DSegError(f"{index}: every mask of subset {code!r} is empty")
    return rows


def read_spacing(path: str | Path) -> dict[str, tuple[float, float, float]]:
    """The spacing table of ``--spacing``: ``<code>/<case>`` -> voxel size (H, W, D) in mm.

    A CSV whose header line is ``case,h,w,d`` (see the module docstring). Raises
    :class:`M3DSegError` naming the file and line of a missing column, a value that is not a
    positive number or a case listed twice.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise M3DSegError(f"{path}: spacing table unreadable ({err.strerror})") from None
    reader = csv.DictReader(text.splitlines())
    columns = ("case", "h", "w", "d")
    if reader.fieldnames is None or [f.strip() for f in reader.fieldnames] != list(columns):
        raise M3DSegError(f"{path}: the header line must be {','.join(columns)}")
    table: dict[str, tuple[float, float, float]] = {}
    for line, record in enumerate(reader, start=2):
        values = [(record.get(c) or "").strip() for c in columns]
        case = values[0]
        try:
            h, w, d = (float(v) for v in values[1:])
        except ValueError:
            raise M3DSegError(
                f"{path}, line {line}: h, w, d must be numbers, got {values[1:]}"
            ) from None
        if not case or not min(h, w, d) > 0:
            raise M3DSegError(f"{path}, line {line}: needs a case and three positive mm")
        if case in table:
            raise M3DSegError(f"{path}, line {line}: case {case!r} is listed twice")
        table[case] = (h, w, d)
    return table


FINGERPRINT_SIZE = 16  # thumbnail samples per axis
FINGERPRINT_STEP = 0.125  # z units the thumbnail is rounded to before hashing


def fingerprint(path: str | Path) -> str:
    """A digest of an M3D-Seg image, the same for the same voxels in any axis order or flipped.

    The image's sorted shape and a 16^3 thumbnail: at 16 evenly spaced points per axis (placed
    symmetrically, so a flip maps points to points), the mean of the 8 voxels around the point,
    rounded to ``FINGERPRINT_STEP``; of the 48 axis orders and flips of the thumbnail, the one
    whose bytes sort first is hashed. Only the planes those points touch are read.
    """
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as err:
        raise M3DSegError(f"{path}: not a readable .npy array ({err})") from None
    arr = arr[0] if arr.ndim == 4 and arr.shape[0] == 1 else arr
    picks, corners = [], []
    for n in arr.shape:
        centre = (np.arange(FINGERPRINT_SIZE) + 0.5) * n / FINGERPRINT_SIZE - 0.5
        # clipped for an axis under 16 voxels, where the outer points leave the grid
        low = np.clip(np.floor(centre), 0, n - 1).astype(np.int64)
        high = np.clip(np.ceil(centre), 0, n - 1).astype(np.int64)
        pick = np.union1d(low, high)
        picks.append(pick)
        corners.append((np.searchsorted(pick, low), np.searchsorted(pick, high)))
    block = np.asarray(arr[np.ix_(*picks)], dtype=np.float64)
    around = np.stack([block[np.ix_(i, j, k)] for i, j, k in itertools.product(*corners)])
    # summed in sorted order, so a flipped copy (its corners met in another order) sums the same
    thumb = np.sort(around, axis=0).sum(axis=0) / len(around)
    steps = np.rint(thumb / FINGERPRINT_STEP).astype(np.int32)
    views = (
        steps.transpose(order)[tuple(slice(None, None, -1 if f else 1) for f in flips)]
        for order in itertools.permutations(range(3))
        for flips in itertools.product((False, True), repeat=3)
    )
    first = min(np.ascontiguousarray(v).tobytes() for v in views)
    shape = ",".join(str(n) for n in sorted(arr.shape))
    return hashlib.sha256(shape.encode() + b":" + first).hexdigest()[:16]


def scan_of(row: dict) -> str:
    """A row's scan: its id without the label (``0004/case_00000``)."""
    return row["id"].rsplit("/", 1)[0]


def cross_split(rows: list[dict]) -> dict[str, list[str]]:
    """{test scan: the training scans that hold the same image} over ``rows`` (any subsets):
    every image is fingerprinted once (:func:`fingerprint`)."""
    images = {scan_of(r): (r["image"], r["split"]) for r in rows}
    by_print: dict[str, list[tuple[str, str]]] = {}
    for scan, (image, split) in images.items():
        by_print.setdefault(fingerprint(image), []).append((scan, split))
    found: dict[str, list[str]] = {}
    for scans in by_print.values():
        train = sorted(s for s, split in scans if split == "train")
        for scan, split in scans:
            if split == "test" and train:
                found[scan] = train
    return dict(sorted(found.items()))


def write_manifest(rows: list[dict], manifest: str | Path) -> Path:
    """Write rows as a JSONL manifest, paths made relative to the manifest's folder.

    The dataset reads paths relative to the manifest and refuses any that leave its folder, so
    the manifest must sit in the M3D-Seg root or a folder above it.
    """
    manifest = Path(manifest)
    base = manifest.parent.resolve()
    lines = []
    for row in rows:
        row = dict(row)
        for field in ("image", "mask"):
            path = Path(row[field]).resolve()
            if not path.is_relative_to(base):
                raise M3DSegError(
                    f"{manifest}: {field} {path} of row {row['id']!r} is outside the manifest's "
                    f"folder {base}; write the manifest in the M3D-Seg root or a folder above it"
                )
            row[field] = os.path.relpath(path, base)
        lines.append(json.dumps(row))
    manifest.parent.mkdir(parents=True, exist_ok=True)
    tmp = manifest.with_name(f".{manifest.name}.partial")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(manifest)
    return manifest


def _code(value: str) -> str:
    if len(value) != 4 or not value.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not a 4-digit M3D-Seg subset code")
    return value


def report_cross_split(rows: list[dict], drop: bool) -> list[dict]:
    """Print the test scans that are also training scans (count and ids); with ``drop``, the
    rows without their test rows, else ``rows`` as they are."""
    found = cross_split(rows)
    scans = len({scan_of(r) for r in rows})
    print(f"cross-split: {len(found)} test scans of {scans} are also training scans")
    for test, train in found.items():
        print(f"  {test} (test) = {', '.join(train)} (train)")
    if not (drop and found):
        if found:
            print("  kept in test; --drop-cross-split drops them")
        return rows
    kept = [r for r in rows if not (r["split"] == "test" and scan_of(r) in found)]
    print(f"  dropped from test: {len(found)} scans, {len(rows) - len(kept)} rows")
    return kept


@command()
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m data.m3dseg", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="the M3D-Seg folder")
    parser.add_argument(
        "--subsets",
        type=_code,
        nargs="+",
        default=list(SUBSETS),
        metavar="CODE",
        help=f"subset codes (default: the paper's {' '.join(SUBSETS)})",
    )
    parser.add_argument("--out-file", type=Path, required=True, help="manifest to write (JSONL)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the query draws")
    parser.add_argument(
        "--spacing",
        type=Path,
        metavar="FILE",
        help="CSV 'case,h,w,d': voxel size in mm of scan <code>/<case> along the stored "
        "(H, W, D) axes (the source NIfTI's pixdim[1:4]); without it surface metrics are in "
        "voxels",
    )
    parser.add_argument(
        "--drop-cross-split",
        action="store_true",
        help="drop test scans whose image is also a training scan (of this or another subset); "
        "beyond M3D-Seg's own protocol",
    )
    args = parser.parse_args(argv)
    spacing = read_spacing(args.spacing) if args.spacing is not None else None
    rows = []
    for code in args.subsets:
        rows += read_subset(args.root, code, seed=args.seed, spacing=spacing)
    rows = report_cross_split(rows, args.drop_cross_split)
    scans = {scan_of(r) for r in rows}
    sized = {scan_of(r) for r in rows if "spacing" in r}
    print(
        f"spacing: {len(sized)} of {len(scans)} scans from "
        f"{args.spacing or 'no --spacing table'}; surface metrics on the other "
        f"{len(scans) - len(sized)} are in voxels"
    )
    write_manifest(rows, args.out_file)  # written last, under a temporary name
    per_suite = Counter(row["suite"] for row in rows)
    suites = ", ".join(f"{s} {n}" for s, n in per_suite.items())
    print(f"{args.out_file}: {len(rows)} rows ({suites})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
