"""The SFT cold start writes its frame (medvol.json) into its adapter and checkpoints."""

import pytest

from learner.training_frame import TrainingFrame, base_model_digest

pytestmark = pytest.mark.slow  # one SFT step on the tiny model: DeepSpeed's start dominates


def test_sft_writes_its_frame_beside_the_adapter_and_checkpoints(
    tmp_path, tiny_model, phantom_manifest
):
    from learner.sft import train_sft
    from tests.conftest import tiny_run_config

    cfg = tiny_run_config(
        tmp_path,
        phantom_manifest,
        tiny_model,
        overrides=[
            "data.m3d_intensity=hu",
            "data.suite_windows={ctorg: unit}",
            "sft.epochs=1",
            "sft.max_steps=1",
            "sft.batch_size=1",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        ],
    )
    adapter = train_sft(cfg, progress=False)
    frame = TrainingFrame.read(adapter)
    assert (frame.num_slices, frame.slice_size, frame.m3d_intensity) == (8, 64, "hu")
    assert frame.window == (-160.0, 240.0) and frame.suite_windows == {"ctorg": (0.0, 1.0)}
    assert frame.base_model == str(tiny_model)
    assert frame.base_model_sha256 == base_model_digest(tiny_model)
    assert TrainingFrame.read(tmp_path / "sft" / "checkpoints" / "step1") == frame
