"""Test data: a phantom CT stored both as NIfTI and as a DICOM CT series written with pydicom,
on an oblique grid (ImageOrientationPatient not axis-aligned), files shuffled and instance
numbers scrambled so nothing but the slice positions orders them."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def rotation(degrees_about_z: float, degrees_about_x: float) -> np.ndarray:
    a, b = np.radians(degrees_about_z), np.radians(degrees_about_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def oblique_affine(spacing_xyz=(1.5, 1.2, 2.5), tilt=(12.0, 9.0)) -> np.ndarray:
    """A RAS affine whose voxel axes run roughly L, P, S, turned by ``tilt`` degrees (about z,
    then x): not axis-aligned, but each axis clearly nearest one patient axis."""
    affine = np.eye(4)
    affine[:3, :3] = rotation(*tilt) @ np.diag([-1.0, -1.0, 1.0]) @ np.diag(spacing_xyz)
    affine[:3, 3] = [80.0, 60.0, -40.0]
    return affine


def write_nifti(path: Path, data_ijk: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data_ijk, affine), str(path))
    return path


def write_series(
    folder: Path,
    data_ijk: np.ndarray,
    affine: np.ndarray,
    seed: int = 0,
    series_uid: str | None = None,
    study_uid: str | None = None,
    description: str = "phantom",
) -> list[Path]:
    """Write ``data_ijk`` (voxel axes i, j, k of the RAS ``affine``, int16 HU) as one CT series:
    slice k holds rows j and columns i. Returns the files in slice order (k = 0, 1, ...)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lps = LPS_TO_RAS @ affine
    col_step, row_step, slice_step = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    sx, sy = np.linalg.norm(col_step), np.linalg.norm(row_step)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_uid = generate_uid()
    depth = data_ijk.shape[2]
    names = [f"img{n:05d}" for n in rng.permutation(10_000)[:depth]]
    numbers = rng.permutation(depth) + 1
    files = [folder / names[k] for k in range(depth)]
    for k in rng.permutation(depth):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(files[k]), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = "CT"
        ds.PatientName = "Phantom^Test"
        ds.PatientID = "PH0001"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyDate = "20240101"
        ds.StudyTime = "120000"
        ds.StudyID = "1"
        ds.AccessionNumber = "A1"
        ds.ReferringPhysicianName = ""
        ds.Manufacturer = "phantom"
        ds.SeriesNumber = 3
        ds.SeriesDescription = description
        ds.InstanceNumber = int(numbers[k])
        ds.ImageOrientationPatient = [f"{v:.10f}" for v in (*col_step / sx, *row_step / sy)]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in lps[:3, 3] + k * slice_step]
        ds.PixelSpacing = [f"{sy:.6f}", f"{sx:.6f}"]  # row spacing, then column spacing
        ds.SliceThickness = f"{np.linalg.norm(slice_step):.6f}"
        ds.Rows, ds.Columns = int(data_ijk.shape[1]), int(data_ijk.shape[0])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.PixelData = np.ascontiguousarray(data_ijk[:, :, k].T.astype(np.int16)).tobytes()
        ds.save_as(files[k], enforce_file_format=True)
    return files


def oblique_phantom(tmp: Path, shape=(40, 64, 64), seed: int = 3):
    """One phantom case as (NIfTI path, DICOM folder, label map NIfTI path, data_ijk, affine):
    the same voxels and geometry in both formats."""
    from data.phantoms import make_case

    case = make_case(np.random.default_rng(seed), shape, lesion_odds=0.0)
    affine = oblique_affine()
    # canonical (z, y, x) = (S, P, L) -> stored (i, j, k) along the affine's L, P, S axes
    image = np.ascontiguousarray(case.image.transpose(2, 1, 0)).astype(np.int16)
    labels = np.ascontiguousarray(case.labels.transpose(2, 1, 0)).astype(np.uint8)
    nifti = write_nifti(tmp / "ct.nii.gz", image, affine)
    mask = write_nifti(tmp / "labels.nii.gz", labels, affine)
    folder = tmp / "series"
    write_series(folder, image, affine)
    return nifti, folder, mask, image, affine
