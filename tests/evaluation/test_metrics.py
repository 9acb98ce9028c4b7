"""Surface metrics in mm (NSD, HD95) on shapes small enough to work out by hand, the empty-mask
conventions, the per-suite NSD tolerance, and the surface columns of the table."""

import numpy as np
import pytest

from evaluation.metrics import diagonal_mm, dsc, hd95, iou, nsd


def grid(shape=(5, 5, 30)):
    return np.zeros(shape, bool)


def test_two_single_voxels_are_as_far_apart_as_the_spacing_says():
    pred, true = grid(), grid()
    pred[2, 2, 0] = True
    true[2, 2, 3] = True  # 3 voxels along x at 2 mm: 6 mm
    spacing = (1.0, 1.0, 2.0)
    assert hd95(pred, true, spacing) == pytest.approx(6.0)
    assert hd95(pred, true, (1.0, 1.0, 0.5)) == pytest.approx(1.5)  # same voxels, other spacing
    assert nsd(pred, true, spacing, tolerance_mm=5.9) == 0.0
    assert nsd(pred, true, spacing, tolerance_mm=6.0) == pytest.approx(1.0)  # within = at most


def test_two_parallel_plates_one_slice_apart():
    pred, true = grid((6, 8, 8)), grid((6, 8, 8))
    pred[2] = True
    true[3] = True  # every voxel of a 1-voxel plate is surface; each is 1.5 mm from the other plate
    spacing = (1.5, 0.7, 0.7)
    assert hd95(pred, true, spacing) == pytest.approx(1.5)
    assert nsd(pred, true, spacing, tolerance_mm=1.0) == 0.0
    assert nsd(pred, true, spacing, tolerance_mm=2.0) == pytest.approx(1.0)
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
    assert nsd(pred, true, spacing, tolerance_mm=2.0) == pytest.approx(38 / 39)
    assert nsd(pred, true, spacing, tolerance_mm=12.0) == pytest.approx(1.0)


def test_empty_masks_follow_the_written_conventions():
    empty, some = grid(), grid()
    some[2, 2, 10] = True
    spacing = (1.0, 1.0, 2.0)
    # both empty: a correct "nothing there"
    assert (dsc(empty, empty), iou(empty, empty)) == (1.0, 1.0)
    assert nsd(empty, empty, spacing) == 1.0 and hd95(empty, empty, spacing) == 0.0
    # one empty: the worst values, HD95 the grid's diagonal: sqrt(4^2 + 4^2 + (29 * 2)^2)
    worst = np.sqrt(4**2 + 4**2 + 58**2)
    assert diagonal_mm(empty.shape, spacing) == pytest.approx(worst)
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
        nsd(a, a, (1.0, 1.0, 1.0), tolerance_mm=-1)


def test_the_nsd_tolerance_is_set_per_suite_in_the_config():
    from cluster.config import ConfigError, load_run_config

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
