"""One recipe: SFT, GRPO and evaluation share output_dir; GRPO refuses to start without the SFT
adapter it looks for; MedSAM2 refuses to score without weights."""

from pathlib import Path

import pytest

from cluster.config import ConfigError, load_run_config

REPO = Path(__file__).resolve().parents[2]


def test_the_sft_adapter_follows_output_dir_unless_given():
    tiny = load_run_config(REPO / "configs/tiny.yaml")
    assert tiny.sft_adapter == Path("runs/tiny/sft/adapter")
    paper = load_run_config(REPO / "configs/paper.yaml", ["output_dir=/runs/try2"])
    assert paper.sft_adapter == Path("/runs/try2/sft/adapter")
    given = load_run_config(REPO / "configs/paper.yaml", ["sft_adapter=/elsewhere/adapter"])
    assert given.sft_adapter == Path("/elsewhere/adapter")
    base = load_run_config(REPO / "configs/tiny.yaml", ["grpo.from_base=true"])
    assert base.sft_adapter is None
    with pytest.raises(ConfigError, match="sft_adapter .*grpo.from_base"):
        load_run_config(REPO / "configs/tiny.yaml", ["grpo.from_base=true", "sft_adapter=/a"])


def test_grpo_without_its_sft_adapter_stops_naming_the_path(tmp_path, capsys):
    from cluster.grpo import main, sft_start
    from data.cli import run_cli

    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("")
    argv = ["--config", "configs/tiny.yaml", f"data.manifest={manifest}", f"output_dir={tmp_path}"]
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: sft_adapter: ") and f"{tmp_path}/sft/adapter" in err, err
    assert "grpo.from_base=true" in err
    assert not (tmp_path / "grpo").exists()  # stopped before anything started

    adapter = tmp_path / "sft" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    cfg = load_run_config(REPO / "configs/tiny.yaml", [f"output_dir={tmp_path}"])
    assert sft_start(cfg) == adapter
    assert sft_start(load_run_config(REPO / "configs/tiny.yaml", ["grpo.from_base=true"])) is None


def test_medsam2_without_a_checkpoint_stops_naming_the_field():
    with pytest.raises(ValueError, match=r"^reward.checkpoint: not set.*'medsam2'"):
        load_run_config(REPO / "configs/paper.yaml", ["reward.checkpoint=null"])
    random = load_run_config(
        REPO / "configs/paper.yaml", ["reward.checkpoint=null", "reward.random_weights=true"]
    )
    assert random.reward.checkpoint is None
    assert load_run_config(REPO / "configs/tiny.yaml").reward.propagator == "baseline"
