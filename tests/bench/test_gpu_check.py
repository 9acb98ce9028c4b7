"""The GPU check end to end in its CPU smoke mode: it runs and prints every figure."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
NUMBER = r"([0-9]+(?:\.[0-9]+)?)"
WITHOUT_RAY_AND_VLLM = (
    "import sys; sys.modules.update(ray=None, vllm=None); "
    "from bench.gpu_check import main; sys.exit(main(sys.argv[1:]))"
)


UNIT = r"([kMGTP]?)FLOP"
SCALE = {"": 1.0, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}


def flop(found: re.Match, number: int, unit: int) -> float:
    return float(found.group(number)) * SCALE[found.group(unit)]


def test_smoke_run_prints_every_figure(tmp_path):
    # Ray and vLLM cannot be imported (a GPU machine may have neither); a peak of 1 GFLOP/s is
    # about what two CPU cores reach on the tiny model.
    run = subprocess.run(
        [sys.executable, "-c", WITHOUT_RAY_AND_VLLM, "--smoke", "--peak-tflops", "0.001"]
        + ["--work-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    out = run.stdout
    figures = {
        "model": rf"model: the tiny test Qwen3-VL \(random weights\), {NUMBER} B parameters",
        "learner step time": rf"\[learner\] step time median {NUMBER} s",
        "learner memory": rf"\[learner\] peak RSS of the process so far {NUMBER} GiB",
        "learner FLOPs": rf"\[learner\] model FLOPs per step {NUMBER} {UNIT}",
        "learner MFU": rf"\[learner\] MFU {NUMBER}% \({NUMBER} {UNIT}/s achieved of "
        rf"1\.00 GFLOP/s peak\)",
        "propagation cold": rf"\[propagation\] group, features computed \(5 slices encoded\): "
        rf"median {NUMBER} s",
        "propagation warm": rf"\[propagation\] group, features cached: median {NUMBER} s",
        "propagation memory": rf"\[propagation\] peak RSS of the process so far {NUMBER} GiB",
        "rollout time": rf"\[rollout\] generate time median {NUMBER} s",
        "rollout rate": rf"\[rollout\] {NUMBER} tokens per group, {NUMBER} tokens/s",
        "rollout memory": rf"\[rollout\] peak RSS of the process so far {NUMBER} GiB",
    }
    found = {}
    for figure, pattern in figures.items():
        found[figure] = re.search(pattern, out)
        assert found[figure], f"{figure}: no line matching {pattern!r} in\n{out}"
        numbers = [g for g in found[figure].groups() if g not in SCALE]
        assert all(float(v) > 0 for v in numbers), f"{figure}: {found[figure].group(0)}"
    # The smoke shape: 8 slices of 64 px (4 image tokens each), G = 4 completions of 16 tokens.
    assert "8 slices of 64 px (32 image tokens)" in out and "G = 4 x 16" in out
    # MFU = (FLOPs per step / step time) / peak
    step = float(found["learner step time"].group(1))
    achieved = flop(found["learner MFU"], 2, 3)
    assert achieved == pytest.approx(flop(found["learner FLOPs"], 1, 2) / step, rel=0.02)
    assert float(found["learner MFU"].group(1)) == pytest.approx(100 * achieved / 1e9, rel=0.02)
