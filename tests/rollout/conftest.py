"""Rollout fixtures: a small multi-image prompt, adapters (the tiny Qwen3-VL: tests/conftest.py)."""

import numpy as np
import pytest

from data.prompts import build_messages
from rollout.records import RolloutPrompt


def make_prompt(sample_id: str, slices: int = 4, size: int = 64, seed: int = 0) -> RolloutPrompt:
    rng = np.random.default_rng(seed)
    volume = (rng.random((slices, size, size)) * 255).astype(np.uint8)
    return RolloutPrompt(sample_id, build_messages(volume, "Find the organ that secretes bile."))


@pytest.fixture(scope="session")
def prompts():
    return [make_prompt("a", seed=0), make_prompt("b", seed=1)]


@pytest.fixture(scope="session")
def adapter(tiny_model, tmp_path_factory):
    """A LoRA adapter on every linear layer of the language model, with random (non-zero) B."""
    from tests.conftest import random_adapter

    return random_adapter(
        tiny_model,
        tmp_path_factory.mktemp("adapter"),
        r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
        rank=8,
        std=0.5,
        seed=1,
    )
