"""Learner fixtures: an SFT-like adapter, small prompts (tiny Qwen3-VL: tests/conftest.py)."""

import pytest

from tests.rollout.conftest import make_prompt  # noqa: F401 - shared prompt builder


@pytest.fixture(scope="session")
def sft_adapter(tiny_model, tmp_path_factory):
    """A LoRA adapter standing for an SFT result (rank 4, random non-zero weights)."""
    from tests.conftest import SFT_LIKE_TARGETS, random_adapter

    return random_adapter(
        tiny_model, tmp_path_factory.mktemp("sft-adapter"), SFT_LIKE_TARGETS, 4, 0.05, seed=2
    )
