"""evaluation.anchor_slack: an evaluation's anchors re-scored with grown or shrunk boxes and on
other slices, on phantoms with the baseline propagator."""

import json

import numpy as np
import pytest

from common.cli import UsageError
from evaluation.anchor_slack import anchor_slack, grown, main


def test_boxes_grow_and_shrink_inside_the_slice_and_keep_a_pixel():
    assert grown([(10, 20, 30, 40)], 2, 96) == ((8, 18, 32, 42),)
    assert grown([(1, 0, 94, 96)], 3, 96) == ((0, 0, 96, 96),)  # clipped to the slice
    assert grown([(10, 20, 30, 40)], -3, 96) == ((13, 23, 27, 37),)
    assert grown([(10, 10, 12, 13)], -3, 96) == ((11, 11, 12, 12),)  # at least 1 x 1


@pytest.fixture(scope="module")
def oracle_cases(oracle_records, tmp_path_factory):
    """cases.jsonl as the evaluation writes it: the oracle row of every case and a row of
    malformed answers."""
    cfg, overrides, _, oracle = oracle_records
    records = oracle + [dict(r, row="broken", dsc=0.0, key_slice=None, boxes=[]) for r in oracle]
    path = tmp_path_factory.mktemp("slack") / "cases.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return cfg, path, overrides, records


def test_anchors_as_answered_give_the_table_and_the_largest_slice_is_the_oracle(oracle_cases):
    from evaluation.stats import suite_mean

    cfg, path, _, records = oracle_cases
    lines = anchor_slack(cfg, path, pads=(-2, 8), slices=2, progress=False)
    got = {(line["row"], line["anchor"]): line["dsc"] for line in lines}
    by_suite = {}
    for r in records:
        if r["row"] == "oracle":
            by_suite.setdefault(r["suite"], []).append(r["dsc"])
    table = 100 * suite_mean(by_suite)
    assert table > 50  # organs of phantoms from their true anchors
    assert got[("oracle", "as answered")] == pytest.approx(table, abs=1e-9)
    assert got[("true anchor", "slice 1 by area")] == pytest.approx(table, abs=1e-9)
    # tight true boxes suit the region grower: 8 px more lets it leak into neighbours
    assert got[("oracle", "boxes grown by 8 px")] < table - 1
    assert got[("oracle", "boxes shrunk by 2 px")] != pytest.approx(table, abs=1e-6)
    best = got[("true anchor", "best of the 2 per case")]
    assert best >= max(table, got[("true anchor", "slice 2 by area")]) - 1e-9
    assert all(got[("broken", a)] == 0.0 for a in ("as answered", "boxes grown by 8 px"))
    assert np.isfinite(list(got.values())).all() and len(lines) == 3 + 3 + 3


def test_a_missing_row_or_pad_zero_is_refused_by_name(oracle_cases, capsys):
    cfg, path, overrides, _ = oracle_cases
    with pytest.raises(
        UsageError, match=r"cases.jsonl: no row 'SFT'; it holds \['oracle', 'broken'\]"
    ):
        anchor_slack(cfg, path, rows=["SFT"], progress=False)
    argv = ["--config", "configs/tiny.yaml", "--cases-file", str(path), "--pad", "0"]
    assert main([*argv, *overrides]) == 2
    assert capsys.readouterr().err.startswith("error: --pad 0: ")
