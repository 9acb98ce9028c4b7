"""The run config: every key documented in configs/reference.yaml, merged keys, derived seeds,
and the printed config that loads back."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from common.config import (
    MOVED,
    ConfigError,
    RunConfig,
    field_comments,
    load_run_config,
    reference_yaml,
    to_yaml,
)

REPO = Path(__file__).resolve().parents[2]


def every_field(instance, prefix=""):
    for f in dataclasses.fields(instance):
        key = f"{prefix}{f.name}"
        yield type(instance), f, key
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            yield from every_field(value, f"{key}.")


def test_reference_yaml_is_generated_from_the_dataclasses():
    written = (REPO / "configs" / "reference.yaml").read_text()
    assert written == reference_yaml(), (
        "configs/reference.yaml is out of date: python -m common.config > configs/reference.yaml"
    )


def test_every_field_has_a_comment():
    missing = [
        key
        for cls, f, key in every_field(RunConfig())
        if not field_comments(cls).get(f.name, "").strip()
    ]
    assert missing == []


def test_the_reference_loads_back_to_the_default_config():
    assert load_run_config(REPO / "configs" / "reference.yaml") == RunConfig()
    keys = yaml.safe_load(reference_yaml())
    assert keys["grpo"]["checkpoint_every"] == 5 and "seed" not in keys["rollout"]
    assert "min_box_area" not in keys["reward"]  # one key: data.min_box_area


def test_comments_come_from_above_and_from_the_line():
    comments = field_comments(RunConfig().grpo.__class__)
    assert comments["lr"] == "AdamW peak learning rate (paper: 2e-6)"
    assert comments["num_learners"].startswith("DeepSpeed ranks of the learner")  # its own class
    assert comments["tis_cap"].startswith("Truncated importance sampling")  # inherited
    assert comments["lora"] == "GRPO's adapter (over the SFT policy)"  # after `type: ignore`


@pytest.mark.parametrize("config", ["configs/tiny.yaml", "configs/paper.yaml", None])
def test_the_printed_config_loads_back_to_the_same_config(tmp_path, config):
    cfg = load_run_config(config, ["grpo.lr=3e-4", "seed=7", "data.min_box_area=9"])
    printed = tmp_path / "printed.yaml"
    printed.write_text(to_yaml(cfg))
    again = load_run_config(printed)
    assert again == cfg and again.grpo.lr == 3e-4


def test_one_seed_and_one_min_box_area_reach_every_part():
    cfg = load_run_config(None, ["seed=7", "data.min_box_area=9"])
    assert cfg.rollout.seed == 7 and cfg.reward.min_box_area == 9
    with pytest.raises(ConfigError, match=r"^rollout.seed: set from seed, not a key of its own"):
        load_run_config(None, ["rollout.seed=3"])
    with pytest.raises(ConfigError, match=r"reward.min_box_area: set from data.min_box_area"):
        load_run_config(None, ["reward.min_box_area=3"])


def test_one_box_frame_reaches_prompts_and_the_reward():
    assert RunConfig().data.box_coords == "pixels" and RunConfig().reward.box_coords == "pixels"
    cfg = load_run_config("configs/tiny.yaml", ["data.box_coords=relative1000"])
    assert cfg.data.box_coords == "relative1000" and cfg.reward.box_coords == "relative1000"
    with pytest.raises(ConfigError, match=r"reward.box_coords: set from data.box_coords"):
        load_run_config(None, ["reward.box_coords=relative1000"])
    with pytest.raises(ValueError, match=r"data.box_coords must be 'pixels' or 'relative1000', "):
        load_run_config(None, ["data.box_coords=relative"])
    with pytest.raises(ValueError, match=r"data.box_coords relative1000: data.slice_size 1024 is"):
        load_run_config(None, ["data.box_coords=relative1000", "data.slice_size=1024"])


@pytest.mark.parametrize("old", sorted(MOVED))
def test_a_merged_key_names_where_it_went(old):
    with pytest.raises(ConfigError, match=rf"^{old}: merged into {MOVED[old]}; set that instead"):
        load_run_config(None, [f"{old}=1"])


def test_a_merged_key_in_a_file_names_the_file(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("seed: 1\ncheckpoint_every: 2\n")
    with pytest.raises(ConfigError, match=rf"^{old}: checkpoint_every: merged into grpo"):
        load_run_config(old)


def test_k1_inside_the_loss_is_refused_with_the_reason():
    with pytest.raises((ConfigError, ValueError), match="k1: not a regulariser inside the loss"):
        load_run_config(None, ["grpo.kl_estimator=k1"])
    assert load_run_config(None, ["grpo.kl_estimator=none"]).grpo.kl_estimator == "none"
