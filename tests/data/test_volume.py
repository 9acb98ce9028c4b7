"""NIfTI reading in one orientation, writing masks back on the source grid, and bad files."""

import gzip

import nibabel as nib
import numpy as np
import pytest

from data.volume import VolumeError, check_pair, load_volume, save_mask


def write(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def test_two_orientations_of_one_volume_read_as_the_same_canonical_array(tmp_path):
    rng = np.random.default_rng(0)
    lps = rng.normal(size=(12, 20, 24)).astype(np.float32)  # canonical (z, y, x)
    xyz = lps.transpose(2, 1, 0)  # (x: L, y: P, z: S)
    aff_lps = np.diag([-1.0, -1.0, 2.0, 1.0])  # L and P in RAS world are negative directions
    ras = xyz[::-1, ::-1, :]
    aff_ras = np.diag([1.0, 1.0, 2.0, 1.0])
    aff_ras[:3, 3] = [-23.0, -19.0, 0.0]
    a = load_volume(write(tmp_path / "lps.nii.gz", np.ascontiguousarray(xyz), aff_lps))
    b = load_volume(write(tmp_path / "ras.nii", np.ascontiguousarray(ras), aff_ras))
    np.testing.assert_array_equal(a.array, lps)
    np.testing.assert_array_equal(b.array, lps)
    np.testing.assert_allclose(a.affine, b.affine)


def test_mask_round_trip_keeps_grid_orientation_and_affine(tmp_path):
    data = np.zeros((20, 24, 16), np.int16)  # stored (x, y, z), oblique-free LAS-like affine
    affine = np.array([[-0.8, 0, 0, 40.0], [0, 0.8, 0, -30.0], [0, 0, 2.5, 12.0], [0, 0, 0, 1]])
    data[3:9, 5:11, 2:7] = 1
    src = write(tmp_path / "ct.nii.gz", data, affine)
    vol = load_volume(src)
    out = save_mask(vol.array > 0, src, tmp_path / "pred" / "mask.nii.gz")
    back = nib.load(str(out))
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), (data > 0).astype(np.uint8))
    np.testing.assert_allclose(back.affine, affine)
    assert back.shape == data.shape
    assert not list((tmp_path / "pred").glob(".*partial*"))


def test_save_mask_rejects_a_mask_of_the_wrong_shape(tmp_path):
    src = write(tmp_path / "ct.nii", np.zeros((16, 16, 10), np.int16), np.eye(4))
    with pytest.raises(VolumeError, match="does not fit"):
        save_mask(np.zeros((10, 16, 15), bool), src, tmp_path / "m.nii")
    assert not (tmp_path / "m.nii").exists()


def test_truncated_and_corrupt_files_name_the_file(tmp_path):
    good = write(tmp_path / "ct.nii.gz", np.zeros((16, 16, 10), np.int16), np.eye(4))
    raw = good.read_bytes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(VolumeError, match="truncated.nii.gz"):
        load_volume(truncated)
    garbage = tmp_path / "garbage.nii"
    garbage.write_bytes(b"not a nifti file at all" * 30)
    with pytest.raises(VolumeError, match="garbage.nii"):
        load_volume(garbage)
    bad_gz = tmp_path / "bad.nii.gz"
    bad_gz.write_bytes(gzip.compress(b"\x00" * 100))
    with pytest.raises(VolumeError, match="bad.nii.gz"):
        load_volume(bad_gz)
    with pytest.raises(VolumeError, match="not found"):
        load_volume(tmp_path / "missing.nii.gz")


def test_2d_4d_small_and_nan_volumes_are_rejected(tmp_path):
    with pytest.raises(VolumeError, match="3D volume"):
        load_volume(write(tmp_path / "flat.nii", np.zeros((16, 16), np.int16), np.eye(4)))
    with pytest.raises(VolumeError, match="3D volume"):
        load_volume(write(tmp_path / "t.nii", np.zeros((16, 16, 10, 3), np.int16), np.eye(4)))
    with pytest.raises(VolumeError, match="too small"):
        load_volume(write(tmp_path / "tiny.nii", np.zeros((16, 16, 2), np.int16), np.eye(4)))
    nan = np.zeros((16, 16, 10), np.float32)
    nan[1, 2, 3] = np.nan
    with pytest.raises(VolumeError, match="1 NaN"):
        load_volume(write(tmp_path / "nan.nii", nan, np.eye(4)))


def test_mismatched_image_and_mask(tmp_path):
    image = load_volume(write(tmp_path / "i.nii", np.zeros((16, 16, 10), np.int16), np.eye(4)))
    mask = load_volume(write(tmp_path / "m.nii", np.zeros((16, 16, 12), np.uint8), np.eye(4)))
    with pytest.raises(VolumeError, match="m.nii: mask shape"):
        check_pair(image, mask)
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    mask = load_volume(write(tmp_path / "m2.nii", np.zeros((16, 16, 10), np.uint8), shifted))
    with pytest.raises(VolumeError, match="affine"):
        check_pair(image, mask)
