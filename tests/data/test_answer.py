"""The answer parser: valid answers, every kind of malformed answer, and that it never raises."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from data.answer import AnswerFailure, EvidenceAnchor, ParsedAnswer, format_answer, parse_answer


def answer(payload, think="the liver is largest on slice 12") -> str:
    body = payload if isinstance(payload, str) else json.dumps(payload)
    return f"<think>{think}</think><answer>{body}</answer>"


def test_valid_answer_parses_to_anchor():
    got = parse_answer(
        answer({"key_slice": 12, "bbox_2d_list": [[10, 20, 30, 40], [0, 0, 256, 256]]})
    )
    assert got == ParsedAnswer(
        think="the liver is largest on slice 12",
        anchor=EvidenceAnchor(12, ((10, 20, 30, 40), (0, 0, 256, 256))),
    )


def test_whitespace_around_blocks_is_allowed_and_empty_box_list_is_well_formed():
    got = parse_answer(
        '  \n<think>x</think>\n<answer> {"key_slice": 1, "bbox_2d_list": []} </answer>\n'
    )
    assert isinstance(got, ParsedAnswer) and got.anchor == EvidenceAnchor(1, ())


def test_round_trip_through_format_answer():
    anchor = EvidenceAnchor(64, ((1, 2, 3, 4),))
    assert parse_answer(format_answer(anchor, "why")).anchor == anchor


def reason(text: str) -> str:
    got = parse_answer(text)
    assert isinstance(got, AnswerFailure), got
    return got.reason


def test_missing_tags():
    assert "not one <think> block" in reason('{"key_slice": 1, "bbox_2d_list": []}')
    assert "not one <think> block" in reason('<think>x</think>{"key_slice": 1, "bbox_2d_list": []}')
    assert "not one <think> block" in reason(
        '<answer>{"key_slice": 1, "bbox_2d_list": []}</answer>'
    )
    assert "not one <think> block" in reason('<think>x<answer>{"key_slice": 1}</answer>')


def test_nested_repeated_and_reversed_blocks_are_malformed():
    ok = '{"key_slice": 1, "bbox_2d_list": []}'
    assert "tags are" in reason(f"<think><think>x</think></think><answer>{ok}</answer>")
    assert "tags are" in reason(f"<think>x</think><answer>{ok}</answer><answer>{ok}</answer>")
    assert "tags are" in reason(f"<answer>{ok}</answer><think>x</think>")
    assert "tags are" in reason(f"<think>x<answer>{ok}</answer></think>")


def test_extra_text_outside_blocks():
    assert "text outside" in reason(answer({"key_slice": 1, "bbox_2d_list": []}) + " done")
    assert "text outside" in reason("Sure! " + answer({"key_slice": 1, "bbox_2d_list": []}))


def test_bad_json_and_wrong_shapes():
    assert "not JSON" in reason(answer("{key_slice: 1}"))
    assert "not an object" in reason(answer([1, 2]))
    assert "keys" in reason(answer({"key_slice": 1}))
    assert "keys" in reason(answer({"key_slice": 1, "bbox_2d_list": [], "extra": 0}))
    assert "not a list" in reason(answer({"key_slice": 1, "bbox_2d_list": "[[1,2,3,4]]"}))


def test_key_slice_out_of_range_or_not_an_integer():
    for bad in (0, 65, -3, 3.0, "3", True, None, 10**30):
        assert "key_slice" in reason(answer({"key_slice": bad, "bbox_2d_list": []})), bad
    assert isinstance(parse_answer(answer('{"key_slice": NaN, "bbox_2d_list": []}')), AnswerFailure)


def test_inverted_negative_out_of_bounds_and_non_integer_boxes():
    for box in (
        [30, 20, 10, 40],
        [10, 40, 30, 20],
        [10, 20, 10, 40],
        [-1, 0, 5, 5],
        [0, 0, 257, 10],
        [0, 0, 10, 257],
    ):
        assert "0 <= x1 < x2" in reason(answer({"key_slice": 5, "bbox_2d_list": [box]})), box
    for box in ([1.5, 0, 5, 5], [1, 2, 3], [1, 2, 3, 4, 5], ["1", 2, 3, 4], [True, 2, 3, 4], 7):
        got = parse_answer(answer({"key_slice": 5, "bbox_2d_list": [box]}))
        assert isinstance(got, AnswerFailure), box
    assert isinstance(
        parse_answer(answer('{"key_slice": 5, "bbox_2d_list": [[1, 2, 3, 1e999]]}')), AnswerFailure
    )


def test_huge_output_and_non_text_are_failures():
    assert "over" in reason("<think>" + "a" * 100_000 + "</think><answer>{}</answer>")
    assert isinstance(parse_answer(None), AnswerFailure)
    assert isinstance(parse_answer(b"<think></think>"), AnswerFailure)
    deep = "[" * 50_000 + "]" * 50_000
    assert isinstance(parse_answer(f"<think>x</think><answer>{deep}</answer>"), AnswerFailure)


def test_parser_respects_configured_frame():
    text = answer({"key_slice": 8, "bbox_2d_list": [[0, 0, 64, 64]]})
    assert isinstance(parse_answer(text, num_slices=8, size=64), ParsedAnswer)
    assert isinstance(parse_answer(text, num_slices=7, size=64), AnswerFailure)
    assert isinstance(parse_answer(text, num_slices=8, size=63), AnswerFailure)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_parser_never_raises_on_any_text(text):
    assert isinstance(parse_answer(text), ParsedAnswer | AnswerFailure)


@settings(max_examples=300, deadline=None)
@given(json_values, st.sampled_from(["", "x", "<think>", "</answer>"]))
def test_parser_never_raises_on_any_json_payload(payload, think):
    text = f"<think>{think}</think><answer>{json.dumps(payload)}</answer>"
    got = parse_answer(text)
    assert isinstance(got, ParsedAnswer | AnswerFailure)
    if isinstance(got, ParsedAnswer):
        assert 1 <= got.anchor.key_slice <= 64
        assert all(0 <= b[0] < b[2] <= 256 and 0 <= b[1] < b[3] <= 256 for b in got.anchor.boxes)


# --- data.box_coords relative1000: Qwen3-VL's 0-1000 grounding coordinates


def test_a_relative1000_answer_parses_to_pixel_edges():
    # 256 px slice: p = round(r * 256 / 1000): 39 -> 9.984 -> 10, 78 -> 19.968 -> 20,
    # 117 -> 29.952 -> 30, 156 -> 39.936 -> 40; 1000 -> 256 (the right and bottom edges)
    text = answer({"key_slice": 12, "bbox_2d_list": [[39, 78, 117, 156], [0, 0, 1000, 1000]]})
    got = parse_answer(text, 64, 256, "relative1000")
    assert got.anchor == EvidenceAnchor(12, ((10, 20, 30, 40), (0, 0, 256, 256)))
    # 64 px slice: 500 -> 32, 250 -> 16, 8 -> 0.512 -> 1 (half up), 7 -> 0.448 -> 0
    text = answer({"key_slice": 3, "bbox_2d_list": [[7, 8, 250, 500]]})
    assert parse_answer(text, 8, 64, "relative1000").anchor == EvidenceAnchor(3, ((0, 1, 16, 32),))
    # the same text read as pixels of the 64 slice is over its edge
    assert parse_answer(text, 8, 64).reason == (
        "box [7, 8, 250, 500] is not 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64"
    )


def test_relative1000_values_over_1000_and_boxes_that_collapse_are_malformed():
    over = parse_answer(
        answer({"key_slice": 1, "bbox_2d_list": [[0, 0, 1001, 10]]}), 64, 256, "relative1000"
    )
    assert over == AnswerFailure(
        "box [0, 0, 1001, 10] has a coordinate outside 0..1000 (relative1000)"
    )
    negative = parse_answer(
        answer({"key_slice": 1, "bbox_2d_list": [[-1, 0, 10, 10]]}), 64, 256, "relative1000"
    )
    assert negative.reason == "box [-1, 0, 10, 10] has a coordinate outside 0..1000 (relative1000)"
    # 10 -> 2.56 -> 3 and 11 -> 2.816 -> 3: x1 == x2 once in pixels of a 256 slice
    collapsed = parse_answer(
        answer({"key_slice": 1, "bbox_2d_list": [[10, 0, 11, 8]]}), 64, 256, "relative1000"
    )
    assert collapsed == AnswerFailure(
        "box [10, 0, 11, 8] (relative1000) is [3, 0, 3, 2] in pixels of the 256x256 slice, "
        "not x1 < x2 and y1 < y2"
    )
    reversed_box = parse_answer(
        answer({"key_slice": 1, "bbox_2d_list": [[500, 0, 400, 8]]}), 64, 256, "relative1000"
    )
    assert "is [128, 0, 102, 2] in pixels" in reversed_box.reason
    # 300 is a fine relative coordinate but over a 256 slice's edge in pixels
    text = answer({"key_slice": 1, "bbox_2d_list": [[0, 0, 300, 300]]})
    assert isinstance(parse_answer(text, 64, 256, "relative1000"), ParsedAnswer)
    assert isinstance(parse_answer(text, 64, 256), AnswerFailure)


def test_pixels_to_relative1000_and_back_is_exact_for_every_edge():
    from data.answer import from_relative1000, to_relative1000

    assert [to_relative1000(p, 256) for p in (0, 1, 10, 128, 255, 256)] == [
        0,
        4,
        39,
        500,
        996,
        1000,
    ]
    assert [to_relative1000(p, 64) for p in (0, 1, 2, 63, 64)] == [0, 16, 31, 984, 1000]
    assert [to_relative1000(p, 32) for p in (0, 1, 3, 31, 32)] == [0, 31, 94, 969, 1000]
    for size in (256, 64, 32, 96, 128, 512, 1000, 7):
        for p in range(size + 1):
            assert from_relative1000(to_relative1000(p, size), size) == p, (size, p)


def test_a_written_relative1000_answer_parses_back_to_its_anchor():
    anchor = EvidenceAnchor(5, ((10, 20, 30, 40), (0, 1, 255, 256)))
    text = format_answer(anchor, "t", 256, "relative1000")
    assert text == (
        '<think>t</think><answer>{"key_slice": 5, "bbox_2d_list": '
        "[[39, 78, 117, 156], [0, 4, 996, 1000]]}</answer>"
    )
    assert parse_answer(text, 64, 256, "relative1000").anchor == anchor
    # the default writes pixels, as before
    assert format_answer(anchor, "t") == (
        '<think>t</think><answer>{"key_slice": 5, "bbox_2d_list": '
        "[[10, 20, 30, 40], [0, 1, 255, 256]]}</answer>"
    )


def test_an_unknown_box_frame_or_a_slice_over_1000_px_is_refused():
    import pytest

    with pytest.raises(ValueError, match="data.box_coords must be one of .* got 'relative'"):
        parse_answer("x", 64, 256, "relative")
    with pytest.raises(ValueError, match="data.box_coords relative1000: data.slice_size 1024"):
        format_answer(EvidenceAnchor(1, ()), "t", 1024, "relative1000")
