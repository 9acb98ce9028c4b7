"""Qwen3-VL chat messages for a volume and a query, and the SFT target text for an anchor."""

from __future__ import annotations

import numpy as np
from PIL import Image

from data.answer import EvidenceAnchor, format_answer

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


def slice_images(slices: np.ndarray) -> list[Image.Image]:
    """The (S, H, W) uint8 slices as S RGB images (Qwen3-VL's processor expects RGB)."""
    if slices.ndim != 3 or slices.dtype != np.uint8:
        raise ValueError(f"slices must be (S, H, W) uint8, got {slices.shape} {slices.dtype}")
    return [Image.fromarray(np.ascontiguousarray(s)).convert("RGB") for s in slices]


def build_messages(slices: np.ndarray, query: str) -> list[dict]:
    """Chat messages in transformers' format: the answer-format instruction, then for k = 1..S
    the text ``<slice k>`` and slice k's image, then the query, last.

    The query comes last, right before the answer, so that the words the answer depends on are
    the nearest ones (measured on the tiny model: with the instruction after the query it named
    the wrong target more often). Images are PIL images under ``{"type": "image", "image":
    ...}``; ``processor.apply_chat_template`` renders them, and the rollout engine passes the
    same images to vLLM.
    """
    if not query or not query.strip():
        raise ValueError("query is empty")
    instruction = ANSWER_INSTRUCTION.format(num_slices=slices.shape[0], size=slices.shape[-1])
    content: list[dict] = [{"type": "text", "text": instruction}]
    for k, image in enumerate(slice_images(slices), start=1):
        content.append({"type": "text", "text": f"<slice {k}>"})
        content.append({"type": "image", "image": image})
    content.append({"type": "text", "text": f"Query: {query.strip()}"})
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
        {"role": "user", "content": content},
    ]


def sft_target_text(anchor: EvidenceAnchor, label: str) -> str:
    """The assistant turn the cold start teaches: short reasoning, then the anchor."""
    regions = len(anchor.boxes)
    think = (
        f"The query refers to the {label}. It is most visible on slice {anchor.key_slice}, "
        f"where it forms {regions} connected region{'s' if regions != 1 else ''}."
    )
    return format_answer(anchor, think)
