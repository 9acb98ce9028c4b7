"""Manifest validation: each bad row is reported with the row number, the field and the file."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from common.config import DataConfig
from data.dataset import ManifestError, VolumeDataset
from data.preprocess import DIGEST_FOLDER
from data.volume import VolumeError

CFG = DataConfig(num_slices=8, slice_size=32)


@pytest.fixture()
def root(phantom_manifest, tmp_path):
    dst = tmp_path / "data"
    shutil.copytree(phantom_manifest.parent, dst)
    return dst


def rows(root):
    return [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]


def rewrite(root, rows_):
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_))
    return root / "manifest.jsonl"


def test_valid_manifest_gives_typed_samples_and_splits(phantom_manifest):
    ds = VolumeDataset(phantom_manifest, CFG)
    train = VolumeDataset(phantom_manifest, CFG, split="train")
    test = VolumeDataset(phantom_manifest, CFG, split="test")
    assert len(train) + len(test) == len(ds) and len(test) > 0
    sample, prepared = train[0]
    assert sample.image.is_absolute() and prepared.sample_id == sample.id
    assert {s.suite for s in ds.samples} == {"ctorg", "abdomenct1k", "kits23"}


def test_missing_file_names_row_field_and_file(root):
    r = rows(root)
    r[2]["image"] = "images/nope.nii.gz"
    with pytest.raises(ManifestError, match=r"row 3: field 'image': file not found: .*nope.nii.gz"):
        VolumeDataset(rewrite(root, r), CFG)


def test_path_escaping_the_data_root(root):
    r = rows(root)
    r[0]["mask"] = "../../etc/passwd"
    with pytest.raises(ManifestError, match="row 1: field 'mask' path '../../etc/passwd' leaves"):
        VolumeDataset(rewrite(root, r), CFG)


def test_image_mask_shape_and_affine_mismatch(root):
    r = rows(root)
    small = nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), np.eye(4))
    nib.save(small, str(root / "labels" / "small.nii.gz"))
    r[1]["mask"] = "labels/small.nii.gz"
    with pytest.raises(ManifestError, match=r"row 2: mask .*small.nii.gz shape"):
        VolumeDataset(rewrite(root, r), CFG)
    image = nib.load(str(root / r[0]["image"]))
    moved = image.affine.copy()
    moved[0, 3] += 10
    nib.save(
        nib.Nifti1Image(np.zeros(image.shape, np.uint8), moved), str(root / "labels" / "m.nii.gz")
    )
    r = rows(root)
    r[0]["mask"] = "labels/m.nii.gz"
    with pytest.raises(ManifestError, match=r"row 1: mask .*m.nii.gz affine does not match"):
        VolumeDataset(rewrite(root, r), CFG)


def test_label_absent_from_its_mask(root):
    r = rows(root)
    r[0]["label_values"] = [77]
    with pytest.raises(
        ManifestError, match=r"row 1: label 'liver' \(values \[77\]\) is absent from mask"
    ):
        VolumeDataset(rewrite(root, r), CFG)


def test_bad_rows(root):
    r = rows(root)
    for change, message in (
        ({"split": "holdout"}, "row 1: field 'split' is 'holdout'"),
        ({"query": ""}, "row 1: field 'query' must be a non-empty string"),
        ({"label_values": [1.5]}, "row 1: field 'label_values'"),
    ):
        bad = [dict(r[0], **change)] + r[1:]
        with pytest.raises(ManifestError, match=message):
            VolumeDataset(rewrite(root, bad), CFG)
    del r[0]["query"]
    with pytest.raises(ManifestError, match=r"row 1: missing field\(s\) \['query'\]"):
        VolumeDataset(rewrite(root, r), CFG)
    (root / "manifest.jsonl").write_text('{"id": 1\n')
    with pytest.raises(ManifestError, match="row 1: not JSON"):
        VolumeDataset(root / "manifest.jsonl", CFG)


def test_duplicate_ids(root):
    r = rows(root)
    with pytest.raises(ManifestError, match="row 2: duplicate id"):
        VolumeDataset(rewrite(root, [r[0], r[0]]), CFG)


def test_truncated_file_is_reported_with_its_row(root):
    r = rows(root)
    path = root / r[0]["image"]
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ManifestError, match="row 1: unreadable NIfTI header"):
        VolumeDataset(rewrite(root, r), CFG)


def test_corrupt_voxels_behind_a_good_header(root, tmp_path):
    r = rows(root)
    path = root / r[0]["image"]
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 2000])  # header intact, gzip stream cut short
    cfg = DataConfig(num_slices=8, slice_size=32, cache_dir=tmp_path / "cache")
    ds = VolumeDataset(rewrite(root, r[:1]), cfg)
    with pytest.raises(VolumeError, match=r"sample 'ctorg_0000/liver'.*ctorg_0000.nii.gz"):
        ds[0]
    # no prepared entry (the content digest of the file may be kept: it names the bytes only)
    assert [p.name for p in (tmp_path / "cache").glob("*")] in ([], [DIGEST_FOLDER])
