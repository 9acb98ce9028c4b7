"""Phantom invariants: labels present, HU per tissue, determinism, manifest and the CLI."""

import json

import numpy as np

from data.phantoms import HU, LABELS, case_split, main, make_case, write_phantoms
from data.queries import QUERIES, TEST_PHRASINGS, phrasings
from data.volume import load_volume

SHAPE = (40, 96, 96)


def test_every_organ_is_present_with_credible_hu():
    case = make_case(np.random.default_rng(0), SHAPE, lesion_odds=1.0)
    for name in (
        "liver",
        "spleen",
        "right kidney",
        "left kidney",
        "pancreas",
        "aorta",
        "vertebrae",
        "lungs",
    ):
        assert (case.labels == LABELS[name]).sum() > 20, name
    mean = {
        name: case.image[case.labels == LABELS[name]].mean()
        for name in LABELS
        if (case.labels == LABELS[name]).any()
    }
    assert 40 < mean["liver"] < 80 and 30 < mean["spleen"] < 70 and 20 < mean["pancreas"] < 70
    assert 110 < mean["right kidney"] < 190 and 150 < mean["aorta"] < 260
    assert mean["vertebrae"] > 300 and mean["lungs"] < -700
    assert set(case.lesions) == {"tumour", "cyst"}
    side = case.lesions["tumour"]
    assert 80 < mean[f"{side} kidney tumour"] < 140  # enhancing
    assert -20 < mean[f"{case.lesions['cyst']} kidney cyst"] < 30  # fluid
    assert case.image[0, 0, 0] < -900  # air outside the body
    assert case.image.dtype == np.int16 and case.labels.dtype == np.uint8


def test_cases_vary_and_are_deterministic_per_seed():
    a = make_case(np.random.default_rng([1, 0]), SHAPE, 0.5)
    b = make_case(np.random.default_rng([1, 0]), SHAPE, 0.5)
    c = make_case(np.random.default_rng([1, 1]), SHAPE, 0.5)
    np.testing.assert_array_equal(a.image, b.image)
    assert not np.array_equal(a.labels, c.labels)


def test_manifest_rows_point_at_files_with_their_labels(tmp_path):
    manifest = write_phantoms(tmp_path, n=4, seed=0, shape=SHAPE, progress=False)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert {r["suite"] for r in rows} == {"ctorg", "abdomenct1k", "kits23"}
    assert {"kidney tumour", "tumour kidney"} <= {r["label"] for r in rows}
    for r in rows:
        assert set(r) == {"id", "image", "mask", "label", "query", "split", "suite", "label_values"}
        labels = load_volume(tmp_path / r["mask"], "mask").array
        assert np.isin(labels, r["label_values"]).any(), r["id"]
        assert r["query"] in phrasings(r["label"], r["split"])
    assert {r["split"] for r in rows if r["id"].startswith("ctorg_0003")} == {"test"}


def test_validation_scans_come_from_training_and_leave_test_as_it_was(tmp_path):
    assert [case_split(i, 8) for i in range(9)] == [
        "val",
        "train",
        "train",
        "test",
        "train",
        "train",
        "train",
        "test",
        "val",
    ]
    assert case_split(3, 3) == "test"  # a test case is never taken, whatever K
    plain = write_phantoms(tmp_path / "plain", n=9, seed=4, shape=SHAPE, progress=False)
    carved = write_phantoms(tmp_path / "val", n=9, seed=4, shape=SHAPE, progress=False, val_every=8)
    before = [json.loads(line) for line in plain.read_text().splitlines()]
    after = [json.loads(line) for line in carved.read_text().splitlines()]
    # the same scans and targets; only the split (and a validation target's phrasing) changes
    assert [r["id"] for r in before] == [r["id"] for r in after]
    for b, a in zip(before, after):
        scan = int(a["id"].split("/")[0].rsplit("_", 1)[1])
        assert a["split"] == ("val" if scan in (0, 8) else b["split"])
        if a["split"] == "test":
            assert a == b
        if a["split"] == "val":
            assert a["query"] in phrasings(a["label"], "test")  # unseen in training, as test
    for scan in ("ctorg_0000", "kits23_0008"):
        for folder, kind in (("images", "image"), ("labels", "mask")):
            x = load_volume(tmp_path / "plain" / folder / f"{scan}.nii.gz", kind).array
            y = load_volume(tmp_path / "val" / folder / f"{scan}.nii.gz", kind).array
            assert np.array_equal(x, y)


def test_test_phrasings_never_appear_in_training():
    for target, items in QUERIES.items():
        assert len(items) >= 10, target
        train, test = set(phrasings(target, "train")), set(phrasings(target, "test"))
        assert len(test) == TEST_PHRASINGS and not train & test


def test_cli_writes_cases_and_manifest(tmp_path, capsys):
    argv = ["--out-dir", str(tmp_path), "--cases", "3", "--seed", "5"]
    assert main([*argv, "--volume-shape", *map(str, SHAPE)]) == 0
    assert len(list((tmp_path / "images").glob("*.nii.gz"))) == 3
    assert len(list((tmp_path / "labels").glob("*.nii.gz"))) == 3
    assert "wrote 3 cases" in capsys.readouterr().out


def test_written_image_reads_back_in_canonical_orientation(tmp_path):
    write_phantoms(tmp_path, n=1, seed=2, shape=SHAPE, progress=False)
    case = make_case(np.random.default_rng([2, 0]), SHAPE, lesion_odds=0.2)
    np.testing.assert_array_equal(
        load_volume(tmp_path / "images/ctorg_0000.nii.gz").array, case.image
    )
    # Liver on the patient's right = the image's left half in radiological display.
    liver_cols = np.nonzero(case.labels == LABELS["liver"])[2]
    assert liver_cols.mean() < SHAPE[2] / 2
    assert HU["air"] == -1000


def test_a_training_use_asks_a_fresh_training_phrasing_or_the_manifest_query():
    from types import SimpleNamespace

    from data.queries import training_query

    liver = SimpleNamespace(label="liver", query="the manifest's own query")
    rng = np.random.default_rng(0)
    drawn = {training_query(liver, True, rng) for _ in range(200)}
    assert drawn == set(phrasings("liver", "train"))  # every training phrasing, no test one
    assert training_query(liver, False, rng) == "the manifest's own query"
    unknown = SimpleNamespace(label="gallbladder stone", query="find the stone")
    assert training_query(unknown, True, rng) == "find the stone"  # no phrasings: its own
