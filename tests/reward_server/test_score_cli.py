"""`python -m reward_server.score`: a completions file in, reward lines out in input order."""

import json

import pytest

from data.answer import format_answer
from reward_server.score import CompletionsError, main


def write_lines(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_scores_a_file_in_input_order(phantom_manifest, dataset, true_anchor, tmp_path, capsys):
    _, liver = dataset.by_id("ctorg_0000/liver")
    good = format_answer(true_anchor(liver), "largest liver slice")
    rows = [
        {"id": "ctorg_0000/liver", "completion": good},
        {"id": "ctorg_0000/kidney", "completion": "I do not know"},
        {"id": "ctorg_0000/liver", "completion": 42},
        {"id": "ctorg_0000/liver", "completion": good},
    ]
    out = tmp_path / "scores.jsonl"
    code = main(
        [
            "--manifest",
            str(phantom_manifest),
            "--completions",
            str(write_lines(tmp_path / "c.jsonl", rows)),
            "--out-file",
            str(out),
            "--workers",
            "0",
            "data.num_slices=32",
            "data.slice_size=128",
            f"data.cache_dir={dataset.cfg.cache_dir}",
        ]
    )
    assert code == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [s["id"] for s in scored] == [r["id"] for r in rows]
    assert set(scored[0]) == {"id", "format", "axial", "spatial", "consistency", "total"}
    assert scored[0]["format"] == 1.0 and scored[0]["axial"] == 1.0 and scored[0]["total"] > 3.5
    assert scored[1]["total"] == 0.0 and "failure" in scored[1]
    assert scored[2]["total"] == 0.0
    assert scored[3] == scored[0]
    assert "scored 4 completions" in capsys.readouterr().out


def test_unknown_ids_and_bad_lines_name_the_line(phantom_manifest, tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    bad = write_lines(tmp_path / "c.jsonl", [{"id": "nope", "completion": ""}])
    args = ["--manifest", str(phantom_manifest), "--out-file", str(out), "--workers", "0"]
    with pytest.raises(
        CompletionsError, match=r"c.jsonl, line 1: id 'nope' is not in the manifest"
    ):
        main.__wrapped__([*args, "--completions", str(bad)])
    (tmp_path / "d.jsonl").write_text('{"completion": "x"}\n')
    assert main([*args, "--completions", str(tmp_path / "d.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "error: " + str(tmp_path / "d.jsonl") + ", line 1: needs a string field 'id'"
    ]
    assert not out.exists()
