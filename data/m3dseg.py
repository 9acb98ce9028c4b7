"""Reading the M3D-Seg on-disk layout (per-case arrays plus label texts) into manifest rows.

M3D-Seg keeps one folder per subset, named by its code (e.g. ``0011`` for CT-ORG), holding
``<code>.json``::

    {"labels": {"1": "liver", "2": "bladder", ...},
     "train": [{"image": "0011/0011/case_1/image.npy",
                "label": "0011/0011/case_1/mask_(6, 512, 512, 100).npz"}, ...],
     "test": [...]}

with paths relative to the M3D-Seg root, each image a ``(1, H, W, D)`` array and each mask a
sparse matrix saved with ``scipy.sparse.save_npz`` whose file name carries the dense shape
``(C, H, W, D)``, one channel per label (channel c is label c + 1). ``data.volume.load_volume``
reads both; this module turns a subset into manifest rows the dataset takes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from data.dataset import ManifestError
from data.queries import QUERIES, sample_query
from data.volume import load_volume

# M3D-Seg subset codes of the paper's three datasets, and the suite each is scored under.
SUBSETS = {"0011": "ctorg", "0013": "abdomenct1k", "0020": "kits23"}


def read_subset(
    root: str | Path, code: str, suite: str | None = None, seed: int = 0, check_masks: bool = True
) -> list[dict]:
    """Manifest rows for every (case, label) of subset ``code`` under the M3D-Seg ``root``.

    Rows carry absolute paths (write them with :func:`write_manifest` next to the data, or pass
    the root as the manifest's folder). A label known to :mod:`data.queries` gets a query drawn
    from its split's phrasings; other labels get an explicit "Segment the <label>." query.
    """
    root = Path(root)
    index = root / code / f"{code}.json"
    try:
        meta = json.loads(index.read_text())
    except FileNotFoundError:
        raise ManifestError(f"M3D-Seg index not found: {index}") from None
    except json.JSONDecodeError as err:
        raise ManifestError(f"{index}: not JSON ({err.msg})") from None
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise ManifestError(f"{index}: field 'labels' must map label numbers to names")
    rng = np.random.default_rng(seed)
    rows = []
    for split in ("train", "test"):
        for n, case in enumerate(meta.get(split, [])):
            image, mask = root / case["image"], root / case["label"]
            present = None
            if check_masks:
                present = set(np.unique(load_volume(mask, "mask").array).tolist())
            case_name = Path(case["image"]).parent.name or f"case_{n}"
            for number, name in sorted(labels.items(), key=lambda kv: int(kv[0])):
                value = int(number)
                if value == 0 or (present is not None and value not in present):
                    continue
                name = str(name).strip().lower()
                query = (
                    sample_query(name, split, rng) if name in QUERIES else f"Segment the {name}."
                )
                rows.append(
                    {
                        "id": f"{code}/{case_name}/{name.replace(' ', '_')}",
                        "image": str(image),
                        "mask": str(mask),
                        "label": name,
                        "query": query,
                        "split": split,
                        "suite": suite or SUBSETS.get(code, code),
                        "label_values": [value],
                    }
                )
    if not rows:
        raise ManifestError(f"{index}: no cases with labels present")
    return rows


def write_manifest(rows: list[dict], manifest: str | Path) -> Path:
    """Write rows as a JSONL manifest, paths made relative to the manifest's folder."""
    manifest = Path(manifest)
    base = manifest.parent.resolve()
    lines = []
    for row in rows:
        row = dict(row)
        for field in ("image", "mask"):
            row[field] = os.path.relpath(Path(row[field]).resolve(), base)
        lines.append(json.dumps(row))
    manifest.parent.mkdir(parents=True, exist_ok=True)
    tmp = manifest.with_name(f".{manifest.name}.partial")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(manifest)
    return manifest
