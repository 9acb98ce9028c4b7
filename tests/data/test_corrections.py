"""Reviewers' corrections as SFT targets: the file in pixels, the target in data.box_coords."""

from data.answer import EvidenceAnchor, format_answer, parse_answer
from data.corrections import correction_text, parse_correction


def row(answer: str | None) -> dict:
    out = {"sample_id": "ctorg_0000/liver", "query": "the liver", "key_slice": 3}
    out["bbox_2d_list"] = [[8, 16, 24, 32]]
    out["num_slices"], out["slice_size"] = 8, 64
    if answer is not None:
        out["answer"] = answer
    return out


def test_a_correction_in_pixels_is_written_in_the_training_box_frame():
    anchor = EvidenceAnchor(3, ((8, 16, 24, 32),))
    correction = parse_correction(row(format_answer(anchor, "seen")), "c.jsonl, line 1", 8, 64)
    assert correction.anchor == anchor and correction.think == "seen"
    # 64 px slice: 8 -> 125, 16 -> 250, 24 -> 375, 32 -> 500
    text = correction_text(correction, "cold", 64, "relative1000")
    assert text == (
        '<think>seen</think><answer>{"key_slice": 3, "bbox_2d_list": [[125, 250, 375, 500]]}'
        "</answer>"
    )
    assert parse_answer(text, 8, 64, "relative1000").anchor == anchor
    assert correction_text(correction, "cold") == format_answer(anchor, "seen")
    # a row without answer text keeps the cold start's target as given
    bare = parse_correction(row(None), "c.jsonl, line 2", 8, 64)
    assert correction_text(bare, "cold", 64, "relative1000") == "cold"
