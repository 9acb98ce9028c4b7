"""DICOM series reading (shuffled files, oblique grid, either slice direction) against the same
scan as NIfTI, refused folders, and the DICOM SEG's references to its source series."""

import numpy as np
import pydicom
import pytest

from data.dicom import list_series, read_series, write_seg
from data.volume import VolumeError, load_volume, save_mask
from tests.data.dicom_series import oblique_affine, oblique_phantom, write_nifti, write_series


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return oblique_phantom(tmp_path_factory.mktemp("oblique"))


def test_a_shuffled_oblique_series_reads_as_the_same_scan_stored_as_nifti(phantom):
    nifti, folder, _, image, affine = phantom
    # nothing but the positions orders the files: names and instance numbers are shuffled
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(folder.iterdir())]
    assert [h.InstanceNumber for h in headers] != sorted(h.InstanceNumber for h in headers)
    orientation = np.asarray(headers[0].ImageOrientationPatient, float)
    assert np.min(np.abs(orientation[np.abs(orientation) > 1e-9])) < 0.99  # not axis-aligned
    series = read_series(folder)
    from_nifti = load_volume(nifti)
    np.testing.assert_array_equal(series.volume.array, from_nifti.array)
    np.testing.assert_allclose(series.volume.affine, from_nifti.affine, atol=1e-5)
    np.testing.assert_allclose(series.volume.spacing, (2.5, 1.2, 1.5), atol=1e-6)
    assert len(series.files) == image.shape[2] and series.modality == "CT"
    # slice k of the grid is series.files[k]: its pixels are the stored slice k
    for k in (0, 17, image.shape[2] - 1):
        pixels = pydicom.dcmread(series.files[k]).pixel_array
        np.testing.assert_array_equal(pixels, image[:, :, k].T)


def test_slices_stored_in_the_other_direction_give_the_same_canonical_array(phantom, tmp_path):
    _, _, _, image, affine = phantom
    flipped = affine.copy()
    flipped[:3, 2] = -affine[:3, 2]
    flipped[:3, 3] = affine[:3, 3] + (image.shape[2] - 1) * affine[:3, 2]
    write_series(tmp_path / "s", np.ascontiguousarray(image[:, :, ::-1]), flipped, seed=5)
    a = read_series(tmp_path / "s").volume
    b = load_volume(write_nifti(tmp_path / "ct.nii.gz", image, affine))
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-5)


def test_a_mask_written_on_the_series_grid_reads_back_as_the_same_canonical_mask(phantom, tmp_path):
    _, folder, _, _, _ = phantom
    series = read_series(folder)
    mask = series.volume.array > 100
    written = save_mask(mask, series.volume, tmp_path / "mask.nii.gz")
    back = load_volume(written, "mask")
    np.testing.assert_array_equal(back.array.astype(bool), mask)
    np.testing.assert_allclose(back.affine, series.volume.affine, atol=1e-6)


def test_a_folder_with_two_series_is_refused_with_both_listed(tmp_path):
    data = np.zeros((16, 16, 8), np.int16)
    write_series(tmp_path, data, oblique_affine(), seed=1, series_uid="1.2.3.4", description="a")
    write_series(tmp_path, data, oblique_affine(), seed=2, series_uid="1.2.3.5", description="b")
    assert {s.uid for s in list_series(tmp_path)} == {"1.2.3.4", "1.2.3.5"}
    with pytest.raises(VolumeError, match="holds 2 DICOM series") as err:
        read_series(tmp_path)
    assert "1.2.3.4" in str(err.value) and "1.2.3.5" in str(err.value)
    assert "8 files" in str(err.value) and str(tmp_path) in str(err.value)


def test_a_missing_slice_an_empty_folder_and_a_broken_file_are_refused(tmp_path):
    files = write_series(tmp_path / "gap", np.zeros((16, 16, 10), np.int16), oblique_affine())
    files[4].unlink()
    with pytest.raises(VolumeError, match="not even"):
        read_series(tmp_path / "gap")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VolumeError, match="no DICOM series"):
        load_volume(tmp_path / "empty")
    files = write_series(tmp_path / "cut", np.zeros((16, 16, 10), np.int16), oblique_affine())
    files[3].write_bytes(files[3].read_bytes()[:400])
    with pytest.raises(VolumeError, match=str(tmp_path / "cut")):
        read_series(tmp_path / "cut")


def test_the_seg_references_every_image_of_the_source_series_and_holds_the_masks(phantom, tmp_path):
    import highdicom as hd

    _, folder, _, _, _ = phantom
    series = read_series(folder)
    bright = series.volume.array > 100
    dark = np.zeros_like(bright)
    dark[10:20, 20:30, 25:40] = True
    out = write_seg(series, [bright, dark], ["the bright parts", "a box"], tmp_path / "seg.dcm")
    seg = hd.seg.segread(out)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in series.files]
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == series.uid == sources[0].SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in referenced.ReferencedInstanceSequence} == {
        s.SOPInstanceUID for s in sources
    }
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.SeriesInstanceUID != series.uid
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["the bright parts", "a box"]
    # frames per source image, back in the series' stored order, then canonical
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[s.SOPInstanceUID for s in sources], segment_numbers=[1, 2]
    )
    from data.volume import to_canonical

    for n, mask in enumerate((bright, dark)):
        stored = pixels[..., n].transpose(2, 1, 0)  # (k, j, i) -> (i, j, k)
        canonical, _ = to_canonical(stored, series.volume.source_affine)
        np.testing.assert_array_equal(canonical.astype(bool), mask)
