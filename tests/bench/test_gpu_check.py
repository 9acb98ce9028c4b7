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
        "logprob gap": rf"\[learner\] grouped vs per-completion pass, fp32: token "
        rf"log-probabilities differ by at most {NUMBER}e-{NUMBER} nats \(mean ",
        "push learner side": rf"\[push\] LoRA r=128 adapter, {NUMBER} tensors, {NUMBER} MB "
        rf"float32: learner side \(gathered to host memory, packed into one buffer\) median "
        rf"{NUMBER} ms",
        "push worker side": rf"\[push\] worker side \(unpacked, copied onto the cpu\) median "
        rf"{NUMBER} ms .*; bit-identical to the learner's adapter",
        "batched vs reference": rf"\[propagation\] batched group vs MedSAM2's per-anchor "
        rf"procedure, fp32: logits differ by at most {NUMBER}e-{NUMBER}, masks agree with Dice "
        rf">= {NUMBER} over the G = 4 anchors",
    }
    found = {}
    for figure, pattern in figures.items():
        found[figure] = re.search(pattern, out)
        assert found[figure], f"{figure}: no line matching {pattern!r} in\n{out}"
        numbers = [g for g in found[figure].groups() if g not in SCALE]
        assert all(float(v) > 0 for v in numbers), f"{figure}: {found[figure].group(0)}"
    # fp32: the grouped pass and the batched propagation match their references
    gap = found["logprob gap"]
    assert float(gap.group(1)) * 10 ** -float(gap.group(2)) < 1e-4
    logits = found["batched vs reference"]
    assert float(logits.group(1)) * 10 ** -float(logits.group(2)) < 1e-3
    assert float(logits.group(3)) > 0.99
    # The tiny model's adapter by hand: 2 layers x 7 projections x (A, B) = 28 tensors; per layer
    # r (in + out) = 128 x (256 + 192 + 192 + 256 + 3 x 384) = 262,144 parameters (q, o 128 -> 128;
    # k, v 128 -> 64; gate, up 128 -> 256; down 256 -> 128), 2 layers x 4 bytes = 2.10 MB.
    assert found["push learner side"].group(1, 2) == ("28", "2.1")
    # vLLM is not importable here, as on a bare GPU box: the part says so and the run goes on
    assert "[vllm] skipped: vLLM does not import here (ModuleNotFoundError" in out
    # The smoke shape: 8 slices of 64 px (4 image tokens each), G = 4 completions of 16 tokens.
    assert "8 slices of 64 px (32 image tokens)" in out and "G = 4 x 16" in out
    # MFU = (FLOPs per step / step time) / peak
    step = float(found["learner step time"].group(1))
    achieved = flop(found["learner MFU"], 2, 3)
    assert achieved == pytest.approx(flop(found["learner FLOPs"], 1, 2) / step, rel=0.02)
    assert float(found["learner MFU"].group(1)) == pytest.approx(100 * achieved / 1e9, rel=0.02)


def wheel_of_installed(distribution: str, folder: Path) -> Path:
    """A wheel of an installed pure-Python distribution, from the files its RECORD lists."""
    import importlib.metadata
    import zipfile

    installed = importlib.metadata.distribution(distribution)
    name = installed.metadata["Name"].replace("-", "_")
    wheel = folder / f"{name}-{installed.version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for file in installed.files:
            if not str(file).startswith("..") and "__pycache__" not in str(file):
                archive.write(file.locate(), str(file))
    return wheel


def test_the_script_runs_vllm_in_smoke_mode_without_a_gpu(tmp_path):
    """``scripts/gpu_check.sh --smoke`` needs no driver; where vLLM imports, its part runs. A
    carried wheel (``--wheels``) goes first on the path, whatever the environment holds."""
    (tmp_path / "wheels").mkdir()
    wheel_of_installed("hydra-core", tmp_path / "wheels")
    run = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--smoke", "--only", "vllm", "--work-dir", str(tmp_path)]
        + ["--wheels", str(tmp_path / "wheels")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "installing 1 wheels from" in run.stdout
    carried = re.search(r"gpu_check: hydra-core [0-9.]+ from (\S+)", run.stdout)
    assert carried and "medvol-wheels." in carried.group(1), run.stdout
    assert not Path(carried.group(1)).exists()  # the carried folder goes when the check ends
    deepspeed = re.search(r"gpu_check: deepspeed 0\.19\.8 from (\S+)", run.stdout)
    assert deepspeed and "medvol-wheels." not in deepspeed.group(1), run.stdout
    assert "smoke run on the CPU" in run.stdout
    found = re.search(rf"\[vllm\] {NUMBER} tokens per group, {NUMBER} tokens/s", run.stdout)
    assert found and float(found.group(2)) > 0, run.stdout
    assert re.search(rf"\[vllm\] generate time median {NUMBER} s", run.stdout), run.stdout
    assert "[learner]" not in run.stdout  # --only reaches bench.gpu_check
