"""predict's model, slices, size and window: from the adapter's medvol.json, or refused."""

import logging

import pytest

from common.config import DataConfig
from evaluation.predict import PredictError, PredictSettings, build_parser, resolve_settings
from learner.training_frame import TrainingFrame


@pytest.fixture
def base(tmp_path):
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "qwen3_vl"}')
    (folder / "model.safetensors").write_bytes(b"\0" * 10)
    return folder


@pytest.fixture
def adapter(tmp_path, base):
    """An adapter folder trained on 8 slices of 128 px, abdomen (ctorg: unit)."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    data = DataConfig(num_slices=8, slice_size=128, suite_windows={"ctorg": "unit"})
    TrainingFrame.of_run(data, base).write(folder)
    return folder


def test_an_adapter_gives_every_setting_left_out(adapter, base):
    assert resolve_settings(adapter, None) == PredictSettings(base, 8, 128, (-160.0, 240.0))
    # the same values given, or a suite's window, agree with it
    given = resolve_settings(adapter, base, 8, 128, "unit")
    assert given == PredictSettings(base, 8, 128, (0.0, 1.0))


@pytest.mark.parametrize(
    "given, message",
    [
        (
            {"num_slices": 64},
            "--slices 64: the adapter {a} was trained on 8 slices \\(medvol.json\\)",
        ),
        ({"size": 256}, "--slice-size 256: the adapter {a} was trained on 128 px slices"),
        (
            {"window": (-1350.0, 150.0)},
            "--window -1350 150: the adapter {a} was trained with the window -160 240 "
            "\\(data.window\\), 0 1 \\(suite ctorg\\) \\(medvol.json\\)",
        ),
    ],
)
def test_a_flag_that_contradicts_the_adapter_names_both(adapter, given, message):
    with pytest.raises(PredictError, match="^" + message.format(a=adapter)):
        resolve_settings(adapter, None, **given)


def test_the_model_must_be_the_adapters_base(adapter, base, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "something else"}')
    with pytest.raises(PredictError, match=f"^--model {other}: the adapter .* on the base {base}"):
        resolve_settings(adapter, other)
    copy = tmp_path / "copy"  # the same checkpoint elsewhere is the same base
    copy.mkdir()
    for name in ("config.json", "model.safetensors"):
        (copy / name).write_bytes((base / name).read_bytes())
    assert resolve_settings(adapter, copy).model == copy
    (base / "config.json").unlink()  # the named base is gone: --model is needed
    with pytest.raises(PredictError, match=f"^--model: not given, and the adapter's base {base}"):
        resolve_settings(adapter, None)


def test_an_adapter_without_medvol_json_keeps_the_defaults_with_a_warning(tmp_path, base, caplog):
    old = tmp_path / "old-adapter"
    old.mkdir()
    with caplog.at_level(logging.WARNING):
        settings = resolve_settings(old, base)
    assert settings == PredictSettings(base, 64, 256, (-160.0, 240.0))
    assert "no medvol.json" in caplog.text
    assert resolve_settings(old, base, 8, 128, "lung").window == (-1350.0, 150.0)
    with pytest.raises(PredictError, match="^--model: not given"):
        resolve_settings(old, None)


def test_a_malformed_medvol_json_stops_predict(adapter):
    (adapter / "medvol.json").write_text('{"format": 1}')
    with pytest.raises(PredictError, match="medvol.json: field 'num_slices' is missing"):
        resolve_settings(adapter, None)


def test_the_command_line_leaves_the_frame_to_the_adapter():
    args = build_parser().parse_args(["--image", "ct.nii.gz", "--query", "q", "--out-dir", "o"])
    assert (args.model, args.slices, args.slice_size, args.window) == (None, None, None, None)
