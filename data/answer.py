"""The evidence-anchor answer: its schema, a strict parser that never raises, and its writer.

A well-formed model answer is exactly

    <think>free text</think><answer>{"key_slice": k, "bbox_2d_list": [[x1, y1, x2, y2]]}</answer>

with nothing but whitespace around the two blocks. This module is the one definition of
"malformed" shared by the SFT targets, the format reward Rf and evaluation:

- not exactly one ``<think>`` block followed by exactly one ``<answer>`` block (nested or repeated
  tags, text before, between or after the blocks, or a missing closing tag);
- answer JSON that is not an object with exactly the keys ``key_slice`` and ``bbox_2d_list``;
- ``key_slice`` not an integer in 1..num_slices (booleans, floats such as 3.0, strings, NaN are
  malformed);
- ``bbox_2d_list`` not a list of boxes, each a list of four integers with
  0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size (same integer rule as above).

An empty ``bbox_2d_list`` is well-formed (the model may say it sees no target on the slice); the
rewards decide what it is worth. Boxes use pixel-edge coordinates in the resized slice frame
(size x size, 256 in the paper): a box covering columns 10..19 is x1 = 10, x2 = 20.

The answer text may write boxes in another frame, ``data.box_coords``:

- ``pixels`` (default): the pixel edges above, as they are;
- ``relative1000``: Qwen3-VL's grounding convention, each coordinate an integer 0..1000 across
  the image, 0 its left (top) edge and 1000 its right (bottom) edge, whatever its size. The
  parser takes 0 <= r <= 1000 and converts each coordinate to the pixel-edge frame, the writer
  converts back, both rounding half up with integers only:

      r = floor((2 * 1000 * p + size) / (2 * size))     (p pixels -> r, round(p * 1000 / size))
      p = floor((2 * size * r + 1000) / 2000)           (r -> p pixels, round(r * size / 1000))

  For size <= 1000 pixels -> relative -> pixels gives back every edge 0..size exactly: r is off
  p * 1000 / size by at most 1/2, so r * size / 1000 is off p by at most size / 2000 < 1/2
  (size 256: edge 10 -> 39 -> 10; edge 1 -> 4 -> 1). Larger slices have more edges than 1001
  values and are refused. A box whose converted edges meet (x1 >= x2 or y1 >= y2, e.g. [10, 0,
  11, 8] on a 256 slice is [3, 0, 3, 2]) is malformed, as in pixels.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

NUM_SLICES = 64  # the paper's number of sampled axial slices
SLICE_SIZE = 256  # the paper's slice frame, pixels
MAX_ANSWER_CHARS = 20_000  # longer output is malformed without parsing (max 256 tokens anyway)
BOX_COORDS = ("pixels", "relative1000")  # data.box_coords: the frame of boxes in answer text
RELATIVE_SCALE = 1000  # relative1000: the right and bottom edges of the image

Box = tuple[int, int, int, int]

_TAG = re.compile(r"</?(think|answer)>")


@dataclass(frozen=True)
class EvidenceAnchor:
    """A key slice (1-based, in the sampled 64-slice frame) and 2D boxes on it."""

    key_slice: int
    boxes: tuple[Box, ...]


@dataclass(frozen=True)
class ParsedAnswer:
    """A well-formed answer: the reasoning text and the evidence anchor."""

    think: str
    anchor: EvidenceAnchor


@dataclass(frozen=True)
class AnswerFailure:
    """A malformed answer; ``reason`` says what was wrong, for logs and failure-rate metrics."""

    reason: str


def _strict_int(value: object) -> int | None:
    # bool is a subclass of int in Python; a JSON true is not a slice number.
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def to_relative1000(p: int, size: int) -> int:
    """A pixel edge 0..size as Qwen3-VL's 0..1000 coordinate, round(p * 1000 / size) halves up."""
    return (2 * RELATIVE_SCALE * p + size) // (2 * size)


def from_relative1000(r: int, size: int) -> int:
    """A 0..1000 coordinate as a pixel edge 0..size, round(r * size / 1000) halves up."""
    return (2 * size * r + RELATIVE_SCALE) // (2 * RELATIVE_SCALE)


def check_box_coords(box_coords: str, size: int) -> None:
    """Raise ValueError naming ``data.box_coords`` when it is unknown, or relative1000 on a slice
    larger than 1000 pixels (its edges would not survive the round trip)."""
    if box_coords not in BOX_COORDS:
        raise ValueError(f"data.box_coords must be one of {BOX_COORDS}, got {box_coords!r}")
    if box_coords == "relative1000" and size > RELATIVE_SCALE:
        raise ValueError(
            f"data.box_coords relative1000: data.slice_size {size} is over {RELATIVE_SCALE}, "
            "so pixel edges would not round-trip through 0-1000 coordinates"
        )


def _parse_box(raw: object, size: int, box_coords: str) -> Box | str:
    if not isinstance(raw, list) or len(raw) != 4:
        return f"box {raw!r:.60} is not a list of four numbers"
    coords = [_strict_int(v) for v in raw]
    if any(c is None for c in coords):
        return f"box {raw!r:.60} has a non-integer coordinate"
    if box_coords == "relative1000":
        if not all(0 <= c <= RELATIVE_SCALE for c in coords):  # type: ignore[operator]
            return f"box {raw!r:.60} has a coordinate outside 0..{RELATIVE_SCALE} (relative1000)"
        pixels = [from_relative1000(c, size) for c in coords]  # type: ignore[arg-type]
        x1, y1, x2, y2 = pixels
        if not (x1 < x2 and y1 < y2):
            return (
                f"box {raw!r:.60} (relative1000) is {pixels} in pixels of the {size}x{size} "
                "slice, not x1 < x2 and y1 < y2"
            )
        return (x1, y1, x2, y2)
    x1, y1, x2, y2 = coords  # type: ignore[misc]
    if not (0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size):
        return f"box {raw!r:.60} is not 0 <= x1 < x2 <= {size} and 0 <= y1 < y2 <= {size}"
    return (x1, y1, x2, y2)


def _reject_constant(name: str) -> float:
    # json.loads accepts NaN/Infinity by default; they are not valid JSON numbers here.
    raise ValueError(f"non-finite number {name}")


def parse_answer(
    text: object, num_slices: int = NUM_SLICES, size: int = SLICE_SIZE, box_coords: str = "pixels"
) -> ParsedAnswer | AnswerFailure:
    """Parse a model completion into an evidence anchor (boxes in the pixel-edge frame, whatever
    ``box_coords`` the text is written in), or say why it is malformed.

    Never raises, whatever ``text`` is (an unknown ``box_coords`` is the caller's error and
    raises ValueError).
    """
    check_box_coords(box_coords, size)
    try:
        return _parse(text, num_slices, size, box_coords)
    except Exception as err:  # noqa: BLE001 - the contract is: model output never raises
        return AnswerFailure(f"unparseable answer ({type(err).__name__})")


def _parse(
    text: object, num_slices: int, size: int, box_coords: str
) -> ParsedAnswer | AnswerFailure:
    if not isinstance(text, str):
        return AnswerFailure(f"completion is {type(text).__name__}, not text")
    if len(text) > MAX_ANSWER_CHARS:
        return AnswerFailure(f"completion is {len(text)} characters, over {MAX_ANSWER_CHARS}")
    tags = [m.group(0) for m in _TAG.finditer(text)]
    if tags != ["<think>", "</think>", "<answer>", "</answer>"]:
        return AnswerFailure(f"tags are {tags[:8]}, not one <think> block then one <answer> block")
    think_open, think_close, answer_open, answer_close = (m.span() for m in _TAG.finditer(text))
    outside = (
        text[: think_open[0]] + text[think_close[1] : answer_open[0]] + text[answer_close[1] :]
    )
    if outside.strip():
        return AnswerFailure(f"text outside the blocks: {outside.strip()[:40]!r}")
    think = text[think_open[1] : think_close[0]].strip()
    body = text[answer_open[1] : answer_close[0]]
    try:
        obj = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return AnswerFailure(f"answer is not JSON: {body.strip()[:40]!r}")
    if not isinstance(obj, dict):
        return AnswerFailure(f"answer JSON is {type(obj).__name__}, not an object")
    if set(obj) != {"key_slice", "bbox_2d_list"}:
        return AnswerFailure(f"answer keys are {sorted(obj)[:6]}, not key_slice and bbox_2d_list")
    key_slice = _strict_int(obj["key_slice"])
    if key_slice is None or not 1 <= key_slice <= num_slices:
        return AnswerFailure(
            f"key_slice {obj['key_slice']!r:.40} is not an integer in 1..{num_slices}"
        )
    raw_boxes = obj["bbox_2d_list"]
    if not isinstance(raw_boxes, list):
        return AnswerFailure(f"bbox_2d_list is {type(raw_boxes).__name__}, not a list")
    boxes: list[Box] = []
    for raw in raw_boxes:
        box = _parse_box(raw, size, box_coords)
        if isinstance(box, str):
            return AnswerFailure(box)
        boxes.append(box)
    return ParsedAnswer(think=think, anchor=EvidenceAnchor(key_slice, tuple(boxes)))


def format_answer(
    anchor: EvidenceAnchor, think: str, size: int = SLICE_SIZE, box_coords: str = "pixels"
) -> str:
    """Write an anchor (pixel-edge boxes of a ``size`` slice) as the answer text the policy is
    trained to produce, its boxes in ``box_coords``."""
    if "<" in think and _TAG.search(think):
        raise ValueError(f"think text must not contain <think>/<answer> tags: {think[:60]!r}")
    check_box_coords(box_coords, size)
    boxes = [list(b) for b in anchor.boxes]
    if box_coords == "relative1000":
        boxes = [[to_relative1000(c, size) for c in b] for b in boxes]
    payload = {"key_slice": anchor.key_slice, "bbox_2d_list": boxes}
    return f"<think>{think}</think><answer>{json.dumps(payload)}</answer>"
