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

from common.cli import run_cli
from common.config import DataConfig
from data.dataset import ManifestError, VolumeDataset
from data.m3dseg import (
    SUBSETS,
    WINDOW,
    M3DSegError,
    fingerprint,
    main,
    read_spacing,
    read_subset,
    write_manifest,
)
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
         "0012", "--out-file", str(out)],
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
        [sys.executable, "-m", "data.m3dseg", "--root", str(missing), "--out-file", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert failed.returncode == 2
    assert failed.stderr.splitlines() == [
        f"error: {missing}: M3D-Seg root not found (not a folder)"
    ]

    assert run_cli(main, ["--root", str(root), "--subsets", "12", "--out-file", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: --subsets: '12' is not a 4-digit M3D-Seg subset code"]


def kits_mask_of(shape):
    mask = np.zeros((3, *shape), np.uint8)
    mask[0, 2:6, 3:9, 4:10] = 1
    return mask


def test_a_cube_is_read_as_the_majority_of_its_subset(tmp_path):
    # A 24^3 stand-in for a 512^3 case: its shape tells no axis order. KiTS23 here stores its
    # cases axial-first (z, n, n), CT-ORG depth-last (H, W, D); each cube follows its subset.
    n = 24
    marker = (3, 7, 19)  # stored index of the one marked voxel
    cube = np.zeros((1, n, n, n), np.float32)
    cube[(0, *marker)] = 4.0
    cube_mask = np.zeros((3, n, n, n), np.uint8)
    cube_mask[(0, *marker)] = 1
    rng = np.random.default_rng(10)
    kits = [
        save_case(tmp_path, "0004", f"case_{i}", zscore_image(rng, shape), kits_mask_of(shape))
        for i, shape in enumerate([(12, n, n), (13, n, n)])
    ]
    kits.append(save_case(tmp_path, "0004", "case_cube", cube, cube_mask))
    write_index(tmp_path, "0004", train=kits, test=[])
    ctorg_mask = np.zeros((6, n, n, n), np.uint8)
    ctorg_mask[(0, *marker)] = 1
    organs = np.zeros((6, H, W, D), np.uint8)
    organs[0, 2:6, 2:6, 2:6] = 1
    ctorg = [save_case(tmp_path, "0012", f"v{i}", zscore_image(rng), organs) for i in range(2)]
    ctorg.append(save_case(tmp_path, "0012", "v_cube", cube, ctorg_mask))
    write_index(tmp_path, "0012", train=ctorg, test=[])

    rows = read_subset(tmp_path, "0004") + read_subset(tmp_path, "0012")
    axes = {r["id"].rsplit("/", 1)[0]: r["m3d_axes"] for r in rows}
    assert axes == {
        "0004/case_0": "axial-first",
        "0004/case_1": "axial-first",
        "0004/case_cube": "axial-first",  # KiTS23's majority
        "0012/v0": "depth-last",
        "0012/v1": "depth-last",
        "0012/v_cube": "depth-last",  # CT-ORG's majority
    }
    manifest = write_manifest(rows, tmp_path / "manifest.jsonl")
    ds = VolumeDataset(manifest, DataConfig(num_slices=n, slice_size=n, window=WINDOW))
    for sample_id, where in (
        ("0004/case_cube/kidney", marker),  # axial-first: already (z, y, x)
        ("0012/v_cube/liver", marker[::-1]),  # depth-last: (D, W, H)
    ):
        sample, prepared = ds.by_id(sample_id)
        assert np.argwhere(prepared.mask).tolist() == [list(where)], sample_id
        image = load_volume(sample.image, "image", sample.m3d_axes).array
        assert np.unravel_index(image.argmax(), image.shape) == where


def test_a_spacing_table_gives_rows_their_z_y_x_spacing(tmp_path):
    rng = np.random.default_rng(11)
    organs = np.zeros((4, H, W, D), np.uint8)
    organs[0, 2:9, 3:12, 2:8] = 1
    cases = [save_case(tmp_path, "0003", f"case_{i}", zscore_image(rng), organs) for i in (0, 1)]
    axial_mask = np.zeros((4, 10, 24, 24), np.uint8)
    axial_mask[0, 2:8, 3:12, 2:8] = 1
    axial = save_case(tmp_path, "0003", "case_k", zscore_image(rng, (10, 24, 24)), axial_mask)
    write_index(tmp_path, "0003", train=cases + [axial], test=[])
    table = tmp_path / "spacing.csv"
    # h, w, d: the source NIfTI's pixdim[1:4], in the stored order
    table.write_text("case,h,w,d\n0003/case_0,0.8,0.7,5.0\n0003/case_k,3.0,0.9,0.9\n")
    spacing = read_spacing(table)
    assert spacing == {"0003/case_0": (0.8, 0.7, 5.0), "0003/case_k": (3.0, 0.9, 0.9)}
    rows = {r["id"]: r for r in read_subset(tmp_path, "0003", spacing=spacing)}
    assert rows["0003/case_0/liver"]["spacing"] == [5.0, 0.7, 0.8]  # depth-last: (D, W, H)
    assert rows["0003/case_k/liver"]["spacing"] == [3.0, 0.9, 0.9]  # axial-first: as stored
    assert "spacing" not in rows["0003/case_1/liver"]  # not listed: surface metrics in voxels

    manifest = write_manifest(list(rows.values()), tmp_path / "manifest.jsonl")
    ds = VolumeDataset(manifest, DataConfig(num_slices=8, slice_size=32, window=WINDOW))
    assert ds.by_id("0003/case_0/liver")[0].spacing == (5.0, 0.7, 0.8)
    assert ds.by_id("0003/case_1/liver")[0].spacing is None

    for text, message in (
        ("case,x,y,z\n", r"spacing\.csv: the header line must be case,h,w,d"),
        ("case,h,w,d\n0003/case_0,0.8,-1,5\n", r"spacing\.csv, line 2: needs a case and three"),
        ("case,h,w,d\n0003/case_0,0.8,a,5\n", r"spacing\.csv, line 2: h, w, d must be numbers"),
        ("case,h,w,d\na,1,1,1\na,1,1,1\n", r"spacing\.csv, line 3: case 'a' is listed twice"),
    ):
        table.write_text(text)
        with pytest.raises(M3DSegError, match=message):
            read_spacing(table)


def test_the_manifest_refuses_a_bad_spacing_and_one_on_a_nifti(tmp_path, phantom_manifest):
    rng = np.random.default_rng(12)
    case = save_case(tmp_path, "0004", "case_0", zscore_image(rng), kits_mask())
    write_index(tmp_path, "0004", train=[case], test=[])
    row = read_subset(tmp_path, "0004")[0]
    for bad, message in (
        ({"spacing": [1.0, 0.0, 1.0]}, r"row 1: field 'spacing' must be \[z, y, x\], three"),
        ({"spacing": [1.0, 1.0]}, r"row 1: field 'spacing' must be \[z, y, x\]"),
        ({"m3d_axes": "sideways"}, r"row 1: field 'm3d_axes' is 'sideways', not one of"),
    ):
        manifest = write_manifest([{**row, **bad}], tmp_path / "manifest.jsonl")
        with pytest.raises(ManifestError, match=message):
            VolumeDataset(manifest, DataConfig(window=WINDOW))
    nifti = json.loads(phantom_manifest.read_text().splitlines()[0])
    (phantom_manifest.parent / "spaced.jsonl").write_text(
        json.dumps({**nifti, "spacing": [2.0, 1.0, 1.0]}) + "\n"
    )
    with pytest.raises(ManifestError, match=r"row 1: field 'spacing' is for M3D-Seg arrays"):
        VolumeDataset(phantom_manifest.parent / "spaced.jsonl", DataConfig())
    (phantom_manifest.parent / "spaced.jsonl").unlink()


def test_cross_split_scans_are_found_in_any_axis_order_and_dropped_on_request(tmp_path, capsys):
    """The fixture of the README's cross-split note: three subsets, seven scans; one scan is in
    AbdomenCT-1K's train split and, stored transposed and flipped, in CT-ORG's test split; one is
    in the test splits of two subsets (no leak)."""
    rng = np.random.default_rng(13)
    root = tmp_path / "M3D_Seg"
    shared, twice = zscore_image(rng), zscore_image(rng)
    organs = np.zeros((4, H, W, D), np.uint8)
    organs[0, 2:9, 3:12, 2:8] = 1
    ctorg = np.zeros((6, H, W, D), np.uint8)
    ctorg[0, 2:9, 3:12, 2:8] = 1
    moved = np.ascontiguousarray(shared[:, ::-1, :, ::-1].transpose(0, 3, 2, 1))  # (1, D, W, H)
    write_index(root, "0003",
        train=[save_case(root, "0003", "Case_00001", shared, organs),
               save_case(root, "0003", "Case_00002", zscore_image(rng), organs)],
        test=[save_case(root, "0003", "Case_00003", twice, organs)])  # fmt: skip
    write_index(root, "0012",
        train=[save_case(root, "0012", "volume-1", zscore_image(rng), ctorg)],
        test=[save_case(root, "0012", "volume-7", moved, ctorg.transpose(0, 3, 2, 1))])  # fmt: skip
    write_index(root, "0004",
        train=[save_case(root, "0004", "case_00001", zscore_image(rng), kits_mask())],
        test=[save_case(root, "0004", "case_00002", twice, kits_mask())])  # fmt: skip
    out = root / "manifest.jsonl"
    args = ["--root", str(root), "--out-file", str(out)]

    assert run_cli(main, args) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[:3] == [
        "cross-split: 1 test scans of 7 are also training scans",
        "  0012/volume-7 (test) = 0003/Case_00001 (train)",
        "  kept in test; --drop-cross-split drops them",
    ]
    assert printed[3].startswith("spacing: 0 of 7 scans from no --spacing table")
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert "0012/volume-7/liver" in ids

    assert run_cli(main, [*args, "--drop-cross-split"]) == 0
    assert "  dropped from test: 1 scans, 1 rows" in capsys.readouterr().out.splitlines()
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert not [i for i in ids if i.startswith("0012/volume-7/")]
    assert "0003/Case_00001/liver" in ids and "0004/case_00002/kidney" in ids


def test_fingerprints_match_the_same_voxels_only(tmp_path):
    rng = np.random.default_rng(14)
    image = zscore_image(rng, (33, 40, 17))
    paths = {}
    for name, array in (
        ("same", image),
        ("flipped", image[:, ::-1, ::-1, :]),
        ("permuted", image.transpose(0, 2, 3, 1)),
        ("nudged", image + np.float32(0.3) * (np.arange(image.size) % 2).reshape(image.shape)),
        ("other", zscore_image(rng, (33, 40, 17))),
    ):
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], np.ascontiguousarray(array))
    prints = {name: fingerprint(path) for name, path in paths.items()}
    assert prints["same"] == prints["flipped"] == prints["permuted"]
    assert prints["nudged"] != prints["same"] and prints["other"] != prints["same"]


def m3d_normalise(hu):
    """M3D's preparation script's ``normalize``, from its published description: the foreground
    is the voxels above the volume's mean; clip to the foreground's 0.05 and 99.95 percentiles,
    subtract the foreground's mean, divide by its standard deviation (both before clipping)."""
    foreground = hu[hu > hu.mean()]
    low, high = np.percentile(foreground, 0.05), np.percentile(foreground, 99.95)
    scaled = (np.clip(hu, low, high) - foreground.mean()) / max(foreground.std(), 1e-8)
    return scaled.astype(np.float32)


def test_approximate_hu_of_m3d_images_fits_the_abdominal_window(tmp_path):
    from data.phantoms import SMALL_SHAPE, make_case

    rng = np.random.default_rng(15)
    errors, unit_levels, hu_levels = [], [], []
    for i in range(4):
        hu = make_case(rng, SMALL_SHAPE, lesion_odds=0.5).image.astype(np.float32)  # (z, y, x)
        stored = m3d_normalise(hu).transpose(2, 1, 0)[None]  # (1, H, W, D), depth last
        np.save(tmp_path / f"case_{i}.npy", stored)
        recovered = load_volume(tmp_path / f"case_{i}.npy", m3d_intensity="hu").array
        unclipped = (stored[0] > stored.min()) & (stored[0] < stored.max())
        window = unclipped.transpose(2, 1, 0) & (hu > -160) & (hu < 240)
        errors.append(float(np.abs(recovered - hu)[window].mean()))
        # grey levels per 100 true HU: the unit window spans the clip bounds, the abdominal
        # window 400 recovered HU
        clip = hu[unclipped.transpose(2, 1, 0)]
        unit_levels.append(255 * 100 / (clip.max() - clip.min()))
        slope = np.polyfit(hu[window], recovered[window], 1)[0]
        hu_levels.append(255 * 100 / 400 * slope)
    # Measured here: mean |error| 5.6-15.6 HU in the window (40 phantoms of both sizes: 19 on
    # average, at most 29), mostly a bias: the phantoms' soft-tissue mode sits near 25 HU, not
    # the 40 the map assumes. Grey levels per 100 HU: 25.5-27.6 under the unit window (the clip
    # bounds span about -140 to 840 HU here), 64-70 under the recovered abdominal one (63.75
    # with true HU).
    assert max(errors) < 30.0, errors
    assert max(unit_levels) < 30.0 and min(hu_levels) > 60.0, (unit_levels, hu_levels)


def test_hu_is_not_guessed_for_an_image_without_fat_and_soft_tissue(tmp_path):
    np.save(tmp_path / "flat.npy", zscore_image(np.random.default_rng(16), (40, 40, 40)))
    with pytest.raises(VolumeError, match=r"flat\.npy: cannot recover HU \(.*m3d_intensity=unit"):
        load_volume(tmp_path / "flat.npy", m3d_intensity="hu")
    unit = load_volume(tmp_path / "flat.npy").array
    assert unit.min() == 0.0 and unit.max() == pytest.approx(1.0)
