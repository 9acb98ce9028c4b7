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
