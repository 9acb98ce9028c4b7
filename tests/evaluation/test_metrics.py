"""Surface metrics (NSD, HD95) on shapes small enough to work out by hand, the empty-mask
conventions, the per-suite NSD tolerance, the unit of each case (mm, or voxels on an M3D-Seg
array of unknown voxel size), and the surface columns of the table."""

import numpy as np
import pytest

from evaluation.metrics import diagonal, dsc, hd95, iou, nsd


def grid(shape=(5, 5, 30)):
    return np.zeros(shape, bool)


def test_two_single_voxels_are_as_far_apart_as_the_spacing_says():
    pred, true = grid(), grid()
    pred[2, 2, 0] = True
    true[2, 2, 3] = True  # 3 voxels along x at 2 mm: 6 mm
    spacing = (1.0, 1.0, 2.0)
    assert hd95(pred, true, spacing) == pytest.approx(6.0)
    assert hd95(pred, true, (1.0, 1.0, 0.5)) == pytest.approx(1.5)  # same voxels, other spacing
    assert nsd(pred, true, spacing, tolerance=5.9) == 0.0
    assert nsd(pred, true, spacing, tolerance=6.0) == pytest.approx(1.0)  # within = at most


def test_two_parallel_plates_one_slice_apart():
    pred, true = grid((6, 8, 8)), grid((6, 8, 8))
    pred[2] = True
    true[3] = True  # every voxel of a 1-voxel plate is surface; each is 1.5 mm from the other plate
    spacing = (1.5, 0.7, 0.7)
    assert hd95(pred, true, spacing) == pytest.approx(1.5)
    assert nsd(pred, true, spacing, tolerance=1.0) == 0.0
    assert nsd(pred, true, spacing, tolerance=2.0) == pytest.approx(1.0)
    assert dsc(pred, true) == 0.0  # no overlap at all, yet a near miss on the surface metrics


def test_one_stray_voxel_moves_hd95_by_the_percentile_and_nsd_by_one_surface_voxel():
    true = grid()
    true[2, 2, 5:24] = True  # a line of 19 voxels: all surface
    pred = true.copy()
    pred[2, 2, 29] = True  # 6 voxels past the line's end at 2 mm: 12 mm from it
    spacing = (1.0, 1.0, 2.0)
    # P -> G: 19 zeros and one 12; the 95th percentile of 20 sorted values sits at rank 18.05,
    # between 0 and 12: 0.05 * 12 = 0.6 mm. G -> P: all 0. HD95 is the larger: 0.6 mm.
    assert hd95(pred, true, spacing) == pytest.approx(0.6, abs=1e-4)  # float32 inside MONAI
    # 19 of 20 predicted and all 19 true surface voxels lie within 2 mm: 38 / 39
    assert nsd(pred, true, spacing, tolerance=2.0) == pytest.approx(38 / 39)
    assert nsd(pred, true, spacing, tolerance=12.0) == pytest.approx(1.0)


def test_empty_masks_follow_the_written_conventions():
    empty, some = grid(), grid()
    some[2, 2, 10] = True
    spacing = (1.0, 1.0, 2.0)
    # both empty: a correct "nothing there"
    assert (dsc(empty, empty), iou(empty, empty)) == (1.0, 1.0)
    assert nsd(empty, empty, spacing) == 1.0 and hd95(empty, empty, spacing) == 0.0
    # one empty: the worst values, HD95 the grid's diagonal: sqrt(4^2 + 4^2 + (29 * 2)^2)
    worst = np.sqrt(4**2 + 4**2 + 58**2)
    assert diagonal(empty.shape, spacing) == pytest.approx(worst)
    for pred, true in ((empty, some), (some, empty)):
        assert nsd(pred, true, spacing) == 0.0
        assert hd95(pred, true, spacing) == pytest.approx(worst)
        assert dsc(pred, true) == 0.0


def test_bad_spacing_and_shapes_are_refused():
    a = grid()
    a[2, 2, 2] = True
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, a, (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        nsd(a, a, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="shapes differ"):
        nsd(a, a[:, :, :10], (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="tolerance"):
        nsd(a, a, (1.0, 1.0, 1.0), tolerance=-1)


def test_the_nsd_tolerance_is_set_per_suite_in_the_config():
    from common.config import ConfigError, load_run_config

    cfg = load_run_config(
        "configs/tiny.yaml", ["evaluation.suite_nsd_tolerance_mm={kits23: 1.0}"]
    ).evaluation
    assert cfg.nsd_tolerance_for("kits23") == 1.0
    assert cfg.nsd_tolerance_for("ctorg") == 2.0  # the default
    with pytest.raises(ConfigError, match="evaluation.nsd_tolerance_mm: NSD tolerance"):
        load_run_config(None, ["evaluation.nsd_tolerance_mm=-2"])


def test_the_table_reports_nsd_and_hd95_per_suite_and_their_means_over_suites():
    from evaluation.evaluate import table

    results = [
        {"row": "SFT", "id": i, "suite": s, "dsc": 0.5, "iou": 0.4, "nsd": n, "hd95": h}
        for i, s, n, h in (
            ("a", "ctorg", 0.6, 4.0),
            ("b", "ctorg", 0.8, 6.0),
            ("c", "kits23", 0.2, 20.0),
        )
    ]
    _, rows = table(results, ["SFT"])
    sft = dict(zip(rows[0], rows[1]))
    assert sft["CT-ORG NSD"] == "70.00" and sft["CT-ORG HD95 mm"] == "5.00"
    assert sft["KiTS23 NSD"] == "20.00" and sft["KiTS23 HD95 mm"] == "20.00"
    # mean over suites of the suite means: (0.7 + 0.2) / 2, (5 + 20) / 2
    assert sft["mean NSD"] == "45.00" and sft["mean HD95 mm"] == "12.50"
    # cases.jsonl of an earlier version (no surface metrics) shows "-", not a wrong number
    old = [{k: v for k, v in r.items() if k not in ("nsd", "hd95")} for r in results]
    _, rows = table(old, ["SFT"])
    assert dict(zip(rows[0], rows[1]))["mean NSD"] == "-"


def test_the_table_heads_hd95_with_each_suites_unit_and_leaves_mixed_units_out():
    from evaluation.evaluate import table

    results = [
        {"row": "SFT", "id": i, "suite": s, "dsc": 0.5, "iou": 0.4, "nsd": n, "hd95": h,
         "surface_unit": u}
        for i, s, n, h, u in (
            ("a", "ctorg", 0.6, 4.0, "mm"),
            ("b", "ctorg", 0.8, 6.0, "mm"),
            ("c", "kits23", 0.2, 20.0, "voxel"),
        )
    ]  # fmt: skip
    _, rows = table(results, ["SFT"])
    sft = dict(zip(rows[0], rows[1]))
    assert sft["CT-ORG HD95 mm"] == "5.00" and sft["KiTS23 HD95 voxel"] == "20.00"
    assert sft["KiTS23 NSD"] == "20.00"
    # no mean of mm and voxels
    assert sft["mean NSD"] == "-" and sft["mean HD95"] == "-" and sft["mean DSC"] == "50.00"
    same = [{**r, "surface_unit": "voxel"} for r in results]
    sft = dict(zip(*table(same, ["SFT"])[1]))
    assert sft["mean HD95 voxel"] == "12.50" and sft["CT-ORG HD95 voxel"] == "5.00"
    # a suite whose scans mix units (a spacing table that misses one) shows no surface numbers
    mixed = [{**r, "surface_unit": "voxel"} if r["id"] == "b" else r for r in results]
    sft = dict(zip(*table(mixed, ["SFT"])[1]))
    assert sft["CT-ORG HD95 mm/voxel"] == "-" and sft["CT-ORG NSD"] == "-"
    assert sft["CT-ORG DSC"] == "50.00"


def test_a_re_run_recomputes_rows_that_do_not_say_their_surface_unit():
    from evaluation.evaluate import reusable

    keys = {"SFT": "k1"}
    earlier = [
        {"row": "SFT", "id": "a", "key": "k1", "surface_unit": "voxel"},
        {"row": "SFT", "id": "b", "key": "k1"},  # an earlier version: "HD95 mm" on voxels
        {"row": "SFT", "id": "c", "key": "k0", "surface_unit": "mm"},  # other weights
    ]
    assert [r["id"] for r in reusable(earlier, keys)] == ["a"]


@pytest.fixture(scope="module")
def m3d_manifest(tmp_path_factory):
    """A hand-built M3D-Seg case (KiTS23 layout) listed twice: without and with a spacing."""
    import json

    from data.m3dseg import read_subset, write_manifest
    from tests.data.test_m3dseg import D, H, W, kits_mask, save_case, write_index

    root = tmp_path_factory.mktemp("m3d")
    mask = kits_mask(with_cyst=False)
    rng = np.random.default_rng(0)
    image = rng.normal(0.0, 0.2, (1, H, W, D)).astype(np.float32)
    image[0][mask[0] > 0] += 3.0  # a bright kidney the baseline can grow
    case = save_case(root, "0004", "case_00000", image, mask)
    write_index(root, "0004", train=[], test=[case])
    (row,) = [r for r in read_subset(root, "0004") if r["label"] == "kidney"]
    spaced = {**row, "id": "0004/case_00000_spaced/kidney", "spacing": [2.0, 2.0, 2.0]}
    manifest = write_manifest([row, spaced], root / "manifest.jsonl")
    assert json.loads(manifest.read_text().splitlines()[0])["m3d_axes"] == "depth-last"
    return manifest


def test_surface_metrics_on_m3d_arrays_are_in_voxels_unless_the_manifest_gives_a_spacing(
    m3d_manifest,
):
    from common.config import load_run_config
    from data.dataset import VolumeDataset
    from evaluation.evaluate import CaseScorer, oracle_jobs
    from tests.data.test_m3dseg import D, H, W

    cfg = load_run_config(
        "configs/tiny.yaml",
        [f"data.manifest={m3d_manifest}", "data.cache_dir=null", "data.window=unit",
         f"data.num_slices={D}", f"data.slice_size={max(H, W)}"],
    )  # fmt: skip
    samples = [(s, p) for s, p in VolumeDataset(m3d_manifest, cfg.data)]
    scorer = CaseScorer(str(m3d_manifest), cfg.data, cfg.reward, "baseline")
    voxels, spaced = (scorer.score(job) for job in oracle_jobs("oracle", samples, 4))
    assert voxels["surface_unit"] == "voxel" and voxels["spacing"] == [1.0, 1.0, 1.0]
    assert spaced["surface_unit"] == "mm" and spaced["spacing"] == [2.0, 2.0, 2.0]
    assert voxels["dsc"] == spaced["dsc"] > 0.5
    assert voxels["hd95"] > 0 and spaced["hd95"] == pytest.approx(2 * voxels["hd95"])
    # the same 2-unit tolerance: 2 voxels on one, 2 mm = 1 voxel on the other
    assert voxels["nsd_tolerance"] == spaced["nsd_tolerance"] == 2.0
    assert voxels["nsd"] >= spaced["nsd"]


def test_surface_metrics_on_nifti_are_in_mm_from_its_header(phantom_manifest):
    import nibabel as nib

    from common.config import load_run_config
    from data.dataset import VolumeDataset
    from evaluation.evaluate import CaseScorer, oracle_jobs

    cfg = load_run_config(
        "configs/tiny.yaml",
        [f"data.manifest={phantom_manifest}", "data.cache_dir=null", "data.num_slices=8",
         "data.slice_size=48"],
    )  # fmt: skip
    sample = VolumeDataset(phantom_manifest, cfg.data).by_id("ctorg_0000/liver")
    (job,) = oracle_jobs("oracle", [sample], cfg.data.min_box_area)
    result = CaseScorer(str(phantom_manifest), cfg.data, cfg.reward, "baseline").score(job)
    header = nib.load(str(sample[0].mask)).header.get_zooms()[:3]  # (x, y, z), RAS file
    assert result["surface_unit"] == "mm"
    assert result["spacing"] == pytest.approx(header[::-1], abs=1e-3) != [1.0, 1.0, 1.0]
