"""Turning M3D-Seg subsets (the paper's AbdomenCT-1k, KiTS23 and CT-ORG) into manifest rows.

    python -m data.m3dseg --root M3D_Seg --subsets 0003 0004 0012 --out M3D_Seg/manifest.jsonl

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
mean subtracted and is divided by its standard deviation. HU cannot be recovered (mean and
standard deviation are not stored). M3D's own training input (``m3d_seg_data_prepare.py``) is
that array min-max scaled to 0..1, which equals a per-case HU window on the two clip
percentiles; :func:`data.volume.load_volume` returns exactly that, so M3D-Seg images take the
``unit`` window (``WINDOW``: set ``data.window: unit`` for an M3D-Seg manifest, as
configs/paper.yaml does).

Axes: the script loads each NIfTI with MONAI's ``LoadImaged`` and ``AddChanneld`` and its
``Orientationd`` commented out, so ``(H, W, D)`` is the source file's stored voxel order and no
affine is kept. M3D reads it as ``swapaxes(-1, -3)`` -> ``(D, W, H)``, the depth axis last;
:mod:`data.volume` does the same, ``(z, y, x) = (D, W, H)``, which for DICOM-ordered sources
(i = column, j = row, slices inferior to superior) is the canonical LPS frame. Sources stored
axial-first (KiTS, whose own tools index ``shape[0]`` as z) show as two equal trailing axes
and are taken as already ``(z, y, x)``. In-plane flips of a source are not recoverable without
its affine; they move image and mask together, so boxes and Dice are unaffected, and no label
of the three subsets is lateral ("kidney", "kidneys").

Mask values: each row's ``label_values`` is ``[i + 1]`` for channel i; the loader turns the
channels into a label map holding channel i at value i + 1 (and refuses overlapping channels),
so each row selects exactly its channel.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from data.cli import ArgumentParser, run_cli
from data.queries import sample_query, target_of
from data.volume import VolumeError, m3d_channel_voxels, m3d_mask_shape

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


def read_subset(
    root: str | Path, code: str, suite: str | None = None, seed: int = 0, check_masks: bool = True
) -> list[dict]:
    """Manifest rows for every (case, non-empty channel) of subset ``code`` under ``root``.

    Rows carry absolute paths (write them with :func:`write_manifest`), the suite of a shipped
    subset (else ``suite``, else the code), ``label_values`` ``[i + 1]`` for channel i, the
    window preset ``WINDOW`` and a query drawn from the split's phrasings of the label's target.
    With ``check_masks`` False no mask is read and every channel gets a row.
    """
    root = Path(root)
    index, meta = _read_index(root, code)
    names = label_names(root, code, meta)
    suite = SUBSETS[code].suite if code in SUBSETS else (suite or code)
    rng = np.random.default_rng(seed)
    rows: list[dict] = []
    cases: dict[str, str] = {}
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
        for channel, name in enumerate(names):
            if voxels[channel] == 0:
                continue
            target = target_of(name)
            rows.append(
                {
                    "id": f"{code}/{case}/{name.replace(' ', '_')}",
                    "image": str(image),
                    "mask": str(mask),
                    "label": name,
                    "query": sample_query(target, split, rng) if target else f"Segment the {name}.",
                    "split": split,
                    "suite": suite,
                    "label_values": [channel + 1],
                }
            )
    if not rows:
        raise M3DSegError(f"{index}: every mask of subset {code!r} is empty")
    return rows


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
    parser.add_argument("--out", type=Path, required=True, help="manifest to write (JSONL)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the query draws")
    args = parser.parse_args(argv)
    rows = []
    for code in args.subsets:
        rows += read_subset(args.root, code, seed=args.seed)
    write_manifest(rows, args.out)  # written last, under a temporary name
    per_suite = Counter(row["suite"] for row in rows)
    print(f"{args.out}: {len(rows)} rows ({', '.join(f'{s} {n}' for s, n in per_suite.items())})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
