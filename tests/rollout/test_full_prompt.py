"""A full-size prompt: 64 slices of 256x256, as in the paper, through vLLM at max_model_len 6144."""

import pytest

from common.config import RolloutConfig
from rollout.prompting import render

from .conftest import make_prompt

pytestmark = pytest.mark.slow


def test_a_64_slice_256px_prompt_fits_and_matches_the_processor(tiny_model):
    from rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine(tiny_model, RolloutConfig(max_tokens=8, in_process=True, max_lora_rank=16))
    prompt = make_prompt("full", slices=64, size=256)
    (group,) = engine.generate([prompt], seed=0)
    text, images = render(engine.processor, prompt, 64)
    expected = engine.processor(text=[text], images=images)["input_ids"][0]
    assert list(group.prompt_token_ids) == list(expected)
    image_pad = engine.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert group.prompt_token_ids.count(image_pad) == 64 * 64  # (256 / 32)^2 tokens a slice
    assert len(group.prompt_token_ids) + 256 <= 6144  # room for the paper's 256 new tokens
    print(f"64-slice prompt: {len(group.prompt_token_ids)} tokens")
    assert len(group.completions) == 4
    assert all(len(c.logprobs) == len(c.token_ids) > 0 for c in group.completions)
