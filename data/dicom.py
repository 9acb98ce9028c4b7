"""Reading a CT stored as a DICOM series, and writing predicted masks back as a DICOM SEG.

Reading uses SimpleITK's series reader (ITK's GDCM image IO): ``GetGDCMSeriesIDs`` tells the
series of a folder apart, ``GetGDCMSeriesFileNames`` sorts a series' files by their position
along the slice normal (not by file name or instance number, which are often wrong), and the
reader applies the rescale slope/intercept and gives origin, spacing and direction from the
headers. That is the reader 3D Slicer and most ITK pipelines trust; pydicom alone would leave the
sorting, rescaling and geometry to us. pydicom reads the headers (without pixels) that the SEG
must reference and that the checks below need; highdicom writes the SEG, which requires them.

The series' geometry becomes a NIfTI-style RAS affine over its voxel axes (i = column, j = row,
k = slice in sorted order) and goes through :func:`data.volume.to_canonical`, the step every NIfTI
file goes through, so one scan stored as NIfTI or as DICOM reads as the same array.

Refused, with the folder named: a folder with no DICOM series, with several series (listed, so
the user can pick one), a multi-frame (enhanced) object, and a series whose slices are not
evenly spaced (a missing slice would silently stretch the grid).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.grid import Volume, VolumeError, to_canonical, to_stored

# Slice positions may differ from even spacing by this share of the spacing (DICOM stores
# positions as decimal strings, so exact equality never holds).
SPACING_TOLERANCE = 0.01
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class SeriesInfo:
    """One series found in a folder."""

    uid: str  # SeriesInstanceUID
    description: str  # SeriesDescription (may be empty)
    modality: str
    files: int


@dataclass(frozen=True, eq=False)
class DicomSeries:
    """A read series: the volume in canonical orientation and the files in slice order."""

    folder: Path
    volume: Volume
    files: tuple[Path, ...]  # slice k of the stored grid is files[k]
    uid: str  # SeriesInstanceUID
    modality: str


def _sitk():
    import SimpleITK as sitk

    # ITK prints its own warnings straight to stderr; every condition they report is checked
    # here and raised with the folder named instead.
    sitk.ProcessObject_SetGlobalWarningDisplay(False)
    return sitk


def read_header(path: Path):
    """A DICOM file's header (no pixel data), or :class:`VolumeError` naming the file."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError) as err:
        raise VolumeError(f"{path}: not a readable DICOM file ({err})") from None


def list_series(folder: str | Path) -> list[SeriesInfo]:
    """The DICOM series directly inside ``folder`` (not its subfolders)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VolumeError(f"{folder}: not a folder")
    sitk = _sitk()
    reader = sitk.ImageSeriesReader()
    found = []
    for uid in reader.GetGDCMSeriesIDs(str(folder)):
        files = reader.GetGDCMSeriesFileNames(str(folder), uid)
        head = read_header(Path(files[0]))
        found.append(
            SeriesInfo(
                uid=str(uid),
                description=str(head.get("SeriesDescription", "")),
                modality=str(head.get("Modality", "")),
                files=len(files),
            )
        )
    return found


def is_series_folder(folder: str | Path) -> bool:
    """Whether ``folder`` directly holds at least one DICOM series."""
    folder = Path(folder)
    return folder.is_dir() and bool(_sitk().ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def _check_spacing(folder: Path, headers: list) -> None:
    rows = np.asarray(headers[0].ImageOrientationPatient[:3], dtype=float)
    cols = np.asarray(headers[0].ImageOrientationPatient[3:], dtype=float)
    normal = np.cross(rows, cols)
    for h in headers[1:]:
        if not np.allclose(np.asarray(h.ImageOrientationPatient, float), [*rows, *cols], atol=1e-4):
            raise VolumeError(
                f"{folder}: slices of series {headers[0].SeriesInstanceUID} have different "
                "orientations (ImageOrientationPatient); one grid cannot hold them"
            )
    position = np.array(
        [np.dot(np.asarray(h.ImagePositionPatient, float), normal) for h in headers]
    )
    steps = np.diff(position)
    if len(steps) == 0:
        return
    mean = float(np.mean(steps))
    if abs(mean) < 1e-6 or np.max(np.abs(steps - mean)) > SPACING_TOLERANCE * abs(mean):
        raise VolumeError(
            f"{folder}: slice spacing of series {headers[0].SeriesInstanceUID} is not even "
            f"({np.min(np.abs(steps)):.3f} to {np.max(np.abs(steps)):.3f} mm): missing or "
            "duplicate slices"
        )


def read_series(folder: str | Path) -> DicomSeries:
    """Read the one DICOM series in ``folder`` (files in any order) in canonical orientation.

    Raises :class:`data.volume.VolumeError` naming the folder for no series, several series
    (listed with their UID, description and file count), a multi-frame object, uneven slice
    spacing or files the reader cannot decode.
    """
    folder = Path(folder)
    series = list_series(folder)
    if not series:
        raise VolumeError(f"{folder}: no DICOM series in this folder")
    if len(series) > 1:
        listed = "; ".join(
            f"{s.uid} ({s.modality} {s.description!r}, {s.files} files)".replace(" ''", "")
            for s in series
        )
        raise VolumeError(
            f"{folder}: holds {len(series)} DICOM series, give a folder with one: {listed}"
        )
    sitk = _sitk()
    reader = sitk.ImageSeriesReader()
    files = tuple(Path(f) for f in reader.GetGDCMSeriesFileNames(str(folder), series[0].uid))
    headers = [read_header(f) for f in files]
    if int(headers[0].get("NumberOfFrames", 1) or 1) > 1:
        raise VolumeError(
            f"{files[0]}: multi-frame (enhanced) DICOM is not read; convert the series to NIfTI "
            "(e.g. dcm2niix) or export it as single-frame slices"
        )
    for f, h in zip(files, headers):
        if "ImagePositionPatient" not in h or "ImageOrientationPatient" not in h:
            raise VolumeError(f"{f}: no ImagePositionPatient/ImageOrientationPatient, no geometry")
    _check_spacing(folder, headers)
    reader.SetFileNames([str(f) for f in files])
    try:
        image = reader.Execute()
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else "unreadable"
        raise VolumeError(f"{folder}: the series' pixel data cannot be read ({reason})") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(f"{folder}: not a 3D single-channel series")
    lps = np.eye(4)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    lps[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=float)
    lps[:3, 3] = image.GetOrigin()
    ras = LPS_TO_RAS @ lps
    data = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # (k, j, i) -> (i, j, k)
    array, affine = to_canonical(data, ras)
    volume = Volume(path=folder, array=array, affine=affine, source_affine=ras)
    return DicomSeries(
        folder=folder,
        volume=volume,
        files=files,
        uid=series[0].uid,
        modality=series[0].modality,
    )


# Type 2 attributes of the Patient and General Study modules that a SEG copies from its source
# images: they must be present but may be empty. Anonymised exports often drop them, and
# highdicom reads them as attributes, so a missing one is written empty (as the standard allows).
TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "ReferringPhysicianName",
    "AccessionNumber",
)


def write_seg(
    series: DicomSeries,
    masks: list[np.ndarray],
    labels: list[str],
    out: str | Path,
    software_version: str = "0",
) -> Path:
    """Write canonical (z, y, x) masks as one DICOM SEG (one segment per mask, labelled by
    ``labels``) that references every image of ``series``, so a viewer overlays it on the series.

    Segments are BINARY and may overlap (each has its own frames). A free-form query has no
    coded meaning, so each segment is typed "Anatomical Structure" and its label carries the
    query (cut to the 64 characters DICOM allows). Patient and study attributes of Type 2 that
    the series lacks are written empty (``TYPE2_COPIED``). Written to a temporary name and
    renamed.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    out = Path(out)
    if len(masks) != len(labels) or not masks:
        raise ValueError(f"{out}: {len(masks)} masks for {len(labels)} labels")
    sources = [read_header(f) for f in series.files]
    for source in sources:
        for keyword in TYPE2_COPIED:
            if keyword not in source:
                setattr(source, keyword, "")
    frames = []
    for mask in masks:
        if mask.shape != series.volume.array.shape:
            raise VolumeError(
                f"{out}: mask shape (z, y, x) {mask.shape} does not fit series {series.folder} "
                f"{series.volume.array.shape}"
            )
        # (i, j, k) stored order -> (k, j, i): frame k is files[k], rows j, columns i
        frames.append(
            to_stored(mask.astype(np.uint8), series.volume.source_affine).transpose(2, 1, 0)
        )
    pixels = np.stack(frames, axis=-1)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="MedVol-R1", family=codes.cid7162.ArtificialIntelligence, version=software_version
    )
    segments = [
        hd.seg.SegmentDescription(
            segment_number=n,
            segment_label=label[:64],
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=codes.SCT.AnatomicalStructure,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for n, label in enumerate(labels, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=hd.UID(),
        series_number=int(sources[0].get("SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="MedVol-R1",
        manufacturer_model_name="MedVol-R1 reasoning segmentation",
        software_versions=software_version,
        device_serial_number="0",
        series_description="MedVol-R1 segmentation",
        # an all-empty segmentation still needs frames to be a valid object
        omit_empty_frames=bool(pixels.any()),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    try:
        seg.save_as(tmp)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
