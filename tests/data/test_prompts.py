"""Chat messages for a volume and the SFT target text."""

import numpy as np
import pytest

from data.answer import EvidenceAnchor, parse_answer
from data.prompts import build_messages, sft_target_text


def test_messages_tag_every_slice_before_its_image_then_ask():
    slices = np.zeros((64, 256, 256), np.uint8)
    messages = build_messages(slices, "Find the organ that secretes bile.")
    assert [m["role"] for m in messages] == ["system", "user"]
    content = messages[1]["content"]
    assert len(content) == 2 * 64 + 1
    assert content[0] == {"type": "text", "text": "<slice 1>"}
    assert content[126]["text"] == "<slice 64>" and content[127]["type"] == "image"
    assert content[127]["image"].size == (256, 256) and content[127]["image"].mode == "RGB"
    assert content[-1]["text"].startswith("Query: Find the organ that secretes bile.")
    assert "1-64" in content[-1]["text"] and "256x256" in content[-1]["text"]


def test_empty_query_and_wrong_slices_are_rejected():
    with pytest.raises(ValueError, match="query is empty"):
        build_messages(np.zeros((2, 8, 8), np.uint8), "  ")
    with pytest.raises(ValueError, match="uint8"):
        build_messages(np.zeros((2, 8, 8), np.float32), "liver")


def test_sft_target_parses_back_to_its_anchor():
    anchor = EvidenceAnchor(17, ((10, 20, 40, 60), (100, 20, 130, 60)))
    text = sft_target_text(anchor, "kidney")
    assert parse_answer(text).anchor == anchor
    assert "2 connected regions" in text
