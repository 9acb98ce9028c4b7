"""Chat messages for a volume and the SFT target text."""

import numpy as np
import pytest

from data.answer import EvidenceAnchor, parse_answer
from data.prompts import build_messages, sft_target_text


def test_messages_instruct_then_tag_every_slice_before_its_image_then_ask_last():
    slices = np.zeros((64, 256, 256), np.uint8)
    messages = build_messages(slices, "Find the organ that secretes bile.")
    assert [m["role"] for m in messages] == ["system", "user"]
    content = messages[1]["content"]
    assert len(content) == 1 + 2 * 64 + 1
    assert "1-64" in content[0]["text"] and "256x256" in content[0]["text"]
    assert content[1] == {"type": "text", "text": "<slice 1>"}
    assert content[127]["text"] == "<slice 64>" and content[128]["type"] == "image"
    assert content[128]["image"].size == (256, 256) and content[128]["image"].mode == "RGB"
    # the query is the last thing before the answer
    assert content[-1] == {"type": "text", "text": "Query: Find the organ that secretes bile."}


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
