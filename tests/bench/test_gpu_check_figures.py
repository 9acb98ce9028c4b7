"""The GPU check's parts by hand: the 4B architecture, peak table, FLOPs, the script's refusals."""

import os
import subprocess
from pathlib import Path

import pytest

from bench.gpu_check import (
    StepParameters,
    StepShape,
    parameter_count,
    peak_tflops,
    qwen3vl_4b_config,
    si,
    step_flops,
    step_parameters,
)

REPO = Path(__file__).resolve().parents[2]
TOKEN_IDS = {
    "image_token_id": 5,
    "video_token_id": 6,
    "vision_start_token_id": 3,
    "vision_end_token_id": 4,
}


def test_the_4b_architecture_has_the_4b_parameter_count(tmp_path):
    """All 36 layers give Qwen3-VL-4B's 4.44 B parameters; a language layer is, by hand,
    q 2560x4096 + k, v 2560x1024 + o 4096x2560 + gate, up, down 2560x9728 + norms."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    layer = 2 * 2560 * 4096 + 2 * 2560 * 1024 + 3 * 2560 * 9728 + 2 * 2560 + 2 * 128
    assert layer == 100_930_816
    qwen3vl_4b_config(TOKEN_IDS, 36).save_pretrained(tmp_path / "full")
    qwen3vl_4b_config(TOKEN_IDS, 8).save_pretrained(tmp_path / "eight")
    full, eight = parameter_count(tmp_path / "full"), parameter_count(tmp_path / "eight")
    assert 4.43e9 < full < 4.45e9
    assert full - eight == 28 * layer
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(qwen3vl_4b_config(TOKEN_IDS, 36))
    counted = step_parameters(model)
    assert counted.text == 36 * layer + 2560  # and the final norm
    assert counted.head == 151936 * 2560  # tied to the embeddings, counted once as the head
    assert counted.lora == 0
    for layers in (0, 37):
        with pytest.raises(ValueError, match=f"--layers must be 1..36 .*got {layers}"):
            qwen3vl_4b_config(TOKEN_IDS, layers)


def test_peak_table_matches_specific_names_first():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA RTX A6000") == 154.8
    assert peak_tflops("NVIDIA L40S") == 362.0
    assert peak_tflops("NVIDIA L4") == 121.0
    assert peak_tflops("Tesla T4") is None


def test_step_flops_by_hand():
    params = StepParameters(text=10, lora=2, head=3, vision=5, merger=7)
    shape = StepShape(tokens=100, kept=20, patches=16, merge=4)
    flops = step_flops(params, shape, reference=True)
    assert flops["policy"] == 6 * (10 * 100 + 3 * 20)
    assert flops["reference"] == 2 * ((10 - 2) * 100 + 3 * 20)
    assert flops["vision"] == 2 * (5 * 16 + 7 * 16 / 4)
    assert flops["total"] == 6360 + 1720 + 216
    assert step_flops(params, shape, reference=False)["reference"] == 0.0


def test_si_prefixes():
    assert si(612.345e9, "FLOP") == "612.35 GFLOP"
    assert si(989e12, "FLOP/s") == "989.00 TFLOP/s"
    assert si(1.5e15, "FLOP") == "1.50 PFLOP"
    assert si(0.5, "FLOP") == "0.50 FLOP"


def test_step_parameters_sort_every_parameter_of_a_lora_policy(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3VLForConditionalGeneration

    from common.config import LoraSettings
    from rollout.tiny_model import build_tiny_qwen3vl

    model = Qwen3VLForConditionalGeneration.from_pretrained(
        build_tiny_qwen3vl(tmp_path / "tiny", "test"), dtype=torch.float32
    )
    model = get_peft_model(model, LoraConfig(r=4, target_modules=LoraSettings().target_modules))
    counted = step_parameters(model)
    names = dict(model.named_parameters())
    lookups = sum(p.numel() for n, p in names.items() if "embed_tokens" in n or "pos_embed" in n)
    head = sum(p.numel() for n, p in names.items() if "lm_head" in n)  # untied in the tiny model
    total = sum(p.numel() for p in names.values())
    assert counted.text + counted.vision + counted.merger + lookups + head == total
    assert counted.lora == sum(p.numel() for n, p in names.items() if "lora_" in n) > 0
    assert counted.head == head  # vocab x hidden, from the config
    assert counted.merger == sum(p.numel() for n, p in names.items() if "merger" in n) > 0


def _script(tmp_path, path_dirs: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=os.pathsep.join(path_dirs))
    return subprocess.run(
        ["bash", "scripts/gpu_check.sh"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_gpu_check_script_refuses_a_machine_without_a_gpu(tmp_path):
    import shutil
    import sys

    python_dir = str(Path(sys.executable).parent)
    no_driver = _script(tmp_path, [python_dir, "/usr/bin", "/bin"])
    if shutil.which("nvidia-smi", path="/usr/bin:/bin") is None:
        assert no_driver.returncode == 1
        assert "nvidia-smi not found" in no_driver.stderr
    # A driver tool that answers, and a torch that sees no GPU (this machine's): refused by name.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'Fake GPU, 0.0, 0 MiB'\n")
    (fake / "nvidia-smi").chmod(0o755)
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal cannot be seen here")
    no_cuda = _script(tmp_path, [str(fake), python_dir, "/usr/bin", "/bin"])
    assert no_cuda.returncode == 1
    assert "Fake GPU" in no_cuda.stdout
    assert f"torch {torch.__version__}" in no_cuda.stderr and "sees no GPU" in no_cuda.stderr


def test_gpu_check_script_names_a_missing_or_empty_wheel_folder(tmp_path):
    import sys

    env = dict(
        os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), "/usr/bin", "/bin"])
    )

    def script(*args):
        return subprocess.run(
            ["bash", "scripts/gpu_check.sh", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    missing = script("--smoke", "--wheels", str(tmp_path / "nowhere"))
    assert missing.returncode == 2
    assert f"--wheels {tmp_path / 'nowhere'}: no such folder" in missing.stderr
    # torch's own wheels are never installed over the box's CUDA build
    (tmp_path / "torch-2.13.0-cp311-cp311-linux_x86_64.whl").write_bytes(b"")
    only_torch = script("--smoke", "--wheels", str(tmp_path))
    assert only_torch.returncode == 2
    assert "no wheels there (torch's own are not installed)" in only_torch.stderr
    assert script("--wheels").returncode == 2


def test_gpu_check_refuses_a_model_folder_without_a_config(tmp_path):
    from bench.gpu_check import parse_args
    from common.cli import UsageError

    with pytest.raises(UsageError, match=f"--model {tmp_path}: no config.json there"):
        parse_args(["--smoke", "--model", str(tmp_path)])
    with pytest.raises(UsageError, match="--medsam2 .*missing.pt: no such file"):
        parse_args(["--smoke", "--medsam2", str(tmp_path / "missing.pt")])
    assert parse_args([]).layers == 36  # the whole 4B by default
