"""Shared test set-up: the project's process environment, and small phantom data."""

import os
from pathlib import Path

import pytest

from common.runtime import keep_gpus_for, set_default_environment

set_default_environment()
# The tests' tolerances are fp32's on the CPU: GPUs stay hidden unless MEDVOL_TEST_DEVICE=cuda.
keep_gpus_for(os.environ.get("MEDVOL_TEST_DEVICE"))

SMALL_SHAPE = (40, 96, 96)  # (z, y, x): quick to write and to prepare


@pytest.fixture(scope="session")
def phantom_manifest(tmp_path_factory) -> Path:
    """Four phantom cases (one per suite, plus a test case), written once per session."""
    from data.phantoms import write_phantoms

    return write_phantoms(
        tmp_path_factory.mktemp("phantoms"), n=4, seed=3, shape=SMALL_SHAPE, progress=False
    )


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny random Qwen3-VL (size "test", seed 0), built once per session."""
    from rollout.tiny_model import build_tiny_qwen3vl

    return build_tiny_qwen3vl(tmp_path_factory.mktemp("tiny-qwen3vl"), size="test", seed=0)


def tiny_run_config(out: Path, manifest: Path, model: Path, frame=(8, 64), overrides=()):
    """configs/tiny.yaml on the test phantoms and the tiny model: output under ``out``, no
    cache, ``frame`` = (slices, slice size), then ``overrides``."""
    from common.config import load_run_config

    slices, size = frame
    return load_run_config(
        "configs/tiny.yaml",
        [
            f"output_dir={out}",
            f"data.manifest={manifest}",
            "data.cache_dir=null",
            f"data.num_slices={slices}",
            f"data.slice_size={size}",
            f"model.path={model}",
            *overrides,
        ],
    )


def random_adapter(
    model_dir: Path, out: Path, target_modules: str, rank: int, std: float, seed: int
) -> Path:
    """A peft LoRA adapter folder on ``model_dir`` with random non-zero B (an adapter that
    changes the policy), saved to ``out``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, init_lora_weights=False, target_modules=target_modules
    )
    peft_model = get_peft_model(model, config)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, std)
    peft_model.save_pretrained(out)
    return out


# An SFT result's stand-in: LoRA on some language-model projections and on lm_head, as
# configs/tiny.yaml trains.
SFT_LIKE_TARGETS = r"(.*language_model.*\.(q_proj|v_proj|down_proj)|lm_head)"
