"""Reading a small folder in the M3D-Seg layout, written here, into samples."""

import json

import numpy as np
from scipy import sparse

from data.config import DataConfig
from data.dataset import VolumeDataset
from data.m3dseg import read_subset, write_manifest


def write_case(root, code, name, rng):
    h, w, d = 40, 40, 12
    image = rng.random((1, h, w, d)).astype(np.float32)
    mask = np.zeros((2, h, w, d), np.uint8)
    mask[0, 5:20, 5:20, 2:10] = 1  # liver
    mask[1, 25:35, 25:35, 4:8] = 1  # kidney
    folder = root / code / code / name
    folder.mkdir(parents=True)
    np.save(folder / "image.npy", image)
    label = folder / f"mask_{mask.shape}.npz"
    sparse.save_npz(label, sparse.csr_matrix(mask.reshape(mask.shape[0], -1)))
    return {
        "image": f"{code}/{code}/{name}/image.npy",
        "label": f"{code}/{code}/{name}/{label.name}",
    }


def test_subset_reads_into_samples_with_the_right_targets(tmp_path):
    rng = np.random.default_rng(0)
    meta = {
        "labels": {"1": "liver", "2": "kidney"},
        "train": [write_case(tmp_path, "0011", "case_1", rng)],
        "test": [write_case(tmp_path, "0011", "case_2", rng)],
    }
    (tmp_path / "0011" / "0011.json").write_text(json.dumps(meta))
    rows = read_subset(tmp_path, "0011")
    assert [(r["label"], r["split"], r["suite"]) for r in rows] == [
        ("liver", "train", "ctorg"),
        ("kidney", "train", "ctorg"),
        ("liver", "test", "ctorg"),
        ("kidney", "test", "ctorg"),
    ]
    manifest = write_manifest(rows, tmp_path / "manifest.jsonl")
    ds = VolumeDataset(manifest, DataConfig(num_slices=8, slice_size=40))
    sample, prepared = ds.by_id("0011/case_1/kidney")
    assert prepared.slices.shape == (8, 40, 40)
    # kidney occupies axial slices 4..7 of 12, rows/cols 25..34 of the (H, W) plane
    z = prepared.source_index
    assert prepared.mask.any(axis=(1, 2)).tolist() == [4 <= i < 8 for i in z]
    assert prepared.mask[prepared.mask.any(axis=(1, 2))][0][25:35, 25:35].all()
