"""GPUs are hidden from CPU runs: the embedded default and the tests stay on the CPU in fp32 on a
machine that has GPUs, unless a GPU is asked for."""

import os

from common.runtime import keep_gpus_for


def test_gpus_are_hidden_unless_cuda_is_asked_for(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    keep_gpus_for("cuda")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"  # the user's choice stays
    keep_gpus_for("cpu")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    keep_gpus_for(None)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""


def test_the_tests_and_the_embedded_default_run_with_gpus_hidden():
    from cluster.default_run import parse_args

    if os.environ.get("MEDVOL_TEST_DEVICE") != "cuda":
        assert os.environ["CUDA_VISIBLE_DEVICES"] == ""  # set by tests/conftest.py
    assert parse_args([]).device == "cpu"
    assert parse_args(["--device", "cuda"]).device == "cuda"
