"""evaluate refuses an adapter trained in another frame than the run config's data settings."""

import logging

import pytest

from common.cli import UsageError
from common.config import DataConfig, load_run_config
from evaluation.evaluate import check_adapter_frames, evaluate
from learner.training_frame import TrainingFrame


@pytest.fixture
def adapter(tmp_path):
    """An adapter folder trained on 8 slices of 128 px in the abdominal window."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    folder = tmp_path / "adapter"
    folder.mkdir()
    TrainingFrame.of_run(DataConfig(num_slices=8, slice_size=128), base).write(folder)
    return folder


def test_an_adapter_of_the_configs_frame_passes(adapter):
    check_adapter_frames(DataConfig(num_slices=8, slice_size=128), {"base": None, "SFT": adapter})


def test_evaluate_stops_on_an_adapter_of_another_frame_naming_both(
    adapter, phantom_manifest, tmp_path
):
    cfg = load_run_config(
        "configs/tiny.yaml",
        [f"data.manifest={phantom_manifest}", "data.num_slices=64", "data.window=lung"],
    )
    with pytest.raises(UsageError, match="trained with num_slices 8 \\(medvol.json\\), the"):
        evaluate(cfg, {"SFT": adapter}, tmp_path / "eval", device="cpu")
    assert not (tmp_path / "eval").exists()  # stopped before anything was written
    with pytest.raises(UsageError) as err:
        check_adapter_frames(cfg.data, {"SFT": adapter})
    assert str(err.value) == (
        f"--adapter SFT={adapter}: trained with num_slices 8 (medvol.json), the config has "
        "data.num_slices 64; trained with window [-160.0, 240.0] (medvol.json), the config has "
        "data.window [-1350.0, 150.0]"
    )


def test_a_malformed_or_missing_medvol_json(adapter, tmp_path, caplog):
    (adapter / "medvol.json").write_text("[]")
    with pytest.raises(UsageError, match="--adapter SFT=.*medvol.json: expected a JSON object"):
        check_adapter_frames(DataConfig(), {"SFT": adapter})
    (adapter / "medvol.json").unlink()
    with caplog.at_level(logging.WARNING):
        check_adapter_frames(DataConfig(), {"SFT": adapter})
    assert "no medvol.json" in caplog.text
