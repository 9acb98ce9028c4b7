"""GRPO and the frame (medvol.json): its checkpoints carry it, its SFT adapter must match it."""

import json

import pytest

from cluster.checkpoints import Checkpoints
from cluster.trainer import sft_start
from common.config import ConfigError, DataConfig, load_run_config
from learner.training_frame import TrainingFrame


class FakeLearners:
    def save_checkpoint(self, folder, tag, state):
        folder.mkdir(parents=True)
        (folder / f"{tag}.pt").write_text(json.dumps(state))


def test_a_checkpoint_holds_the_runs_frame(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    frame = TrainingFrame.of_run(DataConfig(num_slices=8, slice_size=128), base)
    checkpoints = Checkpoints(tmp_path / "checkpoints")
    folder = checkpoints.save(3, FakeLearners(), {"step": 3}, frame)
    assert folder == tmp_path / "checkpoints" / "step-3" == checkpoints.latest()
    assert TrainingFrame.read(folder) == frame
    assert (folder / "learner" / "ckpt.pt").exists()
    assert not list((tmp_path / "checkpoints").glob(".*partial"))


def test_grpo_refuses_an_sft_adapter_trained_in_another_frame(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    adapter = tmp_path / "sft" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    TrainingFrame.of_run(DataConfig(num_slices=8, slice_size=128), base).write(adapter)
    cfg = load_run_config("configs/tiny.yaml", [f"output_dir={tmp_path}"])
    assert sft_start(cfg) == adapter  # configs/tiny.yaml: 8 slices of 128 px, abdomen
    other = load_run_config("configs/tiny.yaml", [f"output_dir={tmp_path}", "data.slice_size=64"])
    with pytest.raises(ConfigError, match=f"^sft_adapter: {adapter}: trained with slice_size 128"):
        sft_start(other)
