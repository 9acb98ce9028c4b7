"""A review page for the evidence anchor: see each case's slices, mask and anchor; correct and save.

    python -m evaluation.review DIR [--port 8765] [--host 127.0.0.1] [--row NAME ...]
        [--device cpu|cuda] [--config FILE] [--print-config] [-v] [--debug] [key=value ...]

``DIR`` is a ``predict`` output folder (its ``evidence.json`` files, one per scan and query, with
the ``mask.nii.gz`` beside each) or an evaluation output folder (its ``cases.jsonl``, one case
per row and manifest id; ``--row`` keeps some rows). The page lists the cases with their DSC
(where a ground truth exists) and agreement (an ``agreement`` number in evidence.json or the
case's record; else blank), worst DSC first; a case shows every slice with the mask over it, the
key slice, the boxes, the ``<think>`` text, the sampled anchors when evidence.json holds several
(a list under ``anchors`` or ``samples``: answer texts, or objects with ``answer``, or with
``key_slice`` and ``boxes`` / ``bbox_2d_list``), and the metrics.

What each folder gives:

- predict: the scan (evidence.json's ``image``, read again and prepared in its ``window``), the
  answer and its anchor, the mask written (``mask.nii.gz``, shown on the sampled slices). A
  ground truth exists where the run config's ``data.manifest`` has a row on the same image whose
  query, label or one of its label's phrasings is the case's query.
- evaluation: ``cases.jsonl`` keeps the anchor, the answer text (rows of an earlier version
  have none), the failure and the metrics of each case, and for a consensus row (``evaluate
  --samples``) its agreement and every drawn anchor, but not the mask; the slices and the ground
  truth come from the config's ``data.manifest`` (give the evaluation's config), and the mask
  shown is the anchor propagated again by this command's propagator (a consensus row's: the
  voxel majority of its drawn anchors, propagated again; its DSC is shown next to the recorded
  one).

The slice frame of a predict folder is the one its evidence.json files record (``num_slices``,
``slice_size``; two frames in one folder stop the command); evidence.json written before they
were recorded is read in the config's ``data.num_slices`` and ``data.slice_size``, which must
then be the ones ``predict`` ran with (a case whose ``key_slice_source`` or ``boxes_source``
contradict them stops the command, naming the field to set). An evaluation folder is read in the
frame of the config given, the evaluation's.

Correcting: draw a box (or drag one), click a slice to make it the key slice, then Propagate:
the reward's propagator (``reward.propagator`` of the config, the baseline by default) runs on
the case's prepared slices through the whole volume, and the page shows the new mask and its
DSC. Accept appends the corrected anchor as one JSON line to ``DIR/corrections.jsonl`` and writes
its mask on the scan's own grid to ``DIR/corrections/<row number>/mask.nii.gz`` (and
``segmentation.dcm``, a DICOM SEG, for a DICOM series), under a lock: accepts never overwrite
each other.

Endpoints (a bad request gets status 400 and ``{"error": "<field>: <what is wrong>"}``):

- ``GET /``: the page (``evaluation/review_static/``, plain HTML, CSS and JavaScript);
- ``GET /api/cases``: the case list;
- ``GET /api/case?case=ID``: one case (anchor, think, sampled anchors, metrics, corrections);
- ``GET /api/slice.png?case=ID&k=K&mask=answer|proposal|none[&key_slice=K&boxes=JSON][&truth=1]``:
  slice K (1-based) with a mask over it: the case's own, or the propagation of the anchor given;
- ``POST /api/propagate`` ``{"case", "key_slice", "boxes"}``: the new mask's slices and DSC;
- ``POST /api/accept`` ``{"case", "key_slice", "boxes"[, "think"]}``: the row written.
"""

from __future__ import annotations

import datetime
import io
import json
import logging
import math
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np

from common.cli import (
    ArgumentParser,
    UsageError,
    add_config_arguments,
    add_device_argument,
    command,
    command_config,
    log_to_file,
    resolve_device,
)
from common.config import RunConfig
from common.runtime import file_lock, set_default_environment
from data.answer import AnswerFailure, EvidenceAnchor, format_answer, parse_answer
from data.grid import VolumeError

log = logging.getLogger(__name__)

DEFAULT_PORT = 8765
STATIC = Path(__file__).with_name("review_static")
STATIC_TYPES = {".html": "text/html", ".css": "text/css", ".js": "text/javascript"}
CORRECTIONS = "corrections.jsonl"
MAX_BODY = 1 << 20  # bytes of a request body
MAX_BOXES = 32  # boxes of one anchor
MAX_THINK = 20_000  # characters of a corrected reasoning
LOADED_CASES = 4  # cases whose volumes stay in memory
PROPOSALS = 16  # propagated anchors kept (the thumbnails of one proposal ask for it S times)


class ReviewError(ValueError):
    """A request or a folder that cannot be reviewed; names the field or file and the value."""


@dataclass(frozen=True)
class SampledAnchor:
    """One of several anchors sampled for a case (evidence.json's ``anchors`` or ``samples``)."""

    key_slice: int | None  # None: the sample did not parse
    boxes: tuple[tuple[int, int, int, int], ...]
    answer: str | None
    agreement: float | None
    failure: str | None


@dataclass(frozen=True, eq=False)
class ReviewCase:
    """One case of the folder as read at start: what the page lists and shows."""

    id: str  # unique in the folder; written to corrections.jsonl
    query: str
    image: Path  # the scan: a NIfTI file, a DICOM series folder or an M3D-Seg array
    folder: Path | None  # predict: the folder holding evidence.json (and mask.nii.gz)
    answer: str | None  # the policy's answer text (None: not recorded)
    think: str
    anchor: EvidenceAnchor | None  # None: the answer did not parse
    failure: str | None
    window: tuple[float, float] | None  # predict: the window of evidence.json
    dsc: float | None
    agreement: float | None
    row: str | None = None  # evaluation: the table row
    sample: object | None = None  # data.records.Sample of the ground truth, when one exists
    label_values: tuple[int, ...] = ()
    sampled: tuple[SampledAnchor, ...] = ()
    metrics: dict = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class LoadedCase:
    """A case's arrays, read when it is first opened."""

    scan: object  # evaluation.predict.Scan: the canonical volume and, for DICOM, the series
    prepared: object  # data.records.PreparedVolume: the slices the policy saw
    answer_mask: np.ndarray  # (S, H, W) bool: the case's own mask on the sampled slices
    truth: np.ndarray | None  # (Z, Y, X) bool on the source grid
    truth_frame: np.ndarray | None  # (S, H, W) bool


@dataclass(frozen=True, eq=False)
class Proposal:
    """An anchor propagated through a case's slices."""

    anchor: EvidenceAnchor
    frame_mask: np.ndarray  # (S, H, W) bool
    dsc: float | None


def _number(value) -> float | None:
    """A finite JSON number, else None (booleans are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def check_anchor(key_slice, boxes, num_slices: int, size: int, where: str = "") -> EvidenceAnchor:
    """An anchor from a request's (or a file's) ``key_slice`` and ``boxes``, checked as the
    answer format wants them (data.answer): an integer key slice in 1..num_slices, and boxes of
    four integers 0 <= x1 < x2 <= size, 0 <= y1 < y2 <= size. ``where`` prefixes the field."""
    if isinstance(key_slice, bool) or not isinstance(key_slice, int):
        raise ReviewError(f"{where}key_slice: {key_slice!r:.40} is not an integer")
    if not 1 <= key_slice <= num_slices:
        raise ReviewError(f"{where}key_slice: {key_slice} is not in 1..{num_slices}")
    if not isinstance(boxes, list):
        raise ReviewError(f"{where}boxes: {boxes!r:.60} is not a list of [x1, y1, x2, y2] boxes")
    if len(boxes) > MAX_BOXES:
        raise ReviewError(f"{where}boxes: {len(boxes)} boxes, at most {MAX_BOXES}")
    checked = []
    for n, box in enumerate(boxes):
        name = f"{where}boxes[{n}]"
        if not isinstance(box, list | tuple) or len(box) != 4:
            raise ReviewError(f"{name}: {box!r:.60} is not [x1, y1, x2, y2]")
        if any(isinstance(v, bool) or not isinstance(v, int) for v in box):
            raise ReviewError(f"{name}: {list(box)!r:.60} has a coordinate that is not an integer")
        x1, y1, x2, y2 = box
        if x1 >= x2 or y1 >= y2:
            raise ReviewError(
                f"{name}: {list(box)} is degenerate (need x1 < x2 and y1 < y2, pixel edges)"
            )
        if min(x1, y1) < 0 or max(x2, y2) > size:
            raise ReviewError(
                f"{name}: {list(box)} is outside the {size} x {size} slice "
                f"(need 0 <= x1 < x2 <= {size} and 0 <= y1 < y2 <= {size})"
            )
        checked.append((x1, y1, x2, y2))
    return EvidenceAnchor(key_slice, tuple(checked))


# ---- reading the folder ----------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ReviewError(f"{path}: cannot be read as JSON ({err})") from None
    if not isinstance(value, dict):
        raise ReviewError(f"{path}: holds a {type(value).__name__}, not a JSON object")
    return value


def canonical_shape(nifti: Path) -> tuple[int, int, int]:
    """The canonical (z, y, x) shape of a NIfTI file, read from its header only."""
    import nibabel as nib
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    from data.grid import CANONICAL_AXES

    try:
        image = nib.load(str(nifti))
    except Exception as err:  # noqa: BLE001 - nibabel raises many types for a bad file
        raise ReviewError(f"{nifti}: not a readable NIfTI file ({err})") from None
    transform = ornt_transform(io_orientation(image.affine), axcodes2ornt(CANONICAL_AXES))
    xyz = [int(image.shape[int(a)]) for a in sorted(range(3), key=lambda i: transform[i, 0])]
    return xyz[2], xyz[1], xyz[0]


def _resolve_image(raw, evidence_file: Path, folder: Path) -> Path:
    """evidence.json's ``image`` as predict was given it: absolute, or relative to the folder
    predict ran in (tried: here, then the reviewed folder)."""
    if not isinstance(raw, str) or not raw:
        raise ReviewError(f"{evidence_file}: field 'image' is {raw!r:.60}, not a path")
    path = Path(raw)
    for candidate in [path] if path.is_absolute() else [Path.cwd() / path, folder / path]:
        if candidate.exists():
            return candidate.resolve()
    raise ReviewError(
        f"{evidence_file}: field 'image' {raw!r}: no such file or folder (relative paths are "
        f"read from here, {Path.cwd()}, and from {folder})"
    )


def _window(raw, evidence_file: Path) -> tuple[float, float]:
    values = raw if isinstance(raw, list) and len(raw) == 2 else None
    low, high = (_number(v) for v in values) if values else (None, None)
    if low is None or high is None or not low < high:
        raise ReviewError(f"{evidence_file}: field 'window' is {raw!r:.60}, not [low, high]")
    return low, high


def _think(answer: str | None, num_slices: int, size: int, box_coords: str = "pixels") -> str:
    """The reasoning of an answer text that parses ("" for none)."""
    parsed = parse_answer(answer, num_slices, size, box_coords) if answer is not None else None
    return "" if parsed is None or isinstance(parsed, AnswerFailure) else parsed.think


def _sampled(
    raw, num_slices: int, size: int, box_coords: str = "pixels"
) -> tuple[SampledAnchor, ...]:
    """evidence.json's sampled anchors, answer texts read with boxes in ``box_coords``
    (data.box_coords); one that does not parse is listed with its reason."""
    if not isinstance(raw, list):
        return ()
    out = []
    for n, item in enumerate(raw):
        text = item if isinstance(item, str) else None
        agreement = None
        if isinstance(item, dict):
            text = item.get("answer") if isinstance(item.get("answer"), str) else None
            agreement = _number(item.get("agreement"))
        if text is not None:
            parsed = parse_answer(text, num_slices, size, box_coords)
            if isinstance(parsed, AnswerFailure):
                out.append(SampledAnchor(None, (), text, agreement, parsed.reason))
            else:
                a = parsed.anchor
                out.append(SampledAnchor(a.key_slice, a.boxes, text, agreement, None))
            continue
        try:
            if not isinstance(item, dict):
                raise ReviewError(f"{item!r:.60} is neither an answer text nor an object")
            boxes = item.get("boxes", item.get("bbox_2d_list"))
            a = check_anchor(item.get("key_slice"), boxes, num_slices, size)
            out.append(SampledAnchor(a.key_slice, a.boxes, None, agreement, None))
        except ReviewError as err:
            out.append(SampledAnchor(None, (), None, agreement, f"sample {n + 1}: {err}"))
    return tuple(out)


class TruthIndex:
    """The ground truth of a predict case: the manifest row on the same image asking the same
    target (its query, its label, or one of its label's phrasings)."""

    def __init__(self, cfg: RunConfig):
        from data.dataset import VolumeDataset

        self.by_image: dict[Path, list] = {}
        self.values: dict[str, tuple[int, ...]] = {}
        if cfg.data.manifest is None:
            return
        dataset = VolumeDataset(cfg.data.manifest, cfg.data, check_labels=False)
        for sample in dataset.samples:
            self.by_image.setdefault(Path(sample.image).resolve(), []).append(sample)
            self.values[sample.id] = tuple(dataset.label_values(sample.id))

    def find(self, image: Path, query: str):
        from data.queries import phrasings, target_of

        def asks(sample) -> bool:
            names = {sample.query, sample.label}
            if target_of(sample.label) is not None:  # a label with phrasings
                for split in ("train", "test"):
                    names.update(phrasings(sample.label, split))
            return query.strip().lower() in {n.strip().lower() for n in names}

        found = [s for s in self.by_image.get(Path(image).resolve(), []) if asks(s)]
        if len(found) > 1:
            log.warning(
                "%s, %r: %d manifest rows ask this (%s); no ground truth shown",
                image,
                query,
                len(found),
                ", ".join(s.id for s in found),
            )
        return found[0] if len(found) == 1 else None


def _check_frame(case: ReviewCase, evidence: dict, evidence_file: Path, cfg: RunConfig) -> None:
    """The config's slice frame must be the one predict wrote the evidence in: its key slice
    and boxes, mapped to the source, must land where evidence.json says they did."""
    from data.preprocess import sample_indices

    if case.anchor is None or not (case.folder / "mask.nii.gz").exists():
        return
    z_count, height, width = canonical_shape(case.folder / "mask.nii.gz")
    n, size = cfg.data.num_slices, cfg.data.slice_size
    z = evidence.get("key_slice_source")
    if isinstance(z, int) and int(sample_indices(z_count, n)[case.anchor.key_slice - 1]) != z:
        raise ReviewError(
            f"{evidence_file}: field 'key_slice_source' {z} is not where key slice "
            f"{case.anchor.key_slice} of {n} sampled slices lies in {z_count}; set data.num_slices "
            "to the slices predict ran with"
        )
    source = evidence.get("boxes_source")
    if isinstance(source, list) and len(source) == len(case.anchor.boxes):
        for box, given in zip(case.anchor.boxes, source):
            scale = (width / size, height / size) * 2
            mapped = [v * s for v, s in zip(box, scale)]
            numbers = [_number(v) for v in given] if isinstance(given, list) else []
            if len(numbers) != 4 or any(
                g is None or abs(g - m) > 0.06 for g, m in zip(numbers, mapped)
            ):
                raise ReviewError(
                    f"{evidence_file}: field 'boxes_source' {given!r:.60} is not box {list(box)} "
                    f"of a {size} px slice on {width} x {height} pixels; set data.slice_size to "
                    "the slice size predict ran with"
                )


def _predict_case(
    evidence_file: Path, folder: Path, cfg: RunConfig, truth: TruthIndex
) -> ReviewCase:
    from evaluation.predict import scan_names

    evidence = _read_json(evidence_file)
    query = evidence.get("query")
    if not isinstance(query, str) or not query.strip():
        raise ReviewError(f"{evidence_file}: field 'query' is {query!r:.60}, not a query")
    image = _resolve_image(evidence.get("image"), evidence_file, folder)
    window = _window(evidence.get("window"), evidence_file)
    n, size = cfg.data.num_slices, cfg.data.slice_size
    answer = evidence.get("answer") if isinstance(evidence.get("answer"), str) else None
    anchor, think, failure = None, "", evidence.get("failure")
    if evidence.get("ok"):
        anchor = check_anchor(
            evidence.get("key_slice"),
            evidence.get("boxes"),
            n,
            size,
            f"{evidence_file} (the frame of data.num_slices {n}, data.slice_size {size}): ",
        )
        think = str(evidence.get("reasoning", ""))
    rel = evidence_file.parent.relative_to(folder)
    scan = scan_names([image])[0]
    parts = rel.parts if rel.parts and not rel.parts[0].startswith("query-") else (scan, *rel.parts)
    sample = truth.find(image, query)
    shown = ("mask_voxels", "volume_mm3", "propagator", "key_slice_source", "window", "spacing_mm")
    case = ReviewCase(
        id="/".join(parts),
        query=query,
        image=image,
        folder=evidence_file.parent,
        answer=answer,
        think=think,
        anchor=anchor,
        failure=None if failure is None else str(failure),
        window=window,
        dsc=None,
        agreement=_number(evidence.get("agreement")),
        sample=sample,
        label_values=truth.values.get(sample.id, ()) if sample is not None else (),
        sampled=_sampled(
            evidence.get("anchors", evidence.get("samples")), n, size, cfg.data.box_coords
        ),
        metrics={k: evidence[k] for k in shown if k in evidence},
    )
    _check_frame(case, evidence, evidence_file, cfg)
    return case


def _evidence_files(folder: Path) -> list[Path]:
    """The evidence.json files of a predict folder (not those of its corrections)."""
    return sorted(
        p
        for p in folder.rglob("evidence.json")
        if not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.relative_to(folder).parts[0] != "corrections"
    )


def with_recorded_frame(folder: Path, cfg: RunConfig) -> RunConfig:
    """``cfg`` in the slice frame predict recorded in the folder's evidence.json files
    (``num_slices``, ``slice_size``), which replaces the config's; files that record none
    (written before they did) leave the config's. Two files that record different frames stop
    the review, naming both."""
    seen: dict[tuple, Path] = {}
    for path in _evidence_files(folder):
        evidence = _read_json(path)
        if "num_slices" not in evidence and "slice_size" not in evidence:
            continue
        frame = (evidence.get("num_slices"), evidence.get("slice_size"))
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in frame):
            raise ReviewError(
                f"{path}: fields 'num_slices', 'slice_size' are {frame[0]!r}, {frame[1]!r}; "
                "not a slice frame"
            )
        seen.setdefault(frame, path)
    if len(seen) > 1:
        (a, first), (b, second) = list(seen.items())[:2]
        raise ReviewError(
            f"{folder}: cases of two slice frames, {a[0]} x {a[1]} px ({first}) and {b[0]} x "
            f"{b[1]} px ({second}); review one predict run at a time"
        )
    if not seen:
        return cfg
    ((n, size),) = seen
    if (n, size) != (cfg.data.num_slices, cfg.data.slice_size):
        log.info("%s: predict's frame, %d slices of %d px (evidence.json)", folder, n, size)
    return replace(cfg, data=replace(cfg.data, num_slices=n, slice_size=size))


def predict_cases(folder: Path, cfg: RunConfig, progress: bool = True) -> list[ReviewCase]:
    """The cases of a predict output folder, with the DSC of each written mask where the
    manifest holds its ground truth."""
    from tqdm import tqdm

    from evaluation.metrics import dsc

    files = _evidence_files(folder)
    truth = TruthIndex(cfg)
    cases = [_predict_case(f, folder, cfg, truth) for f in files]
    scored = []
    for case in tqdm(cases, desc="review: DSC", unit="case", disable=not progress):
        if case.sample is not None:
            mask = _mask_on_grid(case)
            labels = _truth_on_grid(case)
            if labels.shape != mask.shape:
                raise ReviewError(
                    f"{case.sample.mask}: ground truth of shape {labels.shape} (z, y, x) does not "
                    f"fit the mask {case.folder / 'mask.nii.gz'} of shape {mask.shape}"
                )
            case = replace(case, dsc=dsc(mask, labels))
        scored.append(case)
    return scored


def _mask_on_grid(case: ReviewCase) -> np.ndarray:
    from data.volume import load_volume

    if not (case.folder / "mask.nii.gz").is_file():
        raise ReviewError(f"{case.folder / 'mask.nii.gz'}: no such file (predict writes one)")
    return np.asarray(load_volume(case.folder / "mask.nii.gz", "mask").array) != 0


def _truth_on_grid(case: ReviewCase) -> np.ndarray:
    from data.volume import load_volume

    labels = load_volume(case.sample.mask, "mask", case.sample.m3d_axes)
    return np.isin(labels.array, case.label_values)


def evaluation_cases(
    folder: Path, cfg: RunConfig, rows: list[str] | None = None
) -> list[ReviewCase]:
    """The cases of an evaluation output folder's cases.jsonl (the rows asked, else all):
    anchors, failures and metrics as recorded; the query and the truth from the manifest."""
    from data.dataset import VolumeDataset
    from evaluation.cases import read_cases
    from evaluation.evaluate import PHRASING_SUFFIX, with_training_phrasing

    cases_file = folder / "cases.jsonl"
    if cfg.data.manifest is None:
        raise UsageError(
            f"data.manifest: not set; {cases_file} names its cases by manifest id: give the "
            "evaluation's config (--config FILE or data.manifest=PATH)"
        )
    try:
        records, keep = read_cases(cases_file, rows)
    except UsageError:
        raise  # a --row the file does not hold: named with the rows it does
    except (ValueError, KeyError) as err:
        raise ReviewError(f"{cases_file}: not an evaluation's cases file ({err})") from None
    dataset = VolumeDataset(cfg.data.manifest, cfg.data, check_labels=False)
    known = {s.id: s for s in dataset.samples}
    n, size = cfg.data.num_slices, cfg.data.slice_size
    cases = []
    for line, record in enumerate(records, start=1):
        if record.get("row") not in keep:
            continue
        where = f"{cases_file}, line {line}: "
        sample = known.get(record.get("id"))
        if sample is None:
            raise ReviewError(
                f"{where}id {record.get('id')!r} is not in {cfg.data.manifest}; give the "
                "evaluation's manifest (data.manifest)"
            )
        anchor = None
        if record.get("key_slice") is not None:
            anchor = check_anchor(
                record["key_slice"],
                record.get("boxes"),
                n,
                size,
                f"{where}(the frame of data.num_slices {n}, data.slice_size {size}) ",
            )
        answer = record.get("answer") if isinstance(record.get("answer"), str) else None
        row = str(record["row"])
        # the query the row asked: held-out rows the manifest's, the others a training phrasing
        # (the oracle asks none: the manifest's is shown)
        held_out = row.endswith(PHRASING_SUFFIX) or row.startswith("oracle anchor")
        query = sample.query if held_out else with_training_phrasing(sample).query
        shown = ("dsc", "iou", "nsd", "hd95", "surface_unit", "suite", "propagator")
        cases.append(
            ReviewCase(
                id=f"{row} | {sample.id}",
                query=query,
                image=Path(sample.image),
                folder=None,
                anchor=anchor,
                failure=record.get("failure"),
                window=None,
                dsc=_number(record.get("dsc")),
                agreement=_number(record.get("agreement")),
                answer=answer,
                think=_think(answer, n, size, cfg.data.box_coords),
                sampled=_sampled(record.get("anchors"), n, size, cfg.data.box_coords),
                row=row,
                sample=sample,
                label_values=tuple(dataset.label_values(sample.id)),
                metrics={k: record[k] for k in shown if k in record},
            )
        )
    return cases


# ---- the review: cases, arrays, propagation, corrections -------------------------------------


class Review:
    """A folder under review: its cases, the propagator, and the corrections file."""

    def __init__(
        self,
        folder: Path,
        cfg: RunConfig,
        device: str = "cpu",
        rows: list[str] | None = None,
        progress: bool = True,
    ):
        from reward_server.propagation import build_propagator

        self.folder = Path(folder).resolve()
        self.cfg = cfg
        if not self.folder.is_dir():
            raise ReviewError(f"{folder}: no such folder")
        r = cfg.reward
        if r.propagator == "medsam2" and r.checkpoint is None and not r.random_weights:
            raise UsageError(
                "reward.checkpoint: not set for reward.propagator medsam2; give the MedSAM2 "
                "checkpoint (reward.checkpoint=PATH)"
            )
        if (self.folder / "cases.jsonl").is_file():
            self.kind = "evaluation"
            cases = evaluation_cases(self.folder, cfg, rows)
        elif any(self.folder.rglob("evidence.json")):
            self.kind = "predict"
            if rows:
                raise UsageError(f"--row {rows[0]}: {folder} is a predict folder, it has no rows")
            self.cfg = cfg = with_recorded_frame(self.folder, cfg)
            cases = predict_cases(self.folder, cfg, progress)
        else:
            raise ReviewError(
                f"{folder}: neither a predict output (evidence.json) nor an evaluation output "
                "(cases.jsonl)"
            )
        self.cases: dict[str, ReviewCase] = {}
        for case in cases:
            if case.id in self.cases:
                raise ReviewError(f"{folder}: two cases are named {case.id!r}")
            self.cases[case.id] = case
        self.propagator = build_propagator(
            r.propagator,
            r.checkpoint if r.propagator == "medsam2" else None,
            r.image_size,
            r.feature_batch,
            r.volume_cache,
            device=device,
        )
        self._dataset = None  # evaluation: the manifest's samples, read on the first case opened
        self._loaded: OrderedDict[str, LoadedCase] = OrderedDict()
        self._proposals: OrderedDict[tuple, Proposal] = OrderedDict()
        self._load_lock = threading.Lock()
        self._propagate_lock = threading.Lock()  # MedSAM2's feature cache is not thread-safe
        self._write_lock = threading.Lock()

    # -- requests' fields

    def case(self, case_id) -> ReviewCase:
        if not isinstance(case_id, str) or case_id not in self.cases:
            raise ReviewError(
                f"case: {case_id!r:.80} is not a case of {self.folder} ({len(self.cases)} cases)"
            )
        return self.cases[case_id]

    @property
    def frame(self) -> tuple[int, int]:
        return self.cfg.data.num_slices, self.cfg.data.slice_size

    # -- arrays

    def loaded(self, case: ReviewCase) -> LoadedCase:
        with self._load_lock:
            if case.id in self._loaded:
                self._loaded.move_to_end(case.id)
                return self._loaded[case.id]
            try:
                loaded = self._load(case)
            except VolumeError as err:  # a scan, mask or label file that cannot be read
                raise ReviewError(f"case {case.id!r}: {err}") from None
            self._loaded[case.id] = loaded
            while len(self._loaded) > LOADED_CASES:
                self._loaded.popitem(last=False)
            return loaded

    def _load(self, case: ReviewCase) -> LoadedCase:
        from data.preprocess import prepare_arrays, resize_slices

        n, size = self.frame
        scan = read_scan(case.image, case.id, case.sample)
        if self.kind == "evaluation":
            from data.dataset import VolumeDataset

            if self._dataset is None:
                self._dataset = VolumeDataset(
                    self.cfg.data.manifest, self.cfg.data, check_labels=False
                )
            _, prepared = self._dataset.by_id(case.sample.id)
        else:
            prepared = prepare_arrays(scan.volume, None, [], case.window, n, size, case.id)
        truth = truth_frame = None
        if case.sample is not None:
            truth = _truth_on_grid(case)
            truth_frame = resize_slices(truth[prepared.source_index], size, is_mask=True)
        if self.kind == "evaluation" and case.sampled:  # a consensus row: the draws' majority
            from evaluation.metrics import consensus_mask

            answer = consensus_mask(
                [self._frame_mask(case, prepared, truth, s) for s in case.sampled]
            )
        elif self.kind == "evaluation":
            answer = self._frame_mask(case, prepared, truth, case.anchor)
        else:
            mask = _mask_on_grid(case)
            if mask.shape != tuple(prepared.source_shape):
                raise ReviewError(
                    f"{case.folder / 'mask.nii.gz'}: shape {mask.shape} (z, y, x) does not fit "
                    f"the scan {case.image} of shape {tuple(prepared.source_shape)}"
                )
            answer = resize_slices(mask[prepared.source_index], size, is_mask=True)
        return LoadedCase(scan, prepared, np.asarray(answer, bool), truth, truth_frame)

    def _frame_mask(self, case: ReviewCase, prepared, truth, anchor) -> np.ndarray:
        """An anchor's (an EvidenceAnchor or a SampledAnchor) mask on the policy's frame;
        empty for none or one that did not parse."""
        if anchor is None or anchor.key_slice is None:
            return np.zeros(prepared.slices.shape, bool)
        anchor = EvidenceAnchor(anchor.key_slice, tuple(anchor.boxes))
        return self._propagated(case, prepared, truth, anchor).frame_mask

    def proposal(self, case: ReviewCase, anchor: EvidenceAnchor) -> Proposal:
        loaded = self.loaded(case)
        return self._propagated(case, loaded.prepared, loaded.truth, anchor)

    def _propagated(self, case: ReviewCase, prepared, truth, anchor: EvidenceAnchor) -> Proposal:
        from data.preprocess import to_source_grid
        from evaluation.metrics import dsc

        key = (case.id, anchor.key_slice, anchor.boxes)
        with self._propagate_lock:
            if key in self._proposals:
                self._proposals.move_to_end(key)
                return self._proposals[key]
            mask = self.propagator.propagate(
                case.id, np.asarray(prepared.slices), anchor.key_slice, anchor.boxes, None
            )
            mask = np.asarray(mask, bool)
            score = dsc(to_source_grid(mask, prepared), truth) if truth is not None else None
            proposal = Proposal(anchor, mask, score)
            self._proposals[key] = proposal
            while len(self._proposals) > PROPOSALS:
                self._proposals.popitem(last=False)
            return proposal

    # -- what the endpoints answer

    def case_list(self) -> dict:
        n, size = self.frame
        corrected: dict[str, int] = {}
        for row in self.corrections():
            corrected[row.get("case")] = corrected.get(row.get("case"), 0) + 1
        return {
            "folder": str(self.folder),
            "kind": self.kind,
            "propagator": self.propagator.name,
            "num_slices": n,
            "slice_size": size,
            "cases": [
                {
                    "id": c.id,
                    "query": c.query,
                    "row": c.row,
                    "dsc": c.dsc,
                    "agreement": c.agreement,
                    "ok": c.anchor is not None,
                    "corrected": corrected.get(c.id, 0),
                }
                for c in self.cases.values()
            ],
        }

    def case_view(self, case_id) -> dict:
        case = self.case(case_id)
        loaded = self.loaded(case)
        prepared = loaded.prepared

        def anchor_view(anchor):
            if anchor is None:
                return None
            return {"key_slice": anchor.key_slice, "boxes": [list(b) for b in anchor.boxes]}

        own_dsc = None
        if self.kind == "evaluation" and loaded.truth is not None:
            from data.preprocess import to_source_grid
            from evaluation.metrics import dsc

            own_dsc = dsc(to_source_grid(loaded.answer_mask, prepared), loaded.truth)
        return {
            "id": case.id,
            "sample_id": case.sample.id if case.sample is not None else None,
            "query": case.query,
            "row": case.row,
            "image": str(case.image),
            "kind": self.kind,
            "num_slices": int(prepared.slices.shape[0]),
            "size": int(prepared.slices.shape[-1]),
            "source_index": [int(z) for z in prepared.source_index],
            "anchor": anchor_view(case.anchor),
            "answer": case.answer,
            "think": case.think,
            "failure": case.failure,
            "dsc": case.dsc,
            "dsc_shown_mask": own_dsc,  # evaluation: the recomputed mask's DSC
            "agreement": case.agreement,
            "has_truth": loaded.truth is not None,
            "mask_slices": _slices_with(loaded.answer_mask),
            "truth_slices": _slices_with(loaded.truth_frame),
            "sampled": [
                {
                    "key_slice": s.key_slice,
                    "boxes": [list(b) for b in s.boxes],
                    "answer": s.answer,
                    "agreement": s.agreement,
                    "failure": s.failure,
                }
                for s in case.sampled
            ],
            "metrics": case.metrics,
            "propagator": self.propagator.name,
            "corrections": [r for r in self.corrections() if r.get("case") == case.id],
        }

    def slice_png(self, case_id, k, mask: str, anchor_fields, truth: bool) -> bytes:
        case = self.case(case_id)
        n, size = self.frame
        k = _slice_number(k, n, "k")
        if mask not in ("answer", "proposal", "none"):
            raise ReviewError(f"mask: {mask!r:.40} is not one of answer, proposal, none")
        loaded = self.loaded(case)
        over = None
        if mask == "answer":
            over = loaded.answer_mask[k - 1]
        elif mask == "proposal":
            key_slice, boxes = anchor_fields
            if key_slice is None or boxes is None:
                raise ReviewError("key_slice, boxes: mask=proposal needs both")
            key_slice = _slice_number(key_slice, n, "key_slice")
            try:
                boxes = json.loads(boxes)
            except ValueError:
                raise ReviewError(f"boxes: {boxes!r:.60} is not JSON") from None
            over = self.proposal(case, check_anchor(key_slice, boxes, n, size)).frame_mask[k - 1]
        edge = loaded.truth_frame[k - 1] if truth and loaded.truth_frame is not None else None
        return overlay_png(np.asarray(loaded.prepared.slices[k - 1]), over, edge)

    def propagate(self, body) -> dict:
        case, anchor, _ = self._anchor_request(body, ("case", "key_slice", "boxes"))
        proposal = self.proposal(case, anchor)
        return {
            "case": case.id,
            "key_slice": anchor.key_slice,
            "boxes": [list(b) for b in anchor.boxes],
            "dsc": proposal.dsc,
            "mask_slices": _slices_with(proposal.frame_mask),
            "propagator": self.propagator.name,
        }

    def accept(self, body) -> dict:
        """Append the corrected anchor to corrections.jsonl and write its mask (and, for a DICOM
        series, its SEG) under ``corrections/<row number>/``, holding a lock for both."""
        case, anchor, think = self._anchor_request(body, ("case", "key_slice", "boxes", "think"))
        think = case.think if think is None else think
        try:
            answer = format_answer(anchor, think)
        except ValueError as err:
            raise ReviewError(f"think: {err}") from None
        loaded = self.loaded(case)
        proposal = self.proposal(case, anchor)
        row = self._row(case, loaded, anchor, answer, proposal)
        with self._write_lock, file_lock(self.folder / "corrections" / ".lock"):
            rows_file = self.folder / CORRECTIONS
            count = (
                sum(1 for line in rows_file.read_text().splitlines() if line.strip())
                if rows_file.exists()
                else 0
            )
            number = count + 1
            while (self.folder / "corrections" / str(number)).exists():
                number += 1  # a folder left by a row removed by hand
            target = self.folder / "corrections" / str(number)
            row = {"number": number, **row}
            row.update(self._write_mask(case, loaded, proposal, target))
            with rows_file.open("a", encoding="utf-8") as sink:
                sink.write(json.dumps(row) + "\n")
                sink.flush()
        log.info("%s: %s accepted as row %d (%s)", rows_file, case.id, number, row["mask"])
        return row

    def _anchor_request(self, body, allowed: tuple[str, ...]):
        if not isinstance(body, dict):
            raise ReviewError(f"request body: a JSON {type(body).__name__}, not an object")
        unknown = sorted(set(body) - set(allowed))
        if unknown:
            raise ReviewError(f"request body: unknown field(s) {unknown}; fields are {allowed}")
        for name in ("case", "key_slice", "boxes"):
            if name not in body:
                raise ReviewError(f"{name}: missing")
        case = self.case(body["case"])
        anchor = check_anchor(body["key_slice"], body["boxes"], *self.frame)
        think = body.get("think")
        if think is not None and (not isinstance(think, str) or len(think) > MAX_THINK):
            raise ReviewError(f"think: {think!r:.60} is not a text of at most {MAX_THINK} chars")
        return case, anchor, think

    def _row(self, case, loaded, anchor, answer, proposal) -> dict:
        from data.preprocess import box_to_source

        prepared = loaded.prepared
        original = None
        if case.anchor is not None:
            original = {
                "key_slice": case.anchor.key_slice,
                "bbox_2d_list": [list(b) for b in case.anchor.boxes],
            }
        return {
            "case": case.id,
            "query": case.query,
            "image": str(case.image),
            "row": case.row,
            "sample_id": case.sample.id if case.sample is not None else None,
            "key_slice": anchor.key_slice,
            "bbox_2d_list": [list(b) for b in anchor.boxes],
            "answer": answer,
            "original_answer": case.answer,
            "original_anchor": original,
            "key_slice_source": int(prepared.source_index[anchor.key_slice - 1]),
            "boxes_source": [
                [round(v, 1) for v in box_to_source(b, prepared)] for b in anchor.boxes
            ],
            "num_slices": int(prepared.slices.shape[0]),
            "slice_size": int(prepared.slices.shape[-1]),
            "propagator": self.propagator.name,
            "dsc": proposal.dsc,
            "original_dsc": case.dsc,
            "reviewed_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }

    def _write_mask(self, case, loaded, proposal, target: Path) -> dict:
        from data.preprocess import to_source_grid
        from data.volume import save_mask
        from evaluation.predict import QueryResult, write_seg_or_warn

        scan = loaded.scan
        mask = to_source_grid(proposal.frame_mask, loaded.prepared)
        target.mkdir(parents=True, exist_ok=True)
        like = scan.path if _is_nifti(scan.path) else scan.volume
        save_mask(mask, like, target / "mask.nii.gz")
        written = {
            "mask": (target / "mask.nii.gz").relative_to(self.folder).as_posix(),
            "mask_voxels": int(mask.sum()),
            "volume_mm3": round(int(mask.sum()) * float(np.prod(scan.volume.spacing)), 1),
            "segmentation": None,
        }
        if scan.series is not None:
            result = QueryResult(case.query, mask, proposal.frame_mask, proposal.anchor, {})
            write_seg_or_warn(scan, [result], target / "segmentation.dcm")
            if (target / "segmentation.dcm").exists():
                seg = target / "segmentation.dcm"
                written["segmentation"] = seg.relative_to(self.folder).as_posix()
        return written

    def corrections(self) -> list[dict]:
        """The rows of corrections.jsonl so far (a line broken by hand is skipped)."""
        rows_file = self.folder / CORRECTIONS
        if not rows_file.exists():
            return []
        rows = []
        for line in rows_file.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows


def _is_nifti(path: Path) -> bool:
    return Path(path).name.lower().endswith((".nii", ".nii.gz"))


def read_scan(image: Path, name: str, sample=None):
    """A scan as evaluation.predict reads one (NIfTI or a DICOM series, whose SEG needs the
    series); an M3D-Seg array read as its manifest row says."""
    from data.volume import load_volume
    from evaluation.predict import Scan
    from evaluation.predict import read_scan as read_predict_scan

    image = Path(image)
    if image.is_dir() or _is_nifti(image):
        return read_predict_scan(image, name)
    axes = getattr(sample, "m3d_axes", None)
    return Scan(path=image, name=name, volume=load_volume(image, "image", axes))


def _slices_with(mask: np.ndarray | None) -> list[int]:
    """The 1-based slices where ``mask`` (S, H, W) has a voxel."""
    if mask is None:
        return []
    return [int(k) + 1 for k in np.flatnonzero(np.asarray(mask).reshape(mask.shape[0], -1).any(1))]


def _slice_number(raw, num_slices: int, name: str) -> int:
    try:
        k = int(raw)
    except (TypeError, ValueError):
        raise ReviewError(f"{name}: {raw!r:.40} is not an integer") from None
    if not 1 <= k <= num_slices:
        raise ReviewError(f"{name}: {k} is not in 1..{num_slices}")
    return k


def overlay_png(image: np.ndarray, mask: np.ndarray | None, truth: np.ndarray | None) -> bytes:
    """A slice as PNG: the mask blended in red, the ground truth's outline in green."""
    from PIL import Image
    from scipy import ndimage

    rgb = np.repeat(np.asarray(image, np.float32)[..., None], 3, axis=2)
    if mask is not None and mask.any():
        rgb[mask] = 0.55 * rgb[mask] + 0.45 * np.array([255.0, 50.0, 30.0])
    if truth is not None and truth.any():
        rgb[truth & ~ndimage.binary_erosion(truth)] = (40.0, 230.0, 90.0)
    out = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(out, "PNG")
    return out.getvalue()


# ---- HTTP ------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    """Routes requests to a :class:`Review`; ReviewError is a 400 naming the field."""

    review: Review  # set on the subclass :func:`make_server` builds
    server_version = "medvol-review"
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        try:
            if method == "GET" and (url.path == "/" or url.path.startswith("/static/")):
                self._static("index.html" if url.path == "/" else url.path[len("/static/") :])
            elif method == "GET" and url.path == "/api/cases":
                self._json(200, self.review.case_list())
            elif method == "GET" and url.path == "/api/case":
                self._json(200, self.review.case_view(query.get("case")))
            elif method == "GET" and url.path == "/api/slice.png":
                png = self.review.slice_png(
                    query.get("case"),
                    query.get("k"),
                    query.get("mask", "answer"),
                    (query.get("key_slice"), query.get("boxes")),
                    query.get("truth", "0") not in ("0", "", "false"),
                )
                self._send(200, "image/png", png, cache=True)
            elif method == "POST" and url.path == "/api/propagate":
                self._json(200, self.review.propagate(self._body()))
            elif method == "POST" and url.path == "/api/accept":
                self._json(200, self.review.accept(self._body()))
            elif url.path in ("/api/propagate", "/api/accept", "/api/cases", "/api/case"):
                self._json(405, {"error": f"{url.path}: method {method} not allowed"})
            else:
                self._json(404, {"error": f"{url.path}: no such page or endpoint"})
        except ReviewError as err:
            self.close_connection = True  # a body left unread must not be read as a request
            self._json(400, {"error": str(err)})
        except Exception as err:  # noqa: BLE001 - a bug: logged with its traceback, told as 500
            log.exception("%s %s", method, self.path)
            self.close_connection = True
            self._json(500, {"error": f"{type(err).__name__}: {err}"})

    def _body(self):
        length = self.headers.get("Content-Length")
        try:
            size = int(length)
        except (TypeError, ValueError):
            raise ReviewError(f"Content-Length: {length!r} is not a byte count") from None
        if not 0 <= size <= MAX_BODY:
            raise ReviewError(f"Content-Length: {size} bytes, at most {MAX_BODY}")
        raw = self.rfile.read(size)
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise ReviewError(f"request body: not JSON ({err})") from None

    def _static(self, name: str) -> None:
        files = {p.name: p for p in STATIC.iterdir() if p.suffix in STATIC_TYPES}
        if name not in files:
            self._json(404, {"error": f"/static/{name}: no such file"})
            return
        path = files[name]
        kind = STATIC_TYPES[path.suffix] + "; charset=utf-8"
        self._send(200, kind, path.read_bytes())

    def _json(self, status: int, value) -> None:
        self._send(status, "application/json", json.dumps(value).encode("utf-8"))

    def _send(self, status: int, kind: str, body: bytes, cache: bool = False) -> None:
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "private, max-age=600" if cache else "no-store")
        self.end_headers()
        self.wfile.write(body)


def make_server(review: Review, host: str = "127.0.0.1", port: int = DEFAULT_PORT):
    """An HTTP server for ``review`` bound to ``host``:``port`` (0: any free port; the bound
    one is ``server.server_address[1]``); each request runs in its own thread."""
    handler = type("ReviewHandler", (_Handler,), {"review": review})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as err:
        raise UsageError(
            f"--port {port}: cannot listen on {host}:{port} ({err.strerror or err}); "
            "give another port, or 0 for any free one"
        ) from None
    server.daemon_threads = True
    return server


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m evaluation.review", description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, metavar="DIR", help="a predict or evaluation output")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0: any free one"
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only)",
    )
    parser.add_argument(
        "--row", action="append", help="an evaluation folder's row to review (default: all)"
    )
    add_device_argument(parser, "the propagator")
    add_config_arguments(parser)
    return parser


@command()
def main(argv: list[str] | None = None) -> int:
    set_default_environment()
    # DIR and the key=value overrides are both positional: let flags sit between them
    args = build_parser().parse_intermixed_args(argv)
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: not a port (0..65535)")
    cfg = command_config(args)
    if not args.folder.is_dir():
        raise UsageError(f"{args.folder}: no such folder")
    log_to_file(args.folder / "review.log")
    review = Review(args.folder, cfg, resolve_device(args.device), args.row)
    server = make_server(review, args.host, args.port)
    host, port = server.server_address[:2]
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "--host %s: whoever reaches this machine can see the scans and write corrections", host
        )
    print(
        f"review: {len(review.cases)} cases of {review.folder} ({review.kind}; propagator "
        f"{review.propagator.name}) at http://{host}:{port}/ (Ctrl-C stops)",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
