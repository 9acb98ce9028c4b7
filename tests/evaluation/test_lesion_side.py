"""evaluation.lesion_side: which kidney an answer boxes for the lesion-named kidney queries, on
phantoms (true anchors, their mirror images across the midline, and malformed answers)."""

import json

import pytest

from common.cli import UsageError
from evaluation.lesion_side import answer_side, lesion_side, main
from evaluation.stats import wilson


def test_boxes_are_put_on_a_side_of_the_midline():
    assert answer_side([(20, 5, 40, 30)], target_x=30.0, midline=48) == "target side"
    assert answer_side([(60, 5, 80, 30)], target_x=30.0, midline=48) == "other side"
    assert answer_side([(60, 5, 80, 30)], target_x=70.0, midline=48) == "target side"
    assert answer_side([(40, 5, 60, 30)], target_x=30.0, midline=48) == "both sides"  # across
    assert answer_side([(20, 5, 40, 30), (60, 5, 80, 30)], 30.0, 48) == "both sides"
    assert answer_side([(10, 5, 20, 9), (22, 5, 30, 9)], 30.0, 48) == "target side"
    assert answer_side([], target_x=30.0, midline=48) == "none"


@pytest.fixture(scope="module")
def lesion_cases(oracle_records, tmp_path_factory):
    """cases.jsonl rows over every sample: the oracle's anchors, the same boxes mirrored across
    the slice's middle column, and malformed answers."""
    cfg, overrides, samples, oracle = oracle_records
    records = (
        oracle
        + [
            dict(r, row="mirrored", boxes=[[96 - b[2], b[1], 96 - b[0], b[3]] for b in r["boxes"]])
            for r in oracle
        ]
        + [dict(r, row="broken", key_slice=None, boxes=[]) for r in oracle]
    )
    lesion_ids = [s.id for s, _ in samples if s.label in ("tumour kidney", "cyst kidney")]
    path = tmp_path_factory.mktemp("side") / "cases.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return cfg, path, overrides, records, lesion_ids


def test_true_anchors_are_on_the_target_side_and_their_mirror_images_on_the_other(lesion_cases):
    cfg, path, _, _, lesion_ids = lesion_cases
    n = len(lesion_ids)
    assert n >= 1  # the KiTS23-like phantom always has a tumour
    lines = {line["row"]: line for line in lesion_side(cfg, path)}
    assert lines["oracle"]["target side"] == n and lines["oracle"]["share"] == 1.0
    assert lines["mirrored"]["other side"] == n and lines["mirrored"]["share"] == 0.0
    assert lines["broken"]["none"] == n and lines["broken"]["ci"] == (0.0, 1.0)
    assert lines["oracle"]["ci"] == pytest.approx(wilson(n, n))
    for line in lines.values():  # only the lesion-kidney cases are counted
        assert sum(line[s] for s in ("target side", "other side", "both sides", "none")) == n


def test_a_missing_row_or_no_lesion_kidney_case_is_refused_by_name(lesion_cases, tmp_path, capsys):
    cfg, path, overrides, records, lesion_ids = lesion_cases
    with pytest.raises(UsageError, match=r"cases.jsonl: no row 'SFT'; it holds \['oracle', "):
        lesion_side(cfg, path, rows=["SFT"])
    organs = tmp_path / "organs.jsonl"
    organs.write_text("".join(json.dumps(r) + "\n" for r in records if r["id"] not in lesion_ids))
    assert main(["--config", "configs/tiny.yaml", "--cases-file", str(organs), *overrides]) == 2
    assert "organs.jsonl: no tumour kidney or cyst kidney case" in capsys.readouterr().err
