"""python -m data.manifest on hand-built nnU-Net-style folders: pairing, label maps, splits, the
named errors, and the round trip through VolumeDataset to a prepared sample."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.cli import run_cli
from common.config import DataConfig
from data.dataset import VolumeDataset
from data.manifest import main
from data.queries import phrasings, use_queries_file

SHAPE = (24, 24, 16)  # stored (i, j, k)
CASES = ("case_001", "case_002", "case_003", "case_004", "case_005")
DATASET_JSON = {
    "channel_names": {"0": "CT"},
    "labels": {"background": 0, "liver": 1, "kidney_tumor": [2, 3], "portal_vein": 4},
    "numTraining": len(CASES),
    "file_ending": ".nii.gz",
}


def save(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.5, 3.0, 1.0])), str(path))
    return path


def label_map(n: int, shape=SHAPE) -> np.ndarray:
    """Liver in every case, the tumour (value 2 or 3) in odd cases, the portal vein in case 0."""
    labels = np.zeros(shape, np.uint8)
    labels[2:12, 2:12, 2:12] = 1
    if n % 2:
        labels[14:20, 14:20, 4:10] = 2 + n % 4 // 2
    if n == 0:
        labels[4:8, 16:20, 3:9] = 4
    return labels


@pytest.fixture
def nnunet(tmp_path):
    """<tmp>/ds with imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz and dataset.json."""
    root = tmp_path / "ds"
    rng = np.random.default_rng(0)
    for n, case in enumerate(CASES):
        save(root / "imagesTr" / f"{case}_0000.nii.gz", rng.integers(-100, 200, SHAPE, np.int16))
        save(root / "labelsTr" / f"{case}.nii.gz", label_map(n))
    (root / "dataset.json").write_text(json.dumps(DATASET_JSON))
    yield root
    use_queries_file(None)


def build(root: Path, *extra: str, labels_json: Path | None = None) -> int:
    return run_cli(
        main,
        [
            "--images",
            str(root / "imagesTr"),
            "--labels",
            str(root / "labelsTr"),
            "--labels-json",
            str(labels_json or root / "dataset.json"),
            "--out-file",
            str(root / "manifest.jsonl"),
            *extra,
        ],
    )


def rows_of(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def test_rows_per_present_label_read_back_and_prepare(nnunet):
    assert build(nnunet, "--suite", "mine", "--test-fraction", "0.4", "--seed", "3") == 0
    rows = rows_of(nnunet / "manifest.jsonl")
    ids = {r["id"] for r in rows}
    assert {f"{c}/liver" for c in CASES} <= ids  # nnU-Net's _0000 dropped from the scan name
    assert {"case_002/kidney_tumor", "case_004/kidney_tumor", "case_001/portal_vein"} <= ids
    assert len(rows) == len(CASES) + 2 + 1
    tumour = next(r for r in rows if r["id"] == "case_002/kidney_tumor")
    assert tumour["label"] == "kidney tumor" and tumour["label_values"] == [2, 3]
    assert tumour["image"] == "imagesTr/case_002_0000.nii.gz"  # relative to the manifest
    assert tumour["mask"] == "labelsTr/case_002.nii.gz" and tumour["suite"] == "mine"
    for r in rows:
        assert r["query"] in phrasings(r["label"], r["split"]), r["id"]
    vein = next(r for r in rows if r["label"] == "portal vein")
    assert vein["query"] == "Segment the portal vein."  # no phrasings: asked outright
    # the dataset reads it (every label present in its mask) and prepares a sample
    dataset = VolumeDataset(nnunet / "manifest.jsonl", DataConfig(num_slices=8, slice_size=32))
    assert len(dataset) == len(rows)
    sample, prepared = dataset.by_id("case_002/kidney_tumor")
    assert sample.suite == "mine" and prepared.mask.any() and prepared.slices.shape == (8, 32, 32)


def test_splits_are_per_scan_seeded_and_take_held_out_phrasings(nnunet):
    build(nnunet, "--test-fraction", "0.2", "--val-fraction", "0.2", "--seed", "1")
    first = rows_of(nnunet / "manifest.jsonl")
    split_of = {}
    for r in first:
        scan = r["id"].split("/")[0]
        assert split_of.setdefault(scan, r["split"]) == r["split"]  # one split per scan
    assert sorted(split_of.values()) == ["test", "train", "train", "train", "val"]
    for r in first:
        if r["split"] != "train" and r["label"] == "liver":
            assert r["query"] in phrasings("liver", "test")
    build(nnunet, "--test-fraction", "0.2", "--val-fraction", "0.2", "--seed", "1")
    assert rows_of(nnunet / "manifest.jsonl") == first  # same seed, same manifest


def test_a_split_file_places_each_case(nnunet, tmp_path, capsys):
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": list(CASES[:3]), "val": [CASES[3]], "test": [CASES[4]]}))
    assert build(nnunet, "--split-file", str(split)) == 0
    got = {r["id"].split("/")[0]: r["split"] for r in rows_of(nnunet / "manifest.jsonl")}
    assert got == {**dict.fromkeys(CASES[:3], "train"), CASES[3]: "val", CASES[4]: "test"}
    split.write_text(json.dumps({"train": list(CASES[:3]), "test": ["case_999"]}))
    assert build(nnunet, "--split-file", str(split)) == 2
    err = capsys.readouterr().err
    assert "split.json" in err and "case_999" in err and "case_004" in err
    assert build(nnunet, "--split-file", str(split), "--test-fraction", "0.3") == 2


def test_a_bare_labels_map_with_a_value_never_present_warns(nnunet, capsys):
    bare = nnunet / "labels.json"
    bare.write_text(json.dumps({"background": 0, "liver": 1, "gallbladder": 7}))
    assert build(nnunet, labels_json=bare) == 0
    assert {r["label"] for r in rows_of(nnunet / "manifest.jsonl")} == {"liver"}
    err = capsys.readouterr().err
    assert "labels.json" in err and "'gallbladder'" in err and "no label map" in err


def test_a_labels_json_without_a_labels_map_is_named(nnunet, capsys):
    broken = nnunet / "broken.json"
    broken.write_text(json.dumps({"name": "Dataset001", "channel_names": {"0": "CT"}}))
    assert build(nnunet, labels_json=broken) == 2
    assert "broken.json: label 'name'" in capsys.readouterr().err
    broken.write_text(json.dumps({"name": "x", "labels": []}))
    assert build(nnunet, labels_json=broken) == 2
    assert "broken.json: no labels map" in capsys.readouterr().err


def test_unpaired_images_and_labels_are_all_listed(nnunet, capsys):
    (nnunet / "labelsTr" / "case_001.nii.gz").rename(nnunet / "labelsTr" / "other.nii.gz")
    save(nnunet / "labelsTr" / "stray.nii.gz", label_map(0))
    assert build(nnunet) == 2
    err = capsys.readouterr().err
    assert "images without a label map: " in err and "case_001_0000.nii.gz" in err
    assert "label maps without an image: " in err
    assert "other.nii.gz" in err and "stray.nii.gz" in err
    assert not (nnunet / "manifest.jsonl").exists()


def test_a_shape_mismatch_names_both_files_and_shapes(nnunet, capsys):
    save(nnunet / "labelsTr" / "case_003.nii.gz", label_map(0, (24, 24, 15)))
    assert build(nnunet) == 2
    err = capsys.readouterr().err
    assert "labelsTr/case_003.nii.gz shape (24, 24, 15)" in err
    assert "imagesTr/case_003_0000.nii.gz shape (24, 24, 16)" in err


def test_a_manifest_outside_the_data_folder_is_refused(nnunet, tmp_path, capsys):
    args = ["--images", str(nnunet / "imagesTr"), "--labels", str(nnunet / "labelsTr")]
    args += ["--labels-json", str(nnunet / "dataset.json")]
    assert run_cli(main, [*args, "--out-file", str(tmp_path / "elsewhere" / "m.jsonl")]) == 2
    assert "must hold --images" in capsys.readouterr().err


def test_dicom_series_folders_are_images(tmp_path):
    from tests.data.dicom_series import oblique_affine, write_nifti, write_series

    root = tmp_path / "ds"
    affine = oblique_affine()
    for n, case in enumerate(("scan_a", "scan_b")):
        image = np.random.default_rng(n).integers(-100, 200, SHAPE, np.int16)
        write_series(root / "imagesTr" / case, image, affine, seed=n)
        (root / "labelsTr").mkdir(parents=True, exist_ok=True)
        write_nifti(root / "labelsTr" / f"{case}.nii.gz", label_map(n), affine)
    (root / "dataset.json").write_text(json.dumps(DATASET_JSON))
    assert build(root, "--test-fraction", "0.5") == 0
    rows = rows_of(root / "manifest.jsonl")
    assert {r["image"] for r in rows} == {"imagesTr/scan_a", "imagesTr/scan_b"}
    dataset = VolumeDataset(root / "manifest.jsonl", DataConfig(num_slices=8, slice_size=32))
    _, prepared = dataset.by_id("scan_b/kidney_tumor")
    assert prepared.mask.any()


def test_a_label_map_off_the_images_grid_is_named(nnunet, capsys):
    moved = nib.Nifti1Image(label_map(2), np.diag([1.5, 1.5, 2.0, 1.0]))
    nib.save(moved, str(nnunet / "labelsTr" / "case_003.nii.gz"))
    assert build(nnunet) == 2
    err = capsys.readouterr().err
    assert "case_003.nii.gz affine does not match image" in err and "case_003_0000" in err


def test_two_images_of_one_case_are_refused(nnunet, capsys):
    save(nnunet / "imagesTr" / "case_001.nii.gz", np.zeros(SHAPE, np.int16))
    assert build(nnunet) == 2
    assert "images of the same case: " in capsys.readouterr().err


def test_a_queries_file_gives_labels_their_phrasings(nnunet):
    own = nnunet / "queries.yaml"
    own.write_text("targets:\n  portal vein: [a, b, c, d]\n")
    assert build(nnunet, "--queries-file", str(own), "--test-fraction", "0") == 0
    vein = next(r for r in rows_of(nnunet / "manifest.jsonl") if r["label"] == "portal vein")
    assert vein["query"] == "a"  # the one training phrasing
