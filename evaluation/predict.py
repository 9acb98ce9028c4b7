"""Segment a user's CT scans from free-form queries: masks (NIfTI, DICOM SEG), evidence, cards.

    python -m evaluation.predict --image CT.nii.gz|SERIES_DIR|FOLDER_OF_SCANS \
        --query "the organ that secretes bile" [--query ... | --queries FILE] \
        [--adapter ADAPTER_DIR] [--model QWEN3VL_DIR] [--sam-checkpoint MEDSAM2.pt] \
        --out-dir OUTDIR [--slices N] [--slice-size PX] [--window abdomen | --window -160 240] \
        [--statistics] [--samples N [--temperature T] [--seed N] [--min-agreement A]] \
        [--device cpu|cuda] [-v] [--debug]

Inputs (``--image``, repeatable): a NIfTI file; a folder holding one DICOM series (files in any
order; read by :mod:`data.dicom`, through the same orientation step as NIfTI, so one scan gives
the same mask in either format); or a folder of scans (its NIfTI files and its subfolders that
hold a DICOM series). A folder with several series is refused with the series listed. Queries:
``--query`` (repeatable) and/or ``--queries FILE`` (one per line; blank lines and lines starting
with ``#`` skipped). The model is loaded once for all scans and queries.

Outputs, per scan in ``OUTDIR`` (one scan) or ``OUTDIR/<scan name>/`` (several), each on the
input's grid, orientation and affine:

- one query: ``mask.nii.gz``, ``evidence.json``, ``evidence_card.png``;
- several queries: that set in ``query-<n>/`` per query n, plus ``labels.nii.gz`` (value n is
  query n; a voxel that several queries claim takes the smallest target's value, so a lesion
  inside its organ stays visible) and ``labels.json`` (its legend);
- DICOM input also ``segmentation.dcm``: a DICOM SEG with one segment per query that references
  the source series (overlapping segments kept as they are).

``evidence.json``: the key slice in the sampled-slice frame and in the source volume's own axial
index (for DICOM also the file and SOPInstanceUID of that slice), boxes in source pixels and in the
resized-slice frame, the reasoning, the propagator, the window, the target's voxel count and volume
in mm^3, and the scan's voxel spacing. A model answer that does not parse is reported there and
gives an empty mask, not a crash. Without ``--sam-checkpoint`` the scikit-image baseline
propagates (and says so). The adapter's ``medvol.json`` (learner.training_frame) gives the base
model, slices, slice size and window it was trained with: flags left out take them, and a flag
that contradicts them stops with an error naming both (``--window`` may name ``data.window`` or
any ``data.suite_windows`` entry). An adapter without one (written before it existed) takes the
flags, else 64 slices of 256 px in the abdominal window, with a warning, and needs ``--model``.
A scan's files appear together when it is done (written under a temporary name first); the log
goes to ``OUTDIR/predict.log``.

``--statistics`` adds ``OUTDIR/statistics.csv``, one row per scan and query over the whole run
(:data:`STATISTICS_COLUMNS`): the mask's volume in mm^3 (its voxels times the voxel volume of the
scan's spacing) and the mean and standard deviation of the image's intensities (HU for CT) inside
it, read from the original volume on the grid of the written mask; an empty mask has volume 0
and no mean or std. The console gets the same figures as a table.

``--samples N`` (default 1: one greedy answer, the output above) draws N answers per query at
``--temperature`` (default 1.0, ``rollout.temperature``'s), seeded with ``--seed`` per scan,
propagates each well-formed anchor, and writes as the mask their consensus: a voxel is in when
more than half of the N masks hold it (a malformed answer counts as an empty mask). The masks are
compared on the sampled slices, where the propagator draws them; the consensus is mapped to the
source grid by the same nearest-voxel lookup as each mask, so it is also the voxel majority of
the N masks on the source grid. evidence.json then adds ``agreement``, the mean pairwise Dice of
the N masks (``evaluation.metrics.mask_agreement``; two empty masks agree, Dice 1),
``low_agreement`` (below ``--min-agreement``, default :data:`MIN_AGREEMENT`; also flagged on
the console line of that query) and ``anchors``, every sampled answer (``answer``, ``ok``,
``key_slice``, ``boxes`` or ``failure``, and its ``agreement``, its mean Dice with the other
N - 1 masks), as ``evaluation.review`` lists them. Its top-level anchor, reasoning and answer
are those of the well-formed sample closest to the consensus (highest Dice with it;
``representative`` is its number in ``anchors``, 1-based); with none well-formed the query has
no usable answer.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.cli import (
    ArgumentParser,
    UsageError,
    add_device_argument,
    command,
    existing_file,
    log_to_file,
    resolve_device,
)
from common.config import (
    WINDOW_PRESETS,
    DataConfig,
    RolloutConfig,
    WindowError,
    resolve_window,
)
from common.runtime import set_default_environment
from learner.training_frame import FILE_NAME, TrainingFrame, TrainingFrameError, base_model_digest

log = logging.getLogger(__name__)

MAX_QUERY_CHARS = 1000
MAX_QUERIES = 255  # label values of the uint8 multi-label mask
MAX_SAMPLES = 64  # answers drawn per query with --samples
MIN_AGREEMENT = 0.5  # --min-agreement: a query whose N masks agree less is flagged for review
NIFTI_SUFFIXES = (".nii", ".nii.gz")

# Answers a list of queries about one scan's prepared slices (S, H, W) with the policy's texts.
Answerer = Callable[[np.ndarray, list[str]], list[str]]
# With --samples N > 1: the N texts drawn for each query, one list per query.
Sampler = Callable[[np.ndarray, list[str]], list[list[str]]]


class PredictError(ValueError):
    """Input that cannot be predicted on; names the file or argument."""


@dataclass(frozen=True, eq=False)
class Scan:
    """A user's CT, read: where it came from, its name in the outputs, its canonical volume and,
    for DICOM input, the series (the SEG must reference it)."""

    path: Path
    name: str
    volume: object  # data.volume.Volume
    series: object | None = None  # data.dicom.DicomSeries


@dataclass(frozen=True, eq=False)
class QueryResult:
    """One query's outcome on one scan."""

    query: str
    mask: np.ndarray  # (Z, Y, X) bool on the source grid, canonical orientation
    frame_mask: np.ndarray  # (S, H, W) bool in the policy's frame (for the card)
    anchor: object | None  # data.answer.EvidenceAnchor, None for an unusable answer
    evidence: dict


@dataclass(frozen=True)
class PredictSettings:
    """The base model and the frame a prediction runs in."""

    model: Path | None  # None only when an answerer stands in for the policy
    num_slices: int
    size: int
    window: tuple[float, float]
    box_coords: str = "pixels"  # the frame of boxes in the policy's answers (data.box_coords)


def _window_text(window: tuple[float, float]) -> str:
    return " ".join(f"{v:g}" for v in window)


def resolve_settings(
    adapter: Path | None,
    model: Path | None,
    num_slices: int | None = None,
    size: int | None = None,
    window: str | tuple[float, float] | None = None,
    need_model: bool = True,
) -> PredictSettings:
    """The model, slices, size and window of a prediction: those given, the rest from the
    adapter's medvol.json (learner.training_frame); a given one that contradicts it is an error
    naming both. An adapter without medvol.json (written before it existed), or none, takes what
    is given and common.config's defaults for the rest, with a warning for the adapter."""
    if window is not None:
        try:
            window = resolve_window(window, "--window")
        except WindowError as err:
            raise PredictError(str(err)) from None
    frame = None
    if adapter is not None:
        if not Path(adapter).is_dir():
            raise PredictError(f"--adapter {adapter}: no such adapter folder")
        try:
            frame = TrainingFrame.read_if_any(adapter)
        except TrainingFrameError as err:
            raise PredictError(str(err)) from None
        if frame is None:
            log.warning(
                "--adapter %s: no %s (an adapter from before it): the slices, size and window "
                "are the given or default ones, and must be those it was trained with",
                adapter,
                FILE_NAME,
            )
    if frame is None:
        defaults = DataConfig()
        if need_model and model is None:
            raise PredictError("--model: not given, and no adapter's medvol.json names a base")
        return PredictSettings(
            Path(model) if model is not None else None,
            num_slices if num_slices is not None else defaults.num_slices,
            size if size is not None else defaults.slice_size,
            window if window is not None else resolve_window(defaults.window, "data.window"),
            defaults.box_coords,
        )
    trained = f"the adapter {adapter} was trained"
    if num_slices is not None and num_slices != frame.num_slices:
        raise PredictError(
            f"--slices {num_slices}: {trained} on {frame.num_slices} slices ({FILE_NAME})"
        )
    if size is not None and size != frame.slice_size:
        raise PredictError(
            f"--slice-size {size}: {trained} on {frame.slice_size} px slices ({FILE_NAME})"
        )
    windows = {tuple(frame.window): "data.window"}
    for suite, low_high in frame.suite_windows.items():
        windows.setdefault(tuple(low_high), f"suite {suite}")
    if window is not None and tuple(window) not in windows:
        known = ", ".join(f"{_window_text(w)} ({where})" for w, where in windows.items())
        raise PredictError(
            f"--window {_window_text(window)}: {trained} with the window {known} ({FILE_NAME})"
        )
    if model is None and need_model:
        if not (Path(frame.base_model) / "config.json").is_file():
            raise PredictError(
                f"--model: not given, and the adapter's base {frame.base_model} ({FILE_NAME}) "
                "is not a checkpoint folder here; give --model"
            )
        model = Path(frame.base_model)
    elif model is not None and (Path(model) / "config.json").is_file():
        if base_model_digest(model) != frame.base_model_sha256:
            raise PredictError(
                f"--model {model}: {trained} on the base {frame.base_model} ({FILE_NAME}), "
                "whose config.json or weight files differ from these"
            )
    return PredictSettings(
        Path(model) if model is not None else None,
        frame.num_slices,
        frame.slice_size,
        window if window is not None else frame.window,
        frame.box_coords,
    )


@dataclass(frozen=True)
class ScanOutput:
    """Where one scan's results went, and its evidence per query."""

    scan: Path
    folder: Path
    evidence: tuple[dict, ...]
    statistics: tuple[MaskStatistics, ...] = ()  # with --statistics


def parse_window(tokens: list[str]) -> tuple[float, float]:
    """``--window``: one preset name (``abdomen``) or two numbers (``-160 240``)."""
    if len(tokens) == 1:
        value: str | list[float] = tokens[0]
    elif len(tokens) == 2:
        try:
            value = [float(t) for t in tokens]
        except ValueError:
            raise PredictError(
                f"--window {' '.join(tokens)}: LOW and HIGH must be numbers"
            ) from None
    else:
        raise PredictError(
            f"--window {' '.join(tokens)}: give a preset name or LOW HIGH, not {len(tokens)} values"
        )
    try:
        return resolve_window(value, "--window")
    except WindowError as err:
        raise PredictError(str(err)) from None


def read_queries(queries: Sequence[str] = (), queries_file: Path | None = None) -> list[str]:
    """The queries of ``--query`` then ``--queries FILE``, checked: at least one, none empty,
    none over MAX_QUERY_CHARS, at most MAX_QUERIES."""
    found = [(f"--query {q!r}", q.strip()) for q in queries]
    if queries_file is not None:
        try:
            lines = Path(queries_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise PredictError(f"{queries_file}: cannot read the queries file ({err})") from None
        for n, line in enumerate(lines, start=1):
            if line.strip() and not line.lstrip().startswith("#"):
                found.append((f"{queries_file}, line {n}", line.strip()))
    if not found:
        raise PredictError("--query: give at least one query (--query or --queries FILE)")
    for where, query in found:
        if not query:
            raise PredictError(f"{where}: query is empty")
        if len(query) > MAX_QUERY_CHARS:
            raise PredictError(f"{where}: query is {len(query)} characters, over {MAX_QUERY_CHARS}")
    if len(found) > MAX_QUERIES:
        raise PredictError(f"--query: {len(found)} queries, at most {MAX_QUERIES} per call")
    return [q for _, q in found]


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def find_scans(paths: Sequence[Path]) -> list[Path]:
    """The scans ``--image`` names: NIfTI files and DICOM series folders as given, and the
    NIfTI files and series subfolders of a folder of scans (sorted by name)."""
    from data.dicom import is_series_folder

    scans: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise PredictError(f"{path}: no such file or folder")
        if path.is_file():
            if not _is_nifti(path):
                raise PredictError(
                    f"{path}: not a NIfTI file (.nii, .nii.gz); give a NIfTI file, a folder "
                    "holding one DICOM series, or a folder of scans"
                )
            scans.append(path)
        elif is_series_folder(path):
            scans.append(path)
        else:
            inside = [
                p
                for p in sorted(path.iterdir())
                if not p.name.startswith(".")
                and ((p.is_file() and _is_nifti(p)) or (p.is_dir() and is_series_folder(p)))
            ]
            if not inside:
                raise PredictError(
                    f"{path}: no DICOM series, NIfTI file or series subfolder in this folder"
                )
            scans += inside
    return scans


def scan_names(scans: Sequence[Path]) -> list[str]:
    """Output folder names: the file name without .nii/.nii.gz or the series folder's name,
    numbered where two scans would share one."""
    names = []
    for path in scans:
        name = path.name
        for suffix in (".nii.gz", ".nii"):
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
        names.append(name or "scan")
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if names.count(name) == 1 else f"{name}-{seen[name]}")
    return out


def read_scan(path: Path, name: str) -> Scan:
    """A scan read in canonical orientation (NIfTI or one DICOM series)."""
    from data.dicom import read_series
    from data.volume import load_volume

    path = Path(path)
    if path.is_dir():
        series = read_series(path)
        return Scan(path=path, name=name, volume=series.volume, series=series)
    return Scan(path=path, name=name, volume=load_volume(path, "image"))


def prepare_image(image_path: Path, num_slices: int, size: int, window: tuple[float, float]):
    """The policy's view of a CT with no mask: windowed, sampled and resized slices, exactly as
    ``data.preprocess.prepare_volume`` prepares a training scan with the same window."""
    scan = read_scan(Path(image_path), Path(image_path).name)
    return _prepare(scan, num_slices, size, window)


def _prepare(scan: Scan, num_slices: int, size: int, window: tuple[float, float]):
    from data.preprocess import prepare_arrays

    return prepare_arrays(scan.volume, None, [], window, num_slices, size, scan.name)


def policy_answerer(
    engine, samples: int = 1, seed: int = 0, box_coords: str = "pixels"
) -> Answerer | Sampler:
    """Answers of a rollout engine, all queries of a scan in one batch: greedy for one sample
    (an :data:`Answerer`); else ``samples`` drawn per query at the engine's temperature, seeded
    with ``seed`` (a :data:`Sampler`). Prompts ask for boxes in ``box_coords``."""
    from data.prompts import build_messages
    from rollout.records import RolloutPrompt

    def prompts(slices: np.ndarray, queries: list[str]) -> list:
        return [
            RolloutPrompt(f"query-{n}", build_messages(slices, q, box_coords))
            for n, q in enumerate(queries)
        ]

    def answer(slices: np.ndarray, queries: list[str]) -> list[str]:
        groups = engine.generate(prompts(slices, queries), greedy=True)
        return [group.completions[0].text for group in groups]

    def sample(slices: np.ndarray, queries: list[str]) -> list[list[str]]:
        groups = engine.generate(prompts(slices, queries), group_size=samples, seed=seed)
        return [[c.text for c in group.completions] for group in groups]

    return answer if samples == 1 else sample


def load_policy(
    model: Path,
    adapter: Path | None,
    engine: str,
    device: str,
    num_slices: int,
    size: int,
    max_tokens: int,
    temperature: float | None = None,
):
    """The policy as a rollout engine (loaded once per call); ``temperature`` (default
    ``rollout.temperature``'s) is what sampled answers are drawn at."""
    from common.config import ModelConfig
    from rollout.records import WeightUpdate

    cfg = RolloutConfig(
        engine=engine,
        temperature=RolloutConfig.temperature if temperature is None else temperature,
        max_tokens=max_tokens,
        in_process=True,
        max_model_len=num_slices * (size // 32) ** 2 + 1024 + max_tokens,
        slice_size=size,
    )
    try:
        if engine == "transformers":
            from rollout.hf_engine import TransformersEngine

            policy = TransformersEngine(model, cfg, ModelConfig(), device=device)
        else:
            from rollout.actor import build_engine

            policy = build_engine(model, cfg, ModelConfig())
        if adapter is not None:
            policy.update_weights(WeightUpdate(1, adapter_dir=Path(adapter)))
    except (OSError, ValueError) as err:
        raise PredictError(
            f"--model {model}: checkpoint does not load (adapter {adapter}): {err}"
        ) from None
    return policy


def _stored_slice_file(scan: Scan, z: int) -> Path | None:
    """The DICOM file of canonical axial index ``z`` when the series is stored slice by slice
    along z (every axial series); None otherwise."""
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    from data.volume import CANONICAL_AXES

    if scan.series is None:
        return None
    transform = ornt_transform(
        io_orientation(scan.volume.source_affine), axcodes2ornt(CANONICAL_AXES)
    )
    axis, flip = int(transform[2, 0]), int(transform[2, 1])
    if axis != 2:  # the files are not axial slices (a sagittal or coronal series)
        return None
    files = scan.series.files
    return files[z] if flip == 1 else files[len(files) - 1 - z]


def _anchor_evidence(scan: Scan, prepared, parsed) -> dict:
    """What evidence.json says of a well-formed answer's anchor: the key slice in both frames
    (and its DICOM file), the boxes in both frames, the reasoning."""
    from data.preprocess import box_to_source

    anchor = parsed.anchor
    z = int(prepared.source_index[anchor.key_slice - 1])
    evidence = dict(
        ok=True,
        reasoning=parsed.think,
        key_slice=anchor.key_slice,
        key_slice_source=z,
        boxes=[list(b) for b in anchor.boxes],
        boxes_source=[[round(v, 1) for v in box_to_source(b, prepared)] for b in anchor.boxes],
    )
    slice_file = _stored_slice_file(scan, z)
    if slice_file is not None:
        from data.dicom import read_header

        evidence.update(
            key_slice_file=str(slice_file),
            key_slice_sop_instance_uid=str(read_header(slice_file).SOPInstanceUID),
        )
    return evidence


def _drawn_texts(texts, queries: list[str], samples: int) -> list[list[str]]:
    """The answerer's output as ``samples`` texts per query, checked."""
    if samples == 1:
        texts = [[t] for t in texts]
    if len(texts) != len(queries) or any(isinstance(t, str) or len(t) != samples for t in texts):
        raise PredictError(
            f"--samples {samples}: the policy gave {len(texts)} answer lists for "
            f"{len(queries)} queries, not {samples} answers for each"
        )
    return [list(t) for t in texts]


def _sampled_result(
    scan, prepared, texts, propagator, num_slices, size, min_agreement, box_coords="pixels"
):
    """One query's N sampled answers: their frame masks, the consensus, the agreement, and
    the evidence of the sample closest to the consensus (see the module docstring)."""
    from data.answer import ParsedAnswer, parse_answer
    from evaluation.metrics import Draw, consensus_of_draws

    parsed = [parse_answer(text, num_slices, size, box_coords) for text in texts]
    draws, masks = [], []
    for text, answer in zip(texts, parsed):
        if isinstance(answer, ParsedAnswer):
            a = answer.anchor
            mask = propagator.propagate(scan.name, prepared.slices, a.key_slice, a.boxes, None)
            masks.append(np.asarray(mask, bool))
            draws.append(Draw(text, a.key_slice, a.boxes))
        else:
            masks.append(np.zeros(prepared.slices.shape, bool))
            draws.append(Draw(text, None, failure=answer.reason))
    found = consensus_of_draws(draws, masks)
    summary = {
        "num_samples": len(texts),
        "agreement": round(found.agreement, 4),
        "min_agreement": min_agreement,
        "low_agreement": found.agreement < min_agreement,
        "anchors": found.anchors,
    }
    best = found.representative
    if best is not None:
        evidence = {"answer": texts[best], **_anchor_evidence(scan, prepared, parsed[best])}
        evidence["representative"] = best + 1
        return parsed[best].anchor, found.mask, evidence, summary
    failure = f"none of the {len(texts)} sampled answers parses (first: {parsed[0].reason})"
    return None, found.mask, {"answer": texts[0], "ok": False, "failure": failure}, summary


def segment_scan(
    scan: Scan,
    queries: list[str],
    answer: Answerer | Sampler,
    propagator,
    num_slices: int,
    size: int,
    window: tuple[float, float],
    samples: int = 1,
    min_agreement: float = MIN_AGREEMENT,
    box_coords: str = "pixels",
):
    """The policy's answers to ``queries`` on one scan (boxes read in ``box_coords``), each
    propagated to a 3D mask on the source grid (with ``samples`` > 1: the consensus of that many
    drawn answers, module docstring). Returns the prepared slices and one :class:`QueryResult`
    per query."""
    from data.answer import ParsedAnswer, parse_answer
    from data.preprocess import to_source_grid

    prepared = _prepare(scan, num_slices, size, window)
    drawn = _drawn_texts(answer(np.asarray(prepared.slices), queries), queries, samples)
    spacing = scan.volume.spacing
    voxel_mm3 = voxel_volume_mm3(scan.volume)
    results = []
    for query, texts in zip(queries, drawn):
        evidence: dict = {
            "image": str(scan.path),
            "query": query,
            "answer": texts[0],
            "propagator": propagator.name,
            "num_slices": num_slices,  # the frame of key_slice and boxes
            "slice_size": size,
            "window": list(window),
            "spacing_mm": {"z": spacing[0], "y": spacing[1], "x": spacing[2]},
        }
        summary: dict = {}
        if samples > 1:
            anchor, frame_mask, found, summary = _sampled_result(
                scan, prepared, texts, propagator, num_slices, size, min_agreement, box_coords
            )
            evidence.update(found)
        else:
            parsed = parse_answer(texts[0], num_slices, size, box_coords)
            if isinstance(parsed, ParsedAnswer):
                anchor = parsed.anchor
                frame_mask = propagator.propagate(
                    scan.name, prepared.slices, anchor.key_slice, anchor.boxes, None
                )
                evidence.update(_anchor_evidence(scan, prepared, parsed))
            else:
                anchor = None
                frame_mask = np.zeros(prepared.slices.shape, bool)
                evidence.update(ok=False, failure=parsed.reason)
        mask = to_source_grid(frame_mask, prepared)
        voxels = int(mask.sum())
        evidence.update(mask_voxels=voxels, volume_mm3=round(voxels * voxel_mm3, 1))
        if scan.series is not None:
            evidence["series_instance_uid"] = scan.series.uid
        evidence.update(summary)
        results.append(QueryResult(query, mask, np.asarray(frame_mask, bool), anchor, evidence))
    return prepared, results


def voxel_volume_mm3(volume) -> float:
    """The volume of one voxel of a :class:`data.volume.Volume`, from its spacing (mm^3)."""
    return float(np.prod(volume.spacing))


# statistics.csv: one row per scan and query; mean and std are empty for an empty mask
STATISTICS_COLUMNS = ("scan", "image", "query", "ok", "voxels", "volume_mm3", "mean_hu", "std_hu")


@dataclass(frozen=True)
class MaskStatistics:
    """What ``--statistics`` reports of one query's mask on one scan."""

    scan: str
    image: str
    query: str
    ok: bool  # the answer parsed (else the mask is empty)
    voxels: int
    volume_mm3: float
    mean_hu: float | None  # None for an empty mask
    std_hu: float | None


def mask_statistics(scan: Scan, result: QueryResult) -> MaskStatistics:
    """The mask's volume (voxels x the voxel volume of the scan's spacing) and the mean and
    standard deviation (over the voxels, ddof 0) of the scan's own intensities inside it, on the
    grid of the written mask (the source grid, canonical orientation)."""
    mask = np.asarray(result.mask, bool)
    voxels = int(mask.sum())
    values = np.asarray(scan.volume.array)[mask].astype(np.float64)
    return MaskStatistics(
        scan=scan.name,
        image=str(scan.path),
        query=result.query,
        ok=bool(result.evidence["ok"]),
        voxels=voxels,
        volume_mm3=voxels * voxel_volume_mm3(scan.volume),
        mean_hu=float(values.mean()) if voxels else None,
        std_hu=float(values.std()) if voxels else None,
    )


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def write_statistics(rows: Sequence[MaskStatistics], path: Path) -> Path:
    """``statistics.csv`` (:data:`STATISTICS_COLUMNS`), written under a temporary name."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(STATISTICS_COLUMNS)
    for row in rows:
        writer.writerow([_cell(getattr(row, column)) for column in STATISTICS_COLUMNS])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text.getvalue())
    tmp.replace(path)
    return path


def statistics_table(rows: Sequence[MaskStatistics]) -> str:
    """The console's summary of ``--statistics``: one line per scan and query."""
    lines = ["| scan | query | voxels | volume mL | mean HU | std HU |", "|---" * 6 + "|"]
    for row in rows:
        mean = "-" if row.mean_hu is None else f"{row.mean_hu:.1f}"
        std = "-" if row.std_hu is None else f"{row.std_hu:.1f}"
        lines.append(
            f"| {row.scan} | {row.query} | {row.voxels} | {row.volume_mm3 / 1000:.2f} | "
            f"{mean} | {std} |"
        )
    return "\n".join(lines)


def label_map(results: Sequence[QueryResult]) -> tuple[np.ndarray, list[dict]]:
    """One uint8 map: value n (1-based) for query n, the smallest target on top where several
    overlap; and its legend."""
    labels = np.zeros(results[0].mask.shape, np.uint8)
    order = sorted(range(len(results)), key=lambda n: -int(results[n].mask.sum()))
    for n in order:  # largest first, so smaller targets paint over the organs that hold them
        labels[results[n].mask] = n + 1
    legend = []
    for n, result in enumerate(results):
        legend.append(
            {
                "value": n + 1,
                "query": result.query,
                "folder": f"query-{n + 1}",
                "ok": result.evidence["ok"],
                "voxels": result.evidence["mask_voxels"],
                "volume_mm3": result.evidence["volume_mm3"],
                "voxels_shown": int((labels == n + 1).sum()),  # fewer where another sits on top
            }
        )
    return labels, legend


def _write_query(scan: Scan, prepared, result: QueryResult, folder: Path) -> None:
    from data.volume import save_mask
    from evaluation.card import evidence_card

    folder.mkdir(parents=True, exist_ok=True)
    like = scan.path if scan.series is None else scan.volume
    save_mask(result.mask, like, folder / "mask.nii.gz")
    if result.anchor is not None:
        title = f"{result.query}\n{result.evidence['reasoning'][:120]}"
    else:
        title = f"{result.query}\nno usable answer: {result.evidence['failure'][:80]}"
    evidence_card(
        folder / "evidence_card.png",
        np.asarray(prepared.slices),
        result.frame_mask,
        result.anchor.key_slice if result.anchor else None,
        result.anchor.boxes if result.anchor else (),
        title,
        prepared.source_index,
    )
    (folder / "evidence.json").write_text(json.dumps(result.evidence, indent=1))


def write_seg_or_warn(scan: Scan, results: list[QueryResult], out: Path) -> None:
    """The DICOM SEG of a DICOM input, written after its NIfTI masks: a SEG that cannot be made
    (a series its writer refuses) is a one-line warning, never a lost result."""
    from data.dicom import write_seg

    try:
        write_seg(scan.series, [r.mask for r in results], [r.query for r in results], out)
    except Exception as err:  # noqa: BLE001 - any writer failure leaves the NIfTI results
        log.warning(
            "%s: no DICOM SEG written (%s: %s); the NIfTI masks are written",
            scan.path,
            type(err).__name__,
            str(err).splitlines()[0] if str(err) else "",
        )


def write_outputs(scan: Scan, prepared, results: list[QueryResult], folder: Path) -> Path:
    """Write one scan's results into ``folder`` (layout in the module docstring). Everything is
    written into a hidden staging folder beside it and moved in at the end, so a failure leaves
    no partial scan."""
    from data.volume import save_mask

    folder.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        if len(results) == 1:
            _write_query(scan, prepared, results[0], stage)
        else:
            for n, result in enumerate(results, start=1):
                _write_query(scan, prepared, result, stage / f"query-{n}")
            labels, legend = label_map(results)
            save_mask(
                labels, scan.path if scan.series is None else scan.volume, stage / "labels.nii.gz"
            )
            (stage / "labels.json").write_text(json.dumps(legend, indent=1))
        if scan.series is not None:
            write_seg_or_warn(scan, results, stage / "segmentation.dcm")
        folder.mkdir(parents=True, exist_ok=True)
        for entry in sorted(stage.iterdir()):
            target = folder / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return folder


def predict(
    images: Path | Sequence[Path],
    queries: str | Sequence[str],
    model: Path | None,
    out: Path,
    adapter: Path | None = None,
    sam_checkpoint: Path | None = None,
    engine: str = "transformers",
    num_slices: int | None = None,
    size: int | None = None,
    window: str | tuple[float, float] | None = None,
    image_size: int = 512,
    max_tokens: int = 256,
    device: str | None = None,
    progress: bool = True,
    answer: Answerer | None = None,
    log_file: Path | None = None,
    statistics: bool = False,
    samples: int = 1,
    temperature: float | None = None,
    seed: int = 0,
    min_agreement: float = MIN_AGREEMENT,
) -> list[ScanOutput]:
    """Segment every scan of ``images`` for every query (see the module docstring).

    ``model``, ``num_slices``, ``size`` and ``window`` left None come from the adapter's
    medvol.json, else common.config's defaults (:func:`resolve_settings`). ``answer`` replaces the
    policy (then ``model`` is not loaded): a function from a scan's prepared slices and the
    queries to answer texts. Inputs are checked before the model loads; the first scan is read
    before the model loads too, so a bad file costs no model load and writes nothing
    (``log_file``, the command's log, starts only then). ``statistics`` adds each mask's
    :class:`MaskStatistics` to its scan's output and writes ``out/statistics.csv`` at the end.
    ``samples`` > 1 draws that many answers per query at ``temperature`` (default
    ``rollout.temperature``'s), seeded with ``seed`` on every scan, and writes their consensus
    (module docstring); ``answer`` then gives ``samples`` texts per query (a :data:`Sampler`).
    """
    from tqdm import tqdm

    from reward_server.propagation import build_propagator

    queries = read_queries([queries] if isinstance(queries, str) else list(queries))
    check_sampling(samples, temperature, min_agreement)
    settings = resolve_settings(adapter, model, num_slices, size, window, need_model=answer is None)
    model, num_slices, size, low_high = (
        settings.model,
        settings.num_slices,
        settings.size,
        settings.window,
    )
    if answer is None and not (Path(model) / "config.json").exists():
        raise PredictError(f"--model {model}: no config.json, not a checkpoint folder")
    if sam_checkpoint is not None and not Path(sam_checkpoint).is_file():
        raise PredictError(f"--sam-checkpoint {sam_checkpoint}: no such file")
    device = resolve_device(device)
    scans = find_scans([images] if isinstance(images, str | Path) else list(images))
    names = scan_names(scans)
    out = Path(out)
    outputs = []
    propagator = None
    bar = tqdm(
        total=len(scans), desc="predict", unit="scan", disable=not progress or len(scans) < 2
    )
    for path, name in zip(scans, names):
        scan = read_scan(path, name)
        if propagator is None:  # first scan read: now the log, the models
            if log_file is not None:
                log_to_file(log_file)
            propagator = build_propagator(
                "medsam2" if sam_checkpoint else "baseline",
                sam_checkpoint,
                image_size,
                device=device,
            )
            if answer is None:
                policy = load_policy(
                    model, adapter, engine, device, num_slices, size, max_tokens, temperature
                )
                answer = policy_answerer(policy, samples, seed, settings.box_coords)
        prepared, results = segment_scan(
            scan,
            queries,
            answer,
            propagator,
            num_slices,
            size,
            low_high,
            samples,
            min_agreement,
            settings.box_coords,
        )
        folder = out if len(scans) == 1 else out / name
        write_outputs(scan, prepared, results, folder)
        measured = tuple(mask_statistics(scan, r) for r in results) if statistics else ()
        outputs.append(ScanOutput(path, folder, tuple(r.evidence for r in results), measured))
        bar.update(1)
    bar.close()
    if statistics:
        write_statistics([row for o in outputs for row in o.statistics], out / "statistics.csv")
    return outputs


def check_sampling(samples: int, temperature: float | None, min_agreement: float) -> None:
    """``--samples`` in 1..MAX_SAMPLES, ``--temperature`` above 0, ``--min-agreement`` in 0..1."""
    if not 1 <= samples <= MAX_SAMPLES:
        raise PredictError(f"--samples {samples}: need 1..{MAX_SAMPLES}")
    if temperature is not None and not temperature > 0:
        raise PredictError(f"--temperature {temperature}: need > 0 (--samples 1 is greedy)")
    if not 0 <= min_agreement <= 1:
        raise PredictError(f"--min-agreement {min_agreement}: need a Dice in 0..1")


def console_line(scan: Path, evidence: dict, where: Path) -> str:
    """A query's line on the console: its answer, mask and folder; with ``--samples``, the
    agreement, flagged when below ``--min-agreement``."""
    status = "answer ok" if evidence["ok"] else f"no usable answer ({evidence['failure']})"
    line = (
        f"{scan} | {evidence['query']}: {status}; {evidence['mask_voxels']} voxels, "
        f"{evidence['volume_mm3'] / 1000:.1f} mL -> {where}"
    )
    if "agreement" in evidence:
        line += f"; agreement {evidence['agreement']:.2f} of {evidence['num_samples']} samples"
        if evidence["low_agreement"]:
            line += f" LOW (< {evidence['min_agreement']:g}: review it)"
    return line


class _WindowAction(argparse.Action):
    """Turns ``--window abdomen`` or ``--window -160 240`` into ``(low, high)`` while parsing."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            setattr(namespace, self.dest, parse_window(list(values)))
        except PredictError as err:
            # argparse already names the option; keep only what is wrong with the value
            message = str(err).removeprefix("--window").lstrip(": ")
            raise argparse.ArgumentError(self, message) from None


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m evaluation.predict", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--image",
        required=True,
        action="append",
        type=Path,
        help="NIfTI file, folder of one DICOM series, or folder of scans (repeatable)",
    )
    parser.add_argument("--query", action="append", default=[], help="a query (repeatable)")
    parser.add_argument(
        "--queries", type=existing_file, help="file of queries, one per line (# comments)"
    )
    parser.add_argument(
        "--model",
        type=Path,
        help="Qwen3-VL checkpoint folder (default: the base the adapter's medvol.json names)",
    )
    parser.add_argument("--adapter", type=Path, help="LoRA adapter folder (SFT or SFT+RL)")
    parser.add_argument(
        "--sam-checkpoint",
        type=Path,
        help="MedSAM2 weights, e.g. MedSAM2_latest.pt (default: the baseline propagator)",
    )
    parser.add_argument("--out-dir", required=True, type=Path, help="folder of the results")
    parser.add_argument("--engine", default="transformers", choices=["transformers", "vllm"])
    frame = "the adapter's medvol.json, else"
    parser.add_argument(
        "--slices",
        type=int,
        help=f"slices sampled per scan (default: {frame} {DataConfig.num_slices})",
    )
    parser.add_argument(
        "--slice-size",
        type=int,
        help=f"side of a sampled slice in px (default: {frame} {DataConfig.slice_size})",
    )
    parser.add_argument(
        "--window",
        nargs="+",
        action=_WindowAction,
        metavar="WINDOW",
        help="intensity window the policy was trained with: a preset "
        f"({', '.join(WINDOW_PRESETS)}) or LOW HIGH (default: {frame} {DataConfig.window})",
    )
    parser.add_argument(
        "--statistics",
        action="store_true",
        help="per scan and query: volume (mm^3), mean and std of HU in the mask, to "
        "OUTDIR/statistics.csv and the console",
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=1,
        metavar="N",
        help="answers drawn per query; > 1: their voxel-majority mask and agreement "
        "(default 1: the greedy answer)",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        metavar="T",
        help="sampling temperature of --samples (default: rollout.temperature's, "
        f"{RolloutConfig.temperature:g})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the --samples draws (default 0)")
    parser.add_argument(
        "--min-agreement",
        type=float,
        default=MIN_AGREEMENT,
        metavar="A",
        help="with --samples: flag a query whose masks' mean pairwise Dice is below A "
        f"(default {MIN_AGREEMENT})",
    )
    add_device_argument(parser, "the policy and MedSAM2")
    return parser


@command()
def main(argv: list[str] | None = None) -> int:
    set_default_environment()
    args = build_parser().parse_args(argv)
    if args.slices is not None and args.slices < 1:
        raise UsageError(f"--slices {args.slices}: need >= 1")
    if args.slice_size is not None and args.slice_size < 32:
        raise UsageError(f"--slice-size {args.slice_size}: need >= 32")
    queries = read_queries(args.query, args.queries)
    check_sampling(args.samples, args.temperature, args.min_agreement)
    outputs = predict(
        args.image,
        queries,
        args.model,
        args.out_dir,
        args.adapter,
        args.sam_checkpoint,
        args.engine,
        args.slices,
        args.slice_size,
        args.window,
        device=args.device,
        log_file=args.out_dir / "predict.log",
        statistics=args.statistics,
        samples=args.samples,
        temperature=args.temperature,
        seed=args.seed,
        min_agreement=args.min_agreement,
    )
    for output in outputs:
        for n, evidence in enumerate(output.evidence, start=1):
            where = output.folder if len(output.evidence) == 1 else output.folder / f"query-{n}"
            print(console_line(output.scan, evidence, where))
    if args.statistics:
        print(f"\nstatistics -> {args.out_dir / 'statistics.csv'}")
        print(statistics_table([row for o in outputs for row in o.statistics]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
