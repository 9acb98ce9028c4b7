"""Reviewers' corrected anchors (``corrections.jsonl`` of evaluation.review) as SFT targets.

A row, as the review page's Accept appends it (more fields are ignored)::

    {"sample_id": "<manifest id>", "query": "...", "key_slice": k,
     "bbox_2d_list": [[x1, y1, x2, y2], ...], "answer": "<think>...</think><answer>...</answer>",
     "num_slices": S, "slice_size": P, "original_answer": "...", ...}

Decisions:

- The case is ``sample_id``, the manifest id review found for the reviewed scan and query; a row
  without one (review ran without the training manifest) names no case and is an error.
- ``key_slice`` and ``bbox_2d_list`` are checked by data.answer's parser, in the frame training
  runs in; ``num_slices`` and ``slice_size``, when the row has them, must be that frame (a key
  slice of another frame is another slice).
- Boxes in the file are pixel edges of the slice (review writes them so), whatever
  ``data.box_coords`` training runs with; the target text is written in ``data.box_coords``.
- ``answer``, when present, must parse to the same anchor; its reasoning is the target's (the
  reviewer edits it on the page). A row without one gets the cold start's own reasoning.
- Several rows for one case (files in the order given, lines in order): the last one counts, as
  the latest review of it.
- A malformed row, or one naming a case outside the cases given, stops with an error naming the
  file, the line and the field.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from data.answer import (
    SLICE_SIZE,
    AnswerFailure,
    EvidenceAnchor,
    format_answer,
    parse_answer,
)

log = logging.getLogger(__name__)


class CorrectionError(ValueError):
    """A corrections row that cannot be trained on; names the file, line, field and value."""


@dataclass(frozen=True)
class Correction:
    """A reviewer's anchor for one training case, and the query it answers."""

    sample_id: str
    query: str
    anchor: EvidenceAnchor
    think: str | None  # the reasoning of the row's answer; None: the row has no answer text
    where: str  # "<file>, line <n>"


def _text(row: dict, name: str, where: str) -> str:
    value = row.get(name)
    if not isinstance(value, str) or not value.strip():
        raise CorrectionError(f"{where}: field '{name}' is {value!r:.60}, not a non-empty text")
    return value


def _anchor(row: dict, where: str, num_slices: int, size: int) -> EvidenceAnchor:
    for name in ("key_slice", "bbox_2d_list"):
        if name not in row:
            raise CorrectionError(f"{where}: field '{name}' missing")
    payload = json.dumps({"key_slice": row["key_slice"], "bbox_2d_list": row["bbox_2d_list"]})
    parsed = parse_answer(f"<think></think><answer>{payload}</answer>", num_slices, size)
    if isinstance(parsed, AnswerFailure):
        field = "key_slice" if parsed.reason.startswith("key_slice") else "bbox_2d_list"
        raise CorrectionError(
            f"{where}: field '{field}' {row[field]!r:.80}: {parsed.reason} (the frame of "
            f"data.num_slices {num_slices}, data.slice_size {size})"
        )
    return parsed.anchor


def parse_correction(row: object, where: str, num_slices: int, size: int) -> Correction:
    """One row of a corrections file, checked (module docstring); ``where`` names its line."""
    if not isinstance(row, dict):
        raise CorrectionError(f"{where}: a JSON {type(row).__name__}, not an object")
    sample_id = row.get("sample_id")
    if sample_id is None:
        raise CorrectionError(
            f"{where}: field 'sample_id' is null: the reviewed case has no manifest row (review "
            "with the training config, whose data.manifest holds the scan and query)"
        )
    sample_id = _text(row, "sample_id", where)
    query = _text(row, "query", where)
    for name, frame in (("num_slices", num_slices), ("slice_size", size)):
        if name in row and row[name] != frame:
            raise CorrectionError(
                f"{where}: field '{name}' is {row[name]!r:.40}, but training runs with "
                f"data.{name} {frame}: the anchor would point elsewhere"
            )
    anchor = _anchor(row, where, num_slices, size)
    think = None
    if row.get("answer") is not None:
        parsed = parse_answer(row["answer"], num_slices, size)
        if isinstance(parsed, AnswerFailure):
            raise CorrectionError(f"{where}: field 'answer' does not parse: {parsed.reason}")
        if parsed.anchor != anchor:
            raise CorrectionError(
                f"{where}: field 'answer' holds key slice {parsed.anchor.key_slice} and boxes "
                f"{[list(b) for b in parsed.anchor.boxes]}, not the row's key_slice "
                f"{anchor.key_slice} and bbox_2d_list {[list(b) for b in anchor.boxes]}"
            )
        think = parsed.think
    return Correction(sample_id, query, anchor, think, where)


def read_corrections(
    paths: Sequence[Path],
    num_slices: int,
    size: int,
    cases: Collection[str],
    cases_name: str = "the training split",
) -> dict[str, Correction]:
    """The corrections of ``paths`` by sample id, each naming one of ``cases`` (described as
    ``cases_name`` in the error); the last row of a case counts."""
    found: dict[str, Correction] = {}
    for path in map(Path, paths):
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise CorrectionError(f"{path}: cannot read the corrections file ({err})") from None
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                row = json.loads(line)
            except ValueError as err:
                raise CorrectionError(f"{where}: not JSON ({err})") from None
            correction = parse_correction(row, where, num_slices, size)
            if correction.sample_id not in cases:
                raise CorrectionError(
                    f"{where}: field 'sample_id' {correction.sample_id!r} is not a case of "
                    f"{cases_name}"
                )
            if correction.sample_id in found:
                log.info(
                    "%s: %s replaces the correction of %s",
                    where,
                    correction.sample_id,
                    found[correction.sample_id].where,
                )
            found[correction.sample_id] = correction
    return found


def correction_text(
    correction: Correction, cold_start_text: str, size: int = SLICE_SIZE, box_coords: str = "pixels"
) -> str:
    """The target answer of a corrected case: its anchor with the reviewer's reasoning, written
    by data.answer's formatter with boxes in ``box_coords`` (data.box_coords; the corrections
    file itself is always in pixels of a ``size`` slice); ``cold_start_text`` (the cold start's
    own target for this anchor) where the row had no answer text."""
    if correction.think is None:
        return cold_start_text
    return format_answer(correction.anchor, correction.think, size, box_coords)
