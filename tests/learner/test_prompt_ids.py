"""The learner checks each prompt's token ids against the rollout engine's before it learns."""

import dataclasses

import pytest
import torch

from common.config import GRPOConfig, LoraSettings, RolloutConfig
from learner.grpo_learner import (
    BatchError,
    GRPOExample,
    GRPOLearner,
    PromptMismatchError,
    check_prompt_ids,
)
from tests.rollout.conftest import make_prompt


def test_a_mismatch_names_both_lengths_and_the_first_differing_position():
    check_prompt_ids([1, 2, 3], (1, 2, 3), "completion 0")  # equal: nothing to say
    with pytest.raises(
        PromptMismatchError,
        match=r"^completion 3: the learner's prompt has 4 tokens, the rollout engine's 5; they "
        r"first differ at position 2 \(learner token 3, rollout token 9\)",
    ):
        check_prompt_ids([1, 2, 3, 4], (1, 2, 9, 4, 5), "completion 3")
    with pytest.raises(
        PromptMismatchError,
        match=r"has 3 tokens, the rollout engine's 4; they first differ at position 3 \(learner "
        r"token none \(ended\), rollout token 7\)",
    ):
        check_prompt_ids([1, 2, 3], (1, 2, 3, 7), "completion 0")
    assert issubclass(PromptMismatchError, BatchError)  # raised before any weight changes


@pytest.mark.slow
def test_vllm_prompt_ids_pass_the_learners_check_and_a_changed_one_stops_the_step(tiny_model):
    """The tiny vLLM engine's prompt ids for a 2-slice prompt at the paper's 256 px equal the
    learner's encoding (64 image tokens a slice in both): a step on its completions, carrying
    those ids, learns. The same batch with one image token of the rollout's ids changed is
    refused before the weights move."""
    from rollout.vllm_engine import VLLMEngine

    cfg = GRPOConfig(
        lr=1e-2,
        zero_stage=0,
        precision="fp32",
        gradient_checkpointing=False,
        lora=LoraSettings(rank=4, alpha=8),
    )
    lrn = GRPOLearner(tiny_model, cfg, group_size=4, total_steps=4)
    engine = VLLMEngine(
        tiny_model, RolloutConfig(max_tokens=4, group_size=4, in_process=True, max_lora_rank=16)
    )
    prompt = make_prompt("a", slices=2, size=256)
    (group,) = engine.generate([prompt], seed=0)
    batch = [
        GRPOExample(
            prompt.messages, c.token_ids, c.logprobs, a, prompt_token_ids=group.prompt_token_ids
        )
        for c, a in zip(group.completions, (1.0, -1.0, 0.5, -0.5))
    ]
    image_pad = lrn.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert group.prompt_token_ids.count(image_pad) == 2 * 64  # 2 slices of (256 / 32)^2 tokens
    changed = list(group.prompt_token_ids)
    at = changed.index(image_pad)
    changed[at] = 20
    tampered = [dataclasses.replace(ex, prompt_token_ids=tuple(changed)) for ex in batch]
    before = [p.detach().clone() for p in lrn.engine.module.parameters() if p.requires_grad]
    with pytest.raises(PromptMismatchError, match=rf"first differ at position {at} \("):
        lrn.step(tampered)
    after = [p.detach() for p in lrn.engine.module.parameters() if p.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    metrics = lrn.step(batch)
    assert metrics.skipped_updates == 0 and metrics.grad_norm > 0
    del engine, lrn
