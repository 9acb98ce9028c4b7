"""The sampled-reward comparison: both checkpoints answer the same prompts with the same seed, so
one adapter under two names gains exactly nothing; bad input is refused by name."""

import json

import pytest

from common.cli import run_cli
from evaluation.reward_gain import TERMS, gain_line, main, reward_gain


def config(tiny_model, manifest, out):
    from common.config import load_run_config

    return load_run_config(
        "configs/tiny.yaml",
        [
            f"output_dir={out}",
            f"data.manifest={manifest}",
            "data.cache_dir=null",
            "data.num_slices=4",
            "data.slice_size=64",
            f"model.path={tiny_model}",
            "rollout.engine=transformers",
            "rollout.max_tokens=8",
            "rollout.group_size=2",
        ],
    )


@pytest.mark.slow
def test_one_adapter_under_two_names_gains_exactly_nothing(tiny_model, phantom_manifest, tmp_path):
    from data.dataset import VolumeDataset, anchorable
    from tests.conftest import SFT_LIKE_TARGETS, random_adapter

    cfg = config(tiny_model, phantom_manifest, tmp_path)
    adapter = random_adapter(tiny_model, tmp_path / "adapter", SFT_LIKE_TARGETS, 4, 0.05, 3)
    gain = reward_gain(
        cfg, ("SFT", adapter), ("same", adapter), tmp_path / "gain", "train", progress=False
    )
    usable, _ = anchorable(VolumeDataset(phantom_manifest, cfg.data, split="train"))
    rows = [json.loads(x) for x in (tmp_path / "gain" / "rewards.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * len(usable) and gain["samples"] == len(usable)
    first = {r["id"]: r for r in rows if r["row"] == "SFT"}
    second = {r["id"]: r for r in rows if r["row"] == "same"}
    assert first.keys() == second.keys()
    for sample_id, row in first.items():  # the same samples drawn with the same seed
        assert {k: v for k, v in row.items() if k != "row"} == {
            k: v for k, v in second[sample_id].items() if k != "row"
        }
        assert row["reward"] == pytest.approx(sum(row[t] for t in TERMS))
    assert (gain["reward_difference"], gain["ci_low"], gain["ci_high"]) == (0.0, 0.0, 0.0)
    assert json.loads((tmp_path / "gain" / "reward_gain.json").read_text()) == gain
    assert gain_line(gain).startswith(f"sampled reward on {len(usable)} train prompts (G = 2)")


def test_bad_input_is_one_line_naming_the_flag(tiny_model, phantom_manifest, tmp_path, capsys):
    base = ["--config", "configs/tiny.yaml", f"data.manifest={phantom_manifest}"]
    assert run_cli(main, [*base, "--before", "SFT", "--after", f"RL={tmp_path}"]) == 2
    assert "--before SFT: takes NAME=ADAPTER" in capsys.readouterr().err
    assert run_cli(main, [*base, "--before", f"A={tmp_path}", "--after", f"A={tmp_path}"]) == 2
    assert "both named 'A'" in capsys.readouterr().err
    args = [*base, f"output_dir={tmp_path}", "--before", f"A={tmp_path / 'none'}"]
    assert run_cli(main, [*args, "--after", f"B={tmp_path}"]) == 2
    assert f"--before A={tmp_path / 'none'}: not a LoRA adapter folder" in capsys.readouterr().err
