"""predict on DICOM: the same masks as the NIfTI path voxel for voxel, a DICOM SEG on the source
series, several queries with a label map and legend, folders of scans, --statistics, and the
command line."""

import csv
import json

import nibabel as nib
import numpy as np
import pydicom
import pytest

from data.volume import load_volume
from evaluation.predict import predict
from tests.data.dicom_series import oblique_phantom, write_series

QUERIES = ["the organ that secretes bile", "both kidneys"]
TARGETS = {QUERIES[0]: [1], QUERIES[1]: [3, 4]}  # phantom label values
SLICES, SIZE = 16, 96


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return oblique_phantom(tmp_path_factory.mktemp("oblique"))


def oracle_answers(nifti, labels):
    """A policy that answers every query with its true anchor (the evaluation's oracle row), so
    the masks are real organs and the comparison below can fail."""
    from data.answer import format_answer
    from data.preprocess import prepare_arrays
    from data.targets import evidence_target

    image, label_map = load_volume(nifti), load_volume(labels, "mask")
    texts = {}
    for query, values in TARGETS.items():
        prepared = prepare_arrays(image, label_map, values, (-160.0, 240.0), SLICES, SIZE, "q")
        anchor = evidence_target(prepared, 1, np.random.default_rng(0), 4)
        texts[query] = format_answer(anchor, "the true anchor")

    def answer(slices, queries):
        return [texts[q] for q in queries]

    return answer


def run(images, out, answer, queries=QUERIES, **kwargs):
    return predict(
        images,
        queries,
        None,
        out,
        num_slices=SLICES,
        size=SIZE,
        window="abdomen",
        device="cpu",
        answer=answer,
        **kwargs,
    )


def test_a_dicom_series_gives_the_masks_of_the_same_scan_as_nifti(phantom, tmp_path):
    nifti, folder, labels, image, affine = phantom
    answer = oracle_answers(nifti, labels)
    (from_nifti,) = run(nifti, tmp_path / "nifti", answer, progress=False)
    (from_dicom,) = run(folder, tmp_path / "dicom", answer, progress=False)
    truth = load_volume(labels, "mask").array
    for n, query in enumerate(QUERIES, start=1):
        a = load_volume(tmp_path / "nifti" / f"query-{n}" / "mask.nii.gz", "mask")
        b = load_volume(tmp_path / "dicom" / f"query-{n}" / "mask.nii.gz", "mask")
        np.testing.assert_array_equal(a.array, b.array)
        np.testing.assert_allclose(a.affine, b.affine, atol=1e-5)
        # the organ asked for, found: overlap with its true labels
        hit = np.isin(truth, TARGETS[query])
        assert (a.array.astype(bool) & hit).sum() > 0.5 * a.array.astype(bool).sum() > 0
    # each mask sits on its own input's grid: NIfTI's shape and affine; the series' as NIfTI
    written = nib.load(str(tmp_path / "nifti" / "query-1" / "mask.nii.gz"))
    assert written.shape == image.shape and np.allclose(written.affine, affine)
    series_grid = nib.load(str(tmp_path / "dicom" / "query-1" / "mask.nii.gz"))
    assert series_grid.shape == image.shape and np.allclose(series_grid.affine, affine, atol=1e-5)
    # evidence: volume in mm^3 from the voxel size (1.5 x 1.2 x 2.5 mm = 4.5 mm^3), spacing
    for output in (from_nifti, from_dicom):
        for evidence in output.evidence:
            assert evidence["volume_mm3"] == pytest.approx(4.5 * evidence["mask_voxels"], abs=0.1)
            assert [evidence["spacing_mm"][a] for a in "zyx"] == pytest.approx([2.5, 1.2, 1.5])
    dicom_evidence = from_dicom.evidence[0]
    key_file = pydicom.dcmread(dicom_evidence["key_slice_file"])
    assert key_file.SOPInstanceUID == dicom_evidence["key_slice_sop_instance_uid"]
    # the key slice's file is the source slice the evidence names
    np.testing.assert_array_equal(
        key_file.pixel_array.T, image[:, :, dicom_evidence["key_slice_source"]]
    )


def test_the_seg_references_the_source_series_and_holds_one_segment_per_query(phantom, tmp_path):
    import highdicom as hd

    nifti, folder, labels, _, _ = phantom
    run(folder, tmp_path, oracle_answers(nifti, labels), progress=False)
    seg = hd.seg.segread(tmp_path / "segmentation.dcm")
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(folder.iterdir())]
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in referenced.ReferencedInstanceSequence} == {
        s.SOPInstanceUID for s in sources
    }
    assert [s.SegmentLabel for s in seg.SegmentSequence] == QUERIES
    # segment n holds query n's mask, frame by frame of the source images
    by_position = sorted(sources, key=lambda s: float(s.ImagePositionPatient[2]))
    uids = [s.SOPInstanceUID for s in by_position]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[1, 2]
    )
    for n in (1, 2):
        mask = np.asanyarray(nib.load(str(tmp_path / f"query-{n}" / "mask.nii.gz")).dataobj)
        positions = [float(s.ImagePositionPatient[2]) for s in by_position]
        assert positions == sorted(positions)
        # the NIfTI on the series' grid is (i, j, k); SEG frames are (k, j, i) in series order
        np.testing.assert_array_equal(pixels[..., n - 1], mask.transpose(2, 1, 0))


def test_several_queries_give_a_label_map_and_its_legend(phantom, tmp_path):
    nifti, _, labels, _, _ = phantom
    run(nifti, tmp_path, oracle_answers(nifti, labels), progress=False)
    legend = json.loads((tmp_path / "labels.json").read_text())
    assert [(e["value"], e["query"], e["folder"]) for e in legend] == [
        (1, QUERIES[0], "query-1"),
        (2, QUERIES[1], "query-2"),
    ]
    label_map = load_volume(tmp_path / "labels.nii.gz", "mask").array
    for entry in legend:
        mask = load_volume(tmp_path / entry["folder"] / "mask.nii.gz", "mask").array.astype(bool)
        assert entry["voxels"] == mask.sum() > 0
        assert entry["voxels_shown"] == (label_map == entry["value"]).sum()
        assert np.all(label_map[mask] > 0)
    assert set(np.unique(label_map)) <= {0, 1, 2}
    assert not (tmp_path / "segmentation.dcm").exists()  # NIfTI input: no SEG


def test_a_folder_of_scans_gives_one_folder_per_scan_with_a_progress_bar(phantom, tmp_path, capsys):
    import shutil

    nifti, folder, labels, _, _ = phantom
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(nifti, scans / "abdomen.nii.gz")
    shutil.copytree(folder, scans / "study-7")
    (scans / "notes.txt").write_text("not a scan")
    outputs = run(scans, tmp_path / "out", oracle_answers(nifti, labels), queries=QUERIES[:1])
    assert [o.folder.name for o in outputs] == ["abdomen", "study-7"]
    for name in ("abdomen", "study-7"):
        assert (tmp_path / "out" / name / "mask.nii.gz").exists()  # one query: no query-1/
        assert (tmp_path / "out" / name / "evidence_card.png").exists()
    assert (tmp_path / "out" / "study-7" / "segmentation.dcm").exists()
    assert "predict: 100%" in capsys.readouterr().err


def test_a_folder_with_two_series_is_refused_before_anything_is_written(tmp_path):
    from data.volume import VolumeError
    from tests.data.dicom_series import oblique_affine

    data = np.zeros((16, 16, 8), np.int16)
    write_series(tmp_path / "mixed", data, oblique_affine(), seed=1, series_uid="1.2.3.4")
    write_series(tmp_path / "mixed", data, oblique_affine(), seed=2, series_uid="1.2.3.5")
    with pytest.raises(VolumeError, match="holds 2 DICOM series.*1.2.3.4.*1.2.3.5"):
        run(tmp_path / "mixed", tmp_path / "out", lambda s, q: ["x"] * len(q), progress=False)
    assert not (tmp_path / "out").exists()


def test_statistics_of_a_mask_by_hand(tmp_path):
    """A 2 x 3 x 4 box of voxels 1.5 x 1.2 x 2.5 mm (4.5 mm^3), half at 30 HU and half at
    50 HU: 24 voxels, 108 mm^3, mean 40 HU, std 10 HU; an empty mask: 0 mm^3, no mean or std."""
    from data.grid import Volume
    from evaluation.predict import (
        STATISTICS_COLUMNS,
        QueryResult,
        Scan,
        mask_statistics,
        statistics_table,
        write_statistics,
    )

    affine = np.diag([1.5, 1.2, 2.5, 1.0])  # canonical voxel (x, y, z) -> mm
    array = np.full((6, 8, 10), -1000, np.int16)  # (z, y, x): air around the box
    array[1:3, 2:5, 3:5] = 30
    array[1:3, 2:5, 5:7] = 50
    scan = Scan(tmp_path / "ct.nii.gz", "ct", Volume(tmp_path, array, affine, affine))
    box = np.zeros(array.shape, bool)
    box[1:3, 2:5, 3:7] = True

    def result(query, mask, ok=True):
        return QueryResult(query, mask, np.zeros((2, 4, 4), bool), None, {"ok": ok})

    found = mask_statistics(scan, result("the box", box))
    assert (found.voxels, found.volume_mm3) == (24, pytest.approx(108.0))
    assert (found.mean_hu, found.std_hu) == (pytest.approx(40.0), pytest.approx(10.0))
    empty = mask_statistics(scan, result("nothing", np.zeros(array.shape, bool), ok=False))
    assert (empty.voxels, empty.volume_mm3, empty.mean_hu, empty.std_hu) == (0, 0.0, None, None)
    with (write_statistics([found, empty], tmp_path / "statistics.csv")).open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(STATISTICS_COLUMNS)
    assert [(r["query"], r["ok"], r["voxels"]) for r in rows] == [
        ("the box", "True", "24"),
        ("nothing", "False", "0"),
    ]
    assert [float(rows[0][c]) for c in ("volume_mm3", "mean_hu", "std_hu")] == [108, 40, 10]
    assert (rows[1]["volume_mm3"], rows[1]["mean_hu"], rows[1]["std_hu"]) == ("0.000", "", "")
    table = statistics_table([found, empty]).splitlines()
    assert table[2] == "| ct | the box | 24 | 0.11 | 40.0 | 10.0 |"
    assert table[3] == "| ct | nothing | 0 | 0.00 | - | - |"


def test_statistics_of_a_folder_of_scans_in_one_csv(phantom, tmp_path):
    """A NIfTI scan and its DICOM series, two queries (one answered with the true anchor, one
    with nonsense): one CSV row per scan and query, each volume and HU as read by hand from the
    written mask and the source image."""
    import shutil

    nifti, folder, labels, image, _ = phantom
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(nifti, scans / "abdomen.nii.gz")
    shutil.copytree(folder, scans / "study-7")
    oracle = oracle_answers(nifti, labels)
    queries = [QUERIES[0], "the unanswered one"]

    def answer(slices, asked):
        return [oracle(slices, [q])[0] if q in TARGETS else "no idea" for q in asked]

    outputs = run(scans, tmp_path / "out", answer, queries=queries, progress=False, statistics=True)
    with (tmp_path / "out" / "statistics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["scan"], r["query"]) for r in rows] == [
        (name, q) for name in ("abdomen", "study-7") for q in queries
    ]
    assert [len(o.statistics) for o in outputs] == [2, 2]
    for row in rows:
        written = tmp_path / "out" / row["scan"] / f"query-{queries.index(row['query']) + 1}"
        mask = np.asanyarray(nib.load(str(written / "mask.nii.gz")).dataobj) > 0  # stored (i, j, k)
        assert int(row["voxels"]) == mask.sum()
        assert float(row["volume_mm3"]) == pytest.approx(4.5 * mask.sum(), abs=1e-3)
        if row["query"] == QUERIES[0]:
            assert row["ok"] == "True" and mask.sum() > 0
            values = image[mask].astype(np.float64)
            assert float(row["mean_hu"]) == pytest.approx(values.mean(), abs=1e-3)
            assert float(row["std_hu"]) == pytest.approx(values.std(), abs=1e-3)
        else:
            assert (row["ok"], row["voxels"], row["mean_hu"], row["std_hu"]) == (
                "False",
                "0",
                "",
                "",
            )


@pytest.mark.slow
def test_the_command_line_on_a_dicom_series_with_a_queries_file(
    phantom, tiny_model, tmp_path, capsys
):
    from evaluation.predict import main

    _, folder, _, _, _ = phantom
    model = tiny_model
    queries = tmp_path / "queries.txt"
    queries.write_text("# asked of every scan\nthe organ that secretes bile\n\nboth kidneys\n")
    argv = ["--image", str(folder), "--queries", str(queries), "--model", str(model)]
    argv += ["--out-dir", str(tmp_path / "out"), "--slices", "16", "--slice-size", "96"]
    argv += ["--device", "cpu", "--statistics"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 2 + 1 + 1 + 2 + 2  # answers, blank, where, table head, table
    assert all(str(folder) in line for line in lines[:2])
    assert "secretes bile" in lines[0] and "both kidneys" in lines[1]
    assert lines[3] == f"statistics -> {tmp_path / 'out' / 'statistics.csv'}"
    assert lines[4].startswith("| scan | query | voxels | volume mL | mean HU | std HU |")
    assert len((tmp_path / "out" / "statistics.csv").read_text().splitlines()) == 3
    assert "Traceback" not in captured.err
    for n in (1, 2):
        evidence = json.loads((tmp_path / "out" / f"query-{n}" / "evidence.json").read_text())
        assert evidence["query"] == QUERIES[n - 1] and "series_instance_uid" in evidence
    assert (tmp_path / "out" / "segmentation.dcm").exists()
    assert (tmp_path / "out" / "predict.log").exists()


def strip(folder, tmp_path, keywords):
    """A copy of a DICOM series without ``keywords``, as an anonymiser may export it."""
    out = tmp_path / f"stripped-{len(keywords)}"
    out.mkdir()
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path)
        for keyword in keywords:
            if keyword in ds:
                delattr(ds, keyword)
        ds.save_as(out / path.name)
    return out


def test_an_anonymised_series_gets_a_seg_with_its_type2_attributes_empty(phantom, tmp_path):
    import highdicom as hd

    nifti, folder, labels, _, _ = phantom
    dropped = ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID")
    series = strip(folder, tmp_path, dropped)
    run(series, tmp_path / "out", oracle_answers(nifti, labels), progress=False)
    seg = hd.seg.segread(tmp_path / "out" / "segmentation.dcm")
    for keyword in dropped:
        assert keyword in seg and not seg.data_element(keyword).value, keyword
    assert seg.PatientID == "PH0001"  # what the series has is kept


def test_a_seg_that_cannot_be_made_is_a_warning_and_the_nifti_results_stay(
    phantom, tmp_path, caplog
):
    nifti, folder, labels, _, _ = phantom
    series = strip(folder, tmp_path, ("StudyInstanceUID",))  # Type 1: a SEG cannot do without
    with caplog.at_level("WARNING", logger="evaluation.predict"):
        run(series, tmp_path / "out", oracle_answers(nifti, labels), progress=False)
    (warning,) = [r for r in caplog.records if "no DICOM SEG written" in r.getMessage()]
    assert str(series) in warning.getMessage() and "\n" not in warning.getMessage()
    assert not (tmp_path / "out" / "segmentation.dcm").exists()
    for n in (1, 2):
        mask = nib.load(str(tmp_path / "out" / f"query-{n}" / "mask.nii.gz"))
        assert np.asanyarray(mask.dataobj).any()
