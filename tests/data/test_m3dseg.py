"""Reading M3D-Seg folders written by hand as the dataset card's demo reads them.

Images are ``np.save`` of a (1, H, W, D) array, masks ``scipy.sparse.save_npz`` of the dense
(C, H, W, D) mask reshaped to (C, -1) under a name carrying that shape, and ``<code>/<code>.json``
lists the cases: the project's own writers are not used.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import sparse

from data.cli import run_cli
from data.config import DataConfig
from data.dataset import VolumeDataset
from data.m3dseg import SUBSETS, WINDOW, M3DSegError, main, read_subset, write_manifest
from data.queries import phrasings, target_of
from data.volume import VolumeError, load_volume, m3d_mask_shape

REPO = Path(__file__).resolve().parents[2]
H, W, D = 20, 28, 12  # stored (H, W, D); H != W so a swapped in-plane pair shows


def save_case(root, code, case, image, mask, layout="folders"):
    """One case on disk. ``folders``: <code>/<case>/image.npy + mask_(C, H, W, D).npz, as M3D's
    preparation script writes; ``ct_gt``: <code>/ct/<case>.npy + <code>/gt/<case>.(C, H, W, D).npz,
    as the first dataset card shows."""
    if layout == "folders":
        image_rel = f"{code}/{case}/image.npy"
        mask_rel = f"{code}/{case}/mask_{tuple(mask.shape)}.npz"
    else:
        image_rel = f"{code}/ct/{case}.npy"
        mask_rel = f"{code}/gt/{case}.{tuple(mask.shape)}.npz"
    for rel in (image_rel, mask_rel):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
    np.save(root / image_rel, image)
    sparse.save_npz(root / mask_rel, sparse.csr_matrix(mask.reshape(mask.shape[0], -1)))
    return {"image": image_rel, "label": mask_rel}


def write_index(root, code, **splits):
    (root / code).mkdir(parents=True, exist_ok=True)
    (root / code / f"{code}.json").write_text(json.dumps(splits))


def zscore_image(rng, shape=(H, W, D)):
    """A stored image as M3D keeps it: foreground z-scores, not HU (air clipped low)."""
    return rng.normal(0.0, 1.0, size=(1, *shape)).clip(-2.5, 7.0).astype(np.float32)


def kits_mask(with_cyst=True):
    mask = np.zeros((3, H, W, D), np.int32)  # M3D saves int32 channels
    mask[0, 4:12, 6:16, 2:9] = 1  # kidney, without its lesions (KiTS label 1 only)
    mask[1, 12:16, 6:12, 3:7] = 1  # kidney tumor, next to it, never on it
    if with_cyst:
        mask[2, 4:8, 18:22, 5:8] = 1
    return mask


def test_kits23_rows_have_their_suite_channels_and_implicit_queries(tmp_path):
    rng = np.random.default_rng(0)
    train = save_case(tmp_path, "0004", "case_00000", zscore_image(rng), kits_mask(False))
    test = save_case(tmp_path, "0004", "case_00001", zscore_image(rng), kits_mask())
    # The preparation script's own 'labels' map (its default organ list) must not name channels.
    labels = {"0": "background", "1": "liver", "2": "right kidney", "3": "spleen"}
    write_index(tmp_path, "0004", labels=labels, train=[train], test=[test])

    rows = read_subset(tmp_path, "0004", seed=1)
    assert [(r["id"], r["split"], r["label_values"]) for r in rows] == [
        ("0004/case_00000/kidney", "train", [1]),
        ("0004/case_00000/kidney_tumor", "train", [2]),  # the empty cyst channel gives no row
        ("0004/case_00001/kidney", "test", [1]),
        ("0004/case_00001/kidney_tumor", "test", [2]),
        ("0004/case_00001/kidney_cyst", "test", [3]),
    ]
    assert {r["suite"] for r in rows} == {"kits23"}
    for r in rows:
        assert target_of(r["label"]) is not None
        assert r["query"] in phrasings(target_of(r["label"]), r["split"]), r["id"]
        assert r["query"] != f"Segment the {r['label']}."
    tumour = [r for r in rows if r["label"] == "kidney tumor"]
    assert tumour[1]["query"] in phrasings("kidney tumour", "test")


def test_each_row_selects_exactly_its_channel_through_the_dataset(tmp_path):
    rng = np.random.default_rng(1)
    mask = kits_mask()
    case = save_case(tmp_path, "0004", "case_00007", zscore_image(rng), mask)
    write_index(tmp_path, "0004", train=[case], test=[])
    manifest = write_manifest(read_subset(tmp_path, "0004"), tmp_path / "manifest.jsonl")
    cfg = DataConfig(num_slices=D, slice_size=max(H, W), window=WINDOW)
    ds = VolumeDataset(manifest, cfg)
    for channel, name in enumerate(SUBSETS["0004"].labels):
        sample_id = f"0004/case_00007/{name.replace(' ', '_')}"
        assert ds.label_values(sample_id) == [channel + 1]
        labels = load_volume(ds.by_id(sample_id)[0].mask, "mask").array
        truth = np.isin(labels, ds.label_values(sample_id))
        np.testing.assert_array_equal(truth, mask[channel].transpose(2, 1, 0) > 0)


def test_a_voxel_at_h_w_d_lands_at_z_y_x(tmp_path):
    image = np.full((1, H, W, D), -1.0, np.float32)
    mask = np.zeros((4, H, W, D), np.uint8)
    h, w, d = 3, 17, 9
    image[0, h, w, d] = 5.0
    mask[1, h, w, d] = 1  # kidney channel of AbdomenCT-1k
    case = save_case(tmp_path, "0003", "case_00000", image, mask)
    img = load_volume(tmp_path / case["image"], "image").array
    lab = load_volume(tmp_path / case["label"], "mask").array
    assert img.shape == lab.shape == (D, W, H)  # (z, y, x): M3D's own swapaxes(-1, -3)
    assert np.unravel_index(img.argmax(), img.shape) == (d, w, h)
    assert np.argwhere(lab).tolist() == [[d, w, h]]
    assert lab[d, w, h] == 2  # channel 1 -> value 2


def test_an_axial_first_source_is_already_z_y_x(tmp_path):
    # A source stored (z, y, x) like KiTS keeps that order in M3D-Seg: equal trailing axes.
    z_n, side = 10, 24
    image = np.zeros((1, z_n, side, side), np.float32)
    mask = np.zeros((1, z_n, side, side), np.uint8)
    image[0, 7, 2, 19] = 3.0
    mask[0, 7, 2, 19] = 1
    case = save_case(tmp_path, "0004", "case_00002", image, mask)
    img = load_volume(tmp_path / case["image"], "image").array
    lab = load_volume(tmp_path / case["label"], "mask").array
    assert img.shape == lab.shape == (z_n, side, side)
    assert np.unravel_index(img.argmax(), img.shape) == (7, 2, 19)
    assert np.argwhere(lab).tolist() == [[7, 2, 19]]


def test_images_load_as_m3d_min_max_of_their_z_scores(tmp_path):
    image = zscore_image(np.random.default_rng(2))
    case = save_case(tmp_path, "0003", "case_00003", image, np.ones((4, H, W, D), np.uint8))
    vol = load_volume(tmp_path / case["image"], "image")
    lo, hi = image.min(), image.max()
    np.testing.assert_allclose(vol.array, ((image[0] - lo) / (hi - lo)).transpose(2, 1, 0))
    assert vol.array.min() == 0.0 and vol.array.max() == pytest.approx(1.0)


def test_both_published_mask_names_give_the_dense_shape(tmp_path):
    assert m3d_mask_shape("0004/case_00000.(3, 512, 512, 611).npz") == (3, 512, 512, 611)
    assert m3d_mask_shape("0004/case_00000/mask_(3, 512, 512, 611).npz") == (3, 512, 512, 611)
    with pytest.raises(VolumeError, match=r"case_00000\.npz: M3D-Seg mask name carries no"):
        m3d_mask_shape("gt/case_00000.npz")
    with pytest.raises(VolumeError, match=r"is not \(C, H, W, D\)"):
        m3d_mask_shape("gt/case.(512, 512, 611).npz")


def test_ctorg_older_layout_with_training_and_validation_keys(tmp_path):
    rng = np.random.default_rng(3)
    names = SUBSETS["0012"].labels
    assert names == ("liver", "bladder", "lungs", "kidneys", "bone", "brain")
    mask = np.zeros((len(names), H, W, D), np.uint8)
    for c in range(len(names)):
        mask[c, 2 + 3 * c : 4 + 3 * c, 5:20, c + 1 : c + 4] = 1
    cases = [
        save_case(tmp_path, "0012", f"volume-{i}", zscore_image(rng), mask, "ct_gt") for i in (0, 1)
    ]
    write_index(tmp_path, "0012", training=[cases[0]], validation=[cases[1]])
    rows = read_subset(tmp_path, "0012", seed=0)
    assert [(r["split"], r["label"]) for r in rows] == [("train", n) for n in names] + [
        ("test", n) for n in names
    ]
    assert rows[0]["id"] == "0012/volume-0/liver"
    assert {r["suite"] for r in rows} == {"ctorg"}
    for r in rows:
        assert r["query"] in phrasings(target_of(r["label"]), r["split"]), r["id"]
        if r["split"] == "test":  # held-out phrasings are all implicit
            assert r["query"] != f"Segment the {r['label']}."
    assert target_of("kidneys") == "kidney" and target_of("kidney tumor") == "kidney tumour"


def test_other_subsets_take_names_from_dataset_info(tmp_path):
    rng = np.random.default_rng(4)
    mask = np.zeros((2, H, W, D), np.uint8)
    mask[0, 2:6, 2:6, 2:6] = 1
    mask[1, 10:14, 10:14, 6:10] = 1
    case = save_case(tmp_path, "0007", "case_1", zscore_image(rng), mask)
    write_index(tmp_path, "0007", train=[case], test=[])
    (tmp_path / "dataset_info.txt").write_text(
        "dataset_name = {\n    '0007':    'BTCV',\n}\n\n"
        "dataset_info_raw = {\n    '0007': ['Spleen', 'Gall_Bladder'],\n}\n\n"
        "dataset_info = {\n    '0007': ['spleen', 'gallbladder'],\n}\n"
    )
    rows = read_subset(tmp_path, "0007")
    assert [(r["label"], r["suite"]) for r in rows] == [("spleen", "0007"), ("gallbladder", "0007")]
    assert rows[0]["query"] in phrasings("spleen", "train")
    assert rows[1]["query"] == "Segment the gallbladder."  # no phrasings for it
    (tmp_path / "dataset_info.json").write_text(json.dumps({"0007": ["liver", "pancreas"]}))
    rows = read_subset(tmp_path, "0007", suite="btcv")
    assert [(r["label"], r["suite"]) for r in rows] == [("liver", "btcv"), ("pancreas", "btcv")]


def test_bad_folders_name_the_file_at_fault(tmp_path):
    rng = np.random.default_rng(5)
    with pytest.raises(M3DSegError, match=r"0004\.json: index of subset '0004' not found"):
        read_subset(tmp_path, "0004")
    case = save_case(tmp_path, "0004", "case_1", zscore_image(rng), kits_mask()[:2])
    write_index(tmp_path, "0004", train=[case], test=[])
    with pytest.raises(M3DSegError, match=r"mask_\(2, 20, 28, 12\)\.npz: 2 channels, but subset"):
        read_subset(tmp_path, "0004")
    write_index(tmp_path, "0004", train=[{"image": case["image"], "label": "0004/x.npz"}])
    with pytest.raises(M3DSegError, match=r"x\.npz: file not found .*train\[0\]\.label"):
        read_subset(tmp_path, "0004")
    write_index(tmp_path, "0009", train=[case])
    with pytest.raises(M3DSegError, match="no label names for subset '0009'"):
        read_subset(tmp_path, "0009")


def test_overlapping_channels_are_refused_not_collapsed(tmp_path):
    mask = kits_mask()
    mask[1, 4:8, 6:10, 2:5] = 1  # tumour drawn inside the kidney channel
    case = save_case(tmp_path, "0004", "case_9", zscore_image(np.random.default_rng(6)), mask)
    with pytest.raises(VolumeError, match="channels 0 and 1 overlap in 48 voxels"):
        load_volume(tmp_path / case["label"], "mask")


def test_manifest_outside_the_root_is_refused(tmp_path):
    image = zscore_image(np.random.default_rng(7))
    case = save_case(tmp_path / "m3d", "0004", "c", image, kits_mask())
    write_index(tmp_path / "m3d", "0004", train=[case], test=[])
    rows = read_subset(tmp_path / "m3d", "0004")
    with pytest.raises(M3DSegError, match="outside the manifest's folder"):
        write_manifest(rows, tmp_path / "elsewhere" / "manifest.jsonl")


def test_cli_writes_the_three_subsets_and_reports_bad_input_on_one_line(tmp_path, capsys):
    rng = np.random.default_rng(8)
    root = tmp_path / "M3D_Seg"
    organs = np.zeros((4, H, W, D), np.uint8)
    for c in range(4):
        organs[c, 2 + 4 * c : 5 + 4 * c, 3:9, 1:5] = 1
    ctorg = np.zeros((6, H, W, D), np.uint8)
    ctorg[0, 2:9, 3:12, 2:8] = 1  # liver only: the other five channels are empty
    for code, mask in (("0003", organs), ("0004", kits_mask()), ("0012", ctorg)):
        write_index(root, code, train=[save_case(root, code, "case_0", zscore_image(rng), mask)])
    out = root / "manifest.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "data.m3dseg", "--root", str(root), "--subsets", "0003", "0004",
         "0012", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["suite"], r["label"]) for r in rows] == [
        ("abdomenct1k", "liver"),
        ("abdomenct1k", "kidney"),
        ("abdomenct1k", "spleen"),
        ("abdomenct1k", "pancreas"),
        ("kits23", "kidney"),
        ("kits23", "kidney tumor"),
        ("kits23", "kidney cyst"),
        ("ctorg", "liver"),
    ]
    assert rows[0]["image"] == "0003/case_0/image.npy"  # relative to the manifest's folder

    missing = tmp_path / "nowhere"
    failed = subprocess.run(
        [sys.executable, "-m", "data.m3dseg", "--root", str(missing), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert failed.returncode == 2
    assert failed.stderr.splitlines() == [
        f"error: {missing}: M3D-Seg root not found (not a folder)"
    ]

    assert run_cli(main, ["--root", str(root), "--subsets", "12", "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: --subsets: '12' is not a 4-digit M3D-Seg subset code"]
