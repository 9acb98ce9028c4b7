"""Learner fixtures: the tiny Qwen3-VL and small prompts."""

import pytest

from tests.rollout.conftest import make_prompt  # noqa: F401 - shared prompt builder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from rollout.tiny_model import build_tiny_qwen3vl

    return build_tiny_qwen3vl(tmp_path_factory.mktemp("tiny-qwen3vl"), size="test", seed=0)
