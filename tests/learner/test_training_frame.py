"""medvol.json: the frame an adapter was trained in, written and read back."""

import json

import pytest

from common.config import DataConfig
from learner.training_frame import (
    FILE_NAME,
    TrainingFrame,
    TrainingFrameError,
    base_model_digest,
)


@pytest.fixture
def base(tmp_path):
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "qwen3_vl"}')
    (folder / "model.safetensors").write_bytes(b"\0" * 10)
    return folder


def frame_of(base, **data):
    return TrainingFrame.of_run(DataConfig(**data), base)


def test_a_frame_is_written_and_read_back(base, tmp_path):
    frame = frame_of(
        base,
        num_slices=8,
        slice_size=128,
        window="abdomen",
        suite_windows={"ctorg": "unit"},
        m3d_intensity="hu",
    )
    assert frame.window == (-160.0, 240.0)
    assert frame.suite_windows == {"ctorg": (0.0, 1.0)}
    frame.write(tmp_path)
    written = json.loads((tmp_path / FILE_NAME).read_text())
    assert written["num_slices"] == 8 and written["window"] == [-160.0, 240.0]
    assert written["base_model"] == str(base) and written["format"] == 1
    assert "x2 = last column + 1" in written["box_convention"]
    assert TrainingFrame.read(tmp_path) == frame
    assert TrainingFrame.read_if_any(tmp_path / "base") is None


def test_the_base_digest_follows_config_and_weight_sizes_not_their_bytes(base):
    before = base_model_digest(base)
    (base / "model.safetensors").write_bytes(b"\1" * 10)  # same size: the same digest
    assert base_model_digest(base) == before
    (base / "model.safetensors").write_bytes(b"\1" * 11)
    assert base_model_digest(base) != before
    (base / "model.safetensors").write_bytes(b"\1" * 10)
    (base / "config.json").write_text('{"model_type": "other"}')
    assert base_model_digest(base) != before


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_slices", "8", "field 'num_slices' has an invalid value '8'"),
        ("num_slices", 0, "field 'num_slices' must be >= 1"),
        ("window", [240, -160], "field 'window' is not \\[low, high\\]"),
        ("suite_windows", {"kits": [1]}, "field 'suite_windows.kits' is not \\[low, high\\]"),
        ("format", 2, "field 'format' is 2"),
        ("base_model", None, "field 'base_model' has an invalid value None"),
    ],
)
def test_a_malformed_frame_names_the_file_and_field(base, tmp_path, field, value, message):
    frame_of(base).write(tmp_path)
    data = json.loads((tmp_path / FILE_NAME).read_text())
    data[field] = value
    (tmp_path / FILE_NAME).write_text(json.dumps(data))
    with pytest.raises(TrainingFrameError, match=f"{tmp_path / FILE_NAME}: {message}"):
        TrainingFrame.read(tmp_path)


def test_a_missing_field_or_broken_json_is_named(base, tmp_path):
    frame_of(base).write(tmp_path)
    data = json.loads((tmp_path / FILE_NAME).read_text())
    del data["slice_size"]
    (tmp_path / FILE_NAME).write_text(json.dumps(data))
    with pytest.raises(TrainingFrameError, match="field 'slice_size' is missing"):
        TrainingFrame.read(tmp_path)
    (tmp_path / FILE_NAME).write_text("{")
    with pytest.raises(TrainingFrameError, match="not valid JSON"):
        TrainingFrame.read(tmp_path)


def test_conflicts_name_the_frame_and_the_config(base):
    frame = frame_of(base, num_slices=8, slice_size=128)
    assert frame.conflicts(DataConfig(num_slices=8, slice_size=128)) == []
    found = frame.conflicts(DataConfig(num_slices=64, slice_size=128, window="lung"))
    assert found == [
        "trained with num_slices 8 (medvol.json), the config has data.num_slices 64",
        "trained with window [-160.0, 240.0] (medvol.json), the config has data.window "
        "[-1350.0, 150.0]",
    ]
