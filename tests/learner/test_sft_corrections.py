"""learner.sft --corrections: a reviewer's corrected anchor is the SFT target of its case, with
its query; malformed rows and unknown cases stop with the file, line and field."""

import json

import numpy as np
import pytest

from common.config import DataConfig
from data.answer import EvidenceAnchor, format_answer, parse_answer
from data.corrections import CorrectionError, read_corrections
from data.dataset import VolumeDataset
from data.prompts import sft_target_text
from learner.sft import sft_example, sft_examples, training_corrections

SLICES, SIZE = 8, 32
CFG = DataConfig(num_slices=SLICES, slice_size=SIZE)
ANCHOR = EvidenceAnchor(3, ((2, 4, 10, 12), (14, 15, 20, 30)))
THINK = "The gallbladder sits under the liver; slice 3 shows it best."


@pytest.fixture(scope="module")
def dataset(phantom_manifest):
    return VolumeDataset(phantom_manifest, CFG, split="train")


def review_row(sample_id, **changes):
    """A row as evaluation.review's Accept appends it to corrections.jsonl."""
    row = {
        "number": 1,
        "case": f"scan/{sample_id}",
        "query": "where is the organ under the liver?",
        "image": "/data/scan.nii.gz",
        "row": None,
        "sample_id": sample_id,
        "key_slice": ANCHOR.key_slice,
        "bbox_2d_list": [list(b) for b in ANCHOR.boxes],
        "answer": format_answer(ANCHOR, THINK),
        "original_answer": format_answer(EvidenceAnchor(6, ((1, 1, 5, 5),)), "slice 6"),
        "original_anchor": {"key_slice": 6, "bbox_2d_list": [[1, 1, 5, 5]]},
        "key_slice_source": 14,
        "boxes_source": [[6.0, 12.0, 30.0, 36.0], [42.0, 45.0, 60.0, 90.0]],
        "num_slices": SLICES,
        "slice_size": SIZE,
        "propagator": "baseline",
        "dsc": 0.8,
        "original_dsc": 0.1,
        "reviewed_at": "2026-01-01T00:00:00+00:00",
        "mask": "corrections/1/mask.nii.gz",
        "mask_voxels": 120,
        "volume_mm3": 540.0,
        "segmentation": None,
    }
    row.update(changes)
    return row


def write(path, *rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def query_of(messages):
    return messages[-1]["content"][-1]["text"]


def test_a_corrected_case_is_trained_on_the_corrected_anchor_and_query(dataset, tmp_path):
    corrected, other = dataset.samples[0].id, dataset.samples[1].id
    rows = write(tmp_path / "corrections.jsonl", review_row(corrected))
    corrections, valid = training_corrections(dataset, [rows], [0, 1])
    assert set(corrections) == {corrected} and valid == [0, 1]
    (messages, text), (other_messages, other_text) = sft_examples(
        dataset, [0, 1], 1, seed=0, epoch=0, corrections=corrections
    )
    # the corrected answer, written by data.answer's formatter, with the reviewer's reasoning
    assert text == format_answer(ANCHOR, THINK)
    assert parse_answer(text, SLICES, SIZE).anchor == ANCHOR
    assert query_of(messages) == "Query: where is the organ under the liver?"
    # the other case keeps its automatic Top-K target and its own query
    rng = np.random.default_rng([0, 0])
    expected_messages, expected = sft_example(dataset, 1, 1, rng)
    assert other_text == expected and query_of(other_messages) == query_of(expected_messages)
    assert query_of(other_messages) == f"Query: {dataset.samples[1].query}"
    assert other not in corrections


def test_a_row_without_answer_text_takes_the_cold_start_reasoning(dataset, tmp_path):
    row = review_row(dataset.samples[0].id)
    del row["answer"]
    corrections = read_corrections(
        [write(tmp_path / "c.jsonl", row)], SLICES, SIZE, {dataset.samples[0].id}
    )
    _, text = sft_example(dataset, 0, 1, np.random.default_rng(0), False, corrections.popitem()[1])
    assert text == sft_target_text(ANCHOR, dataset.samples[0].label)


def test_the_last_row_of_a_case_counts_across_files(dataset, tmp_path):
    sample_id = dataset.samples[0].id
    later = EvidenceAnchor(5, ((1, 2, 3, 4),))
    first = write(tmp_path / "a.jsonl", review_row(sample_id))
    second = write(
        tmp_path / "b.jsonl",
        review_row(
            sample_id,
            key_slice=5,
            bbox_2d_list=[[1, 2, 3, 4]],
            answer=format_answer(later, "slice 5"),
        ),
    )
    found = read_corrections([first, second], SLICES, SIZE, {sample_id})
    assert found[sample_id].anchor == later and found[sample_id].where == f"{second}, line 1"


def test_a_corrected_sample_without_its_own_anchor_is_trained(dataset, tmp_path):
    rows = write(tmp_path / "c.jsonl", review_row(dataset.samples[1].id))
    _, valid = training_corrections(dataset, [rows], [0])  # as if sample 1 anchored nothing
    assert valid == [0, 1]


@pytest.mark.parametrize(
    "change, field",
    [
        ({"sample_id": "no-such-case"}, "field 'sample_id' 'no-such-case' is not a case of"),
        ({"sample_id": None}, "field 'sample_id' is null"),
        ({"query": ""}, "field 'query' is ''"),
        ({"key_slice": SLICES + 1}, "field 'key_slice' 9: key_slice 9 is not an integer in 1..8"),
        ({"key_slice": "3"}, "field 'key_slice'"),
        ({"bbox_2d_list": [[5, 5, 2, 9]]}, "field 'bbox_2d_list'"),
        ({"bbox_2d_list": [[0, 0, 4, SIZE + 1]]}, "field 'bbox_2d_list'"),
        ({"num_slices": 64}, "field 'num_slices' is 64, but training runs with data.num_slices 8"),
        ({"slice_size": 256}, "field 'slice_size' is 256"),
        ({"answer": "no tags"}, "field 'answer' does not parse"),
        ({"answer": format_answer(EvidenceAnchor(4, ()), "x")}, "field 'answer' holds key slice 4"),
    ],
)
def test_a_bad_row_names_the_file_line_and_field(dataset, tmp_path, change, field):
    good = review_row(dataset.samples[0].id)
    bad = {**review_row(dataset.samples[1].id), **change}
    rows = write(tmp_path / "corrections.jsonl", "", good, bad)
    with pytest.raises(CorrectionError) as err:
        training_corrections(dataset, [rows], [0, 1])
    assert str(err.value).startswith(f"{rows}, line 3: ")
    assert field in str(err.value)


def test_a_row_missing_a_field_or_not_json_is_named(dataset, tmp_path):
    row = review_row(dataset.samples[0].id)
    del row["bbox_2d_list"]
    ids = {dataset.samples[0].id}
    with pytest.raises(CorrectionError, match=r"c.jsonl, line 1: field 'bbox_2d_list' missing"):
        read_corrections([write(tmp_path / "c.jsonl", row)], SLICES, SIZE, ids)
    with pytest.raises(CorrectionError, match=r"d.jsonl, line 1: not JSON"):
        read_corrections([write(tmp_path / "d.jsonl", "{broken")], SLICES, SIZE, ids)
    with pytest.raises(CorrectionError, match=r"e.jsonl, line 1: a JSON list, not an object"):
        read_corrections([write(tmp_path / "e.jsonl", "[1]")], SLICES, SIZE, ids)


def test_the_command_line_stops_on_a_bad_row_before_training(phantom_manifest, tmp_path, capsys):
    from learner.sft import main

    rows = write(tmp_path / "corrections.jsonl", review_row("not-in-training"))
    argv = ["--corrections", str(rows), f"data.manifest={phantom_manifest}"]
    argv += [f"data.num_slices={SLICES}", f"data.slice_size={SIZE}", "data.cache_dir=null"]
    argv += [f"output_dir={tmp_path / 'run'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: {rows}, line 1: field 'sample_id' 'not-in-training' is not a case of" in err
    assert "the training split of" in err
    assert main(["--corrections", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
