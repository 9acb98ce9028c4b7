"""GRPO's run checkpoints: written whole, with the run's frame (medvol.json) inside."""

import json

from cluster.grpo import Checkpoints
from data.config import DataConfig
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
