"""Qwen3-VL chat messages for a volume and a query, and the SFT target text for an anchor."""

from __future__ import annotations

import numpy as np
from PIL import Image

from data.answer import SLICE_SIZE, EvidenceAnchor, check_box_coords, format_answer

SYSTEM_PROMPT = (
    "You are a radiology assistant. You read a CT volume given as axial slices, each preceded by "
    "its tag <slice k>, and locate the structure a clinical query refers to."
)

ANSWER_INSTRUCTION = (
    "First reason inside <think></think>. Then give the evidence inside <answer></answer> as JSON: "
    '{{"key_slice": k, "bbox_2d_list": [[x1, y1, x2, y2], ...]}}, where k (1-{num_slices}) is the '
    "slice on which the target is most visible and each box, in pixels of that {size}x{size} "
    "slice, encloses one connected region of the target."
)
# data.box_coords relative1000: the same, boxes in Qwen3-VL's 0-1000 grounding coordinates.
ANSWER_INSTRUCTION_RELATIVE1000 = (
    "First reason inside <think></think>. Then give the evidence inside <answer></answer> as JSON: "
    '{{"key_slice": k, "bbox_2d_list": [[x1, y1, x2, y2], ...]}}, where k (1-{num_slices}) is the '
    "slice on which the target is most visible and each box, in 0-1000 coordinates of that slice "
    "(0 its left or top edge, 1000 its right or bottom edge), encloses one connected region of "
    "the target."
)
INSTRUCTIONS = {"pixels": ANSWER_INSTRUCTION, "relative1000": ANSWER_INSTRUCTION_RELATIVE1000}


def slice_images(slices: np.ndarray) -> list[Image.Image]:
    """The (S, H, W) uint8 slices as S RGB images (Qwen3-VL's processor expects RGB)."""
    if slices.ndim != 3 or slices.dtype != np.uint8:
        raise ValueError(f"slices must be (S, H, W) uint8, got {slices.shape} {slices.dtype}")
    return [Image.fromarray(np.ascontiguousarray(s)).convert("RGB") for s in slices]


def build_messages(slices: np.ndarray, query: str, box_coords: str = "pixels") -> list[dict]:
    """Chat messages in transformers' format: the answer-format instruction (boxes asked for in
    ``box_coords``, data.answer), then for k = 1..S the text ``<slice k>`` and slice k's image,
    then the query, last.

    The query comes last, right before the answer, so that the words the answer depends on are
    the nearest ones (measured on the tiny model: with the instruction after the query it named
    the wrong target more often). Images are PIL images under ``{"type": "image", "image":
    ...}``; ``processor.apply_chat_template`` renders them, and the rollout engine passes the
    same images to vLLM.
    """
    if not query or not query.strip():
        raise ValueError("query is empty")
    check_box_coords(box_coords, slices.shape[-1])
    instruction = INSTRUCTIONS[box_coords].format(num_slices=slices.shape[0], size=slices.shape[-1])
    content: list[dict] = [{"type": "text", "text": instruction}]
    for k, image in enumerate(slice_images(slices), start=1):
        content.append({"type": "text", "text": f"<slice {k}>"})
        content.append({"type": "image", "image": image})
    content.append({"type": "text", "text": f"Query: {query.strip()}"})
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
        {"role": "user", "content": content},
    ]


def sft_target_text(
    anchor: EvidenceAnchor, label: str, size: int = SLICE_SIZE, box_coords: str = "pixels"
) -> str:
    """The assistant turn the cold start teaches: short reasoning, then the anchor (pixel-edge
    boxes of a ``size`` slice) written in ``box_coords``."""
    regions = len(anchor.boxes)
    think = (
        f"The query refers to the {label}. It is most visible on slice {anchor.key_slice}, "
        f"where it forms {regions} connected region{'s' if regions != 1 else ''}."
    )
    return format_answer(anchor, think, size, box_coords)
