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


PIXEL_INSTRUCTION_64_256 = (
    "First reason inside <think></think>. Then give the evidence inside <answer></answer> as JSON: "
    '{"key_slice": k, "bbox_2d_list": [[x1, y1, x2, y2], ...]}, where k (1-64) is the slice on '
    "which the target is most visible and each box, in pixels of that 256x256 slice, encloses "
    "one connected region of the target."
)


def test_the_default_prompt_asks_for_pixels_as_it_always_did():
    slices = np.zeros((64, 256, 256), np.uint8)
    for messages in (build_messages(slices, "liver"), build_messages(slices, "liver", "pixels")):
        assert messages[1]["content"][0]["text"] == PIXEL_INSTRUCTION_64_256


def test_a_relative1000_prompt_asks_for_0_1000_coordinates():
    slices = np.zeros((8, 64, 64), np.uint8)
    text = build_messages(slices, "liver", "relative1000")[1]["content"][0]["text"]
    assert "in 0-1000 coordinates of that slice (0 its left or top edge, 1000 its right or " in text
    assert "(1-8)" in text and "pixels" not in text and "64x64" not in text
    with pytest.raises(ValueError, match="data.box_coords must be one of"):
        build_messages(slices, "liver", "percent")


def test_an_sft_target_in_relative1000_parses_back_to_its_anchor():
    anchor = EvidenceAnchor(17, ((10, 20, 40, 60), (100, 20, 130, 60)))
    text = sft_target_text(anchor, "kidney", 256, "relative1000")
    # 10 -> 39, 20 -> 78, 40 -> 156, 60 -> 234.375 -> 234, 100 -> 390.625 -> 391, 130 -> 508
    assert '"bbox_2d_list": [[39, 78, 156, 234], [391, 78, 508, 234]]' in text
    assert parse_answer(text, 64, 256, "relative1000").anchor == anchor
    assert sft_target_text(anchor, "kidney") == sft_target_text(anchor, "kidney", 256, "pixels")
    # tiny configs' slices: every anchor edge of a 32 px slice comes back
    small = EvidenceAnchor(2, ((0, 1, 31, 32), (3, 5, 7, 9)))
    text = sft_target_text(small, "liver", 32, "relative1000")
    assert parse_answer(text, 4, 32, "relative1000").anchor == small
