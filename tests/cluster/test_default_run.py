"""The default run's bar, checked on hand-made evaluation rows: each check reads its rows by name
and says yes or NO as computed by hand; the learning figure draws both splits."""

import json

import pytest

from cluster.default_run import EQUAL, ORACLE, bar_checks, learning_figure, read_split, split_counts
from evaluation.evaluate import PHRASING_SUFFIX as H
from evaluation.evaluate import compare

# Ten targets: five scans of two targets, in two suites; every row scores each target the same.
IDS = [(f"s{i}/t{j}", "ctorg" if i < 3 else "kits23") for i in range(5) for j in range(2)]
SCORES = {
    ORACLE: 0.6,
    "SFT": 0.3,  # 0.5 of the oracle: a usable cold start
    "SFT+RL": 0.4,  # 0.67 of the oracle (>= 0.6), +10 over SFT
    "SFT" + H: 0.1,
    "SFT+RL" + H: 0.2,  # +10 over SFT, but only 0.33 of the oracle (< 0.4)
    EQUAL: 0.45,
    EQUAL + H: 0.05,
}


@pytest.fixture
def split_dir(tmp_path):
    results = []
    for row, score in SCORES.items():
        for n, (case_id, suite) in enumerate(IDS):
            failure = "no <answer>" if row == "SFT" and n < 2 else None  # 2 of 10: 20%
            results.append(
                {"row": row, "id": case_id, "suite": suite, "dsc": score, "failure": failure}
            )
    (tmp_path / "cases.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    pairs = [
        ("SFT", "SFT+RL"),
        ("SFT" + H, "SFT+RL" + H),
        (EQUAL, "SFT+RL"),
        (EQUAL + H, "SFT+RL" + H),
    ]
    comparisons = [compare(results, a, b) for a, b in pairs]
    (tmp_path / "comparisons.json").write_text(json.dumps(comparisons))
    return tmp_path


def test_each_check_of_the_bar_reads_its_row_and_answers_as_by_hand(split_dir):
    split = read_split("test", split_dir)
    assert split.dsc["SFT"] == pytest.approx((30.0, 30.0, 30.0))
    assert split.malformed["SFT"] == (2, 10)
    gain = {
        "before": "SFT",
        "after": "SFT+RL",
        "split": "train",
        "samples": 40,
        "group_size": 4,
        "reward_before": 1.0,
        "reward_after": 1.2,
        "reward_difference": 0.2,
        "ci_low": 0.05,
        "ci_high": 0.35,
        **{f"{t}_difference": 0.05 for t in ("format", "axial", "spatial", "consistency")},
    }
    text = "\n".join(bar_checks(split, kl_step1=0.002, gain=gain, took=1000.0))
    assert "Oracle anchor: 60.00" in text
    assert f"SFT+RL{H} - SFT{H}: +10.00 DSC per case" in text
    assert "(>= +2 with CI above 0: yes)" in text
    assert "SFT+RL - SFT: +10.00 DSC per case, 95% CI [+10.00, +10.00]" in text
    assert "(>= 0: yes)" in text
    assert "SFT+RL: 40.00 = 0.67 of the oracle (at least 0.60: yes)" in text
    assert f"SFT+RL{H}: 20.00 = 0.33 of the oracle (at least 0.40: NO)" in text
    assert "SFT: 30.00 = 0.50 of the oracle (at least 0.33: yes)" in text
    assert "SFT malformed answers: 2 of 10 (at most 15%: NO)" in text
    assert f"control: SFT+RL - {EQUAL}: -5.00 DSC per case" in text
    assert f"control: SFT+RL{H} - {EQUAL}{H}: +15.00 DSC per case" in text
    assert "KL to the reference at GRPO step 1: 2.00e-03 (below 0.01: yes)" in text
    assert "SFT+RL - SFT: 1.200 - 1.000 = +0.200, 95% CI [+0.050, +0.350]" in text
    assert "(CI above 0: yes)" in text
    assert "time: 1000 s (at most 900 s: NO)" in text


def test_the_learning_figure_shows_both_splits(split_dir, tmp_path):
    split = read_split("test", split_dir)
    val = read_split("validation", split_dir)
    path = learning_figure(tmp_path / "learning.png", [1, 2, 3], [1.0, 1.5, 1.2], [val, split])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_split_counts_scans_and_targets(tmp_path):
    rows = [("a/x", "train"), ("a/y", "train"), ("b/x", "val"), ("c/x", "test"), ("c/y", "test")]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"id": i, "split": s}) + "\n" for i, s in rows))
    assert split_counts(manifest) == {"train": (1, 2), "val": (1, 1), "test": (1, 2)}


def test_own_manifest_takes_the_place_of_phantoms_and_needs_train_and_test(tmp_path, capsys):
    from cluster.default_run import main, own_manifest

    manifest = tmp_path / "manifest.jsonl"
    rows = [("a/x", "train"), ("c/x", "test"), ("c/y", "test")]
    manifest.write_text("".join(json.dumps({"id": i, "split": s}) + "\n" for i, s in rows))
    assert own_manifest(manifest) == {"train": (1, 1), "test": (1, 2)}
    assert "train: 1 scans, 1 targets, test: 1 scans, 2 targets" in capsys.readouterr().out
    only_train = tmp_path / "train.jsonl"
    only_train.write_text(json.dumps({"id": "a/x", "split": "train"}) + "\n")
    out = tmp_path / "run"
    assert main(["--manifest", str(only_train), "--out-dir", str(out)]) == 2
    assert "train.jsonl: no test rows (rows per split: train 1)" in capsys.readouterr().err
    assert not (out / "phantoms").exists()  # no phantom was written in its place


@pytest.mark.slow
def test_the_default_run_end_to_end_at_ci_size(tmp_path):
    """Every stage of `python -m cluster.default_run` on 8 scans (5 training, 1 validation,
    2 test) with a random tiny model: two GRPO steps through `ray job submit`, the control
    trained for exactly GRPO's sample uses, both splits evaluated with every row, the reward
    gain, the checks and the figure."""
    import subprocess
    import sys
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    from rollout.tiny_model import build_tiny_qwen3vl

    repo = Path(__file__).resolve().parents[2]
    model = build_tiny_qwen3vl(tmp_path / "tiny", "test")
    out = tmp_path / "run"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.default_run",
            "--out-dir",
            str(out),
            "--cases",
            "8",
            "--steps",
            "2",
            "--sft-epochs",
            "1",
            f"model.path={model}",
            "data.num_slices=4",
            "data.slice_size=64",
            "rollout.max_tokens=16",
            "cluster.rollout_cpus=0.5",
            "cluster.learner_cpus=0.5",
        ],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "val: 1 scans, " in run.stdout and "test: 2 scans, " in run.stdout
    # GRPO: 2 steps x 4 prompts = 8 sample uses; the control: 8 / SFT batch 2 = 4 updates
    assert f"{EQUAL}: the cold start continued by SFT for GRPO's 8 sample uses" in run.stdout
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("medvol-r1-tiny")
    runs = {r.info.run_name: r.info.run_id for r in client.search_runs([exp.experiment_id])}
    assert len(client.get_metric_history(runs["equal-sft"], "sft/loss")) == 4
    for folder, first in (("eval-val", ORACLE), ("eval", ORACLE)):
        rows = {
            json.loads(x)["row"] for x in (out / folder / "cases.jsonl").read_text().splitlines()
        }
        named = {"SFT", EQUAL, "SFT+RL"}
        assert {first} | named | {n + H for n in named} <= rows, (folder, rows)
    assert {"base", "base" + H} <= {
        json.loads(x)["row"] for x in (out / "eval" / "cases.jsonl").read_text().splitlines()
    }
    assert "Does it learn? validation scans" in run.stdout
    assert "Does it learn? test scans" in run.stdout
    assert f"control: SFT+RL{H} - {EQUAL}{H}" in run.stdout
    assert "KL to the reference at GRPO step 1" in run.stdout
    gain = json.loads((out / "reward_gain" / "reward_gain.json").read_text())
    assert gain["samples"] > 0 and gain["group_size"] == 4
    assert (out / "learning.png").stat().st_size > 10_000
