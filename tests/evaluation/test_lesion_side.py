"""evaluation.lesion_side: which kidney an answer boxes for the lesion-named kidney queries, on
phantoms (true anchors, their mirror images across the midline, and malformed answers)."""

import json

import pytest

from data.cli import UsageError
from evaluation.lesion_side import answer_side, lesion_side, main, wilson


def test_boxes_are_put_on_a_side_of_the_midline():
    assert answer_side([(20, 5, 40, 30)], target_x=30.0, midline=48) == "target side"
    assert answer_side([(60, 5, 80, 30)], target_x=30.0, midline=48) == "other side"
    assert answer_side([(60, 5, 80, 30)], target_x=70.0, midline=48) == "target side"
    assert answer_side([(40, 5, 60, 30)], target_x=30.0, midline=48) == "both sides"  # across
    assert answer_side([(20, 5, 40, 30), (60, 5, 80, 30)], 30.0, 48) == "both sides"
    assert answer_side([(10, 5, 20, 9), (22, 5, 30, 9)], 30.0, 48) == "target side"
    assert answer_side([], target_x=30.0, midline=48) == "none"


def test_wilson_interval_by_hand():
    # 5 of 10: centre (0.5 + 1.96^2/20) / (1 + 1.96^2/10) = 0.5; half-width 0.2634
    low, high = wilson(5, 10)
    assert (low, high) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    low, high = wilson(10, 10)
    assert high == 1.0 and low == pytest.approx(0.7225, abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)


@pytest.fixture(scope="module")
def lesion_cases(phantom_manifest, tmp_path_factory):
    """cases.jsonl rows over every sample: the oracle's anchors, the same boxes mirrored across
    the slice's middle column, and malformed answers."""
    from cluster.config import load_run_config
    from data.dataset import VolumeDataset
    from evaluation.evaluate import CaseScorer, oracle_jobs

    overrides = [
        f"data.manifest={phantom_manifest}",
        "data.cache_dir=null",
        "data.num_slices=16",
        "data.slice_size=96",
    ]
    cfg = load_run_config("configs/tiny.yaml", overrides)
    dataset = VolumeDataset(cfg.data.manifest, cfg.data)
    samples = [dataset[i] for i in range(len(dataset))]
    scorer = CaseScorer(cfg.data.manifest, cfg.data, cfg.reward, "baseline")
    records = [scorer.score(job) for job in oracle_jobs("oracle", samples, cfg.data.min_box_area)]
    records += [
        dict(r, row="mirrored", boxes=[[96 - b[2], b[1], 96 - b[0], b[3]] for b in r["boxes"]])
        for r in records
    ] + [dict(r, row="broken", key_slice=None, boxes=[]) for r in records]
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


def test_a_missing_row_or_no_lesion_kidney_case_is_refused_by_name(lesion_cases, tmp_path):
    cfg, path, overrides, records, lesion_ids = lesion_cases
    with pytest.raises(UsageError, match=r"cases.jsonl: no row 'SFT'; it holds \['oracle', "):
        lesion_side(cfg, path, rows=["SFT"])
    organs = tmp_path / "organs.jsonl"
    organs.write_text("".join(json.dumps(r) + "\n" for r in records if r["id"] not in lesion_ids))
    with pytest.raises(UsageError, match="organs.jsonl: no tumour kidney or cyst kidney case"):
        main(["--config", "configs/tiny.yaml", "--cases", str(organs), *overrides])
