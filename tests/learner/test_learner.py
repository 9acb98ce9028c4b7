"""The DeepSpeed GRPO learner and the SFT cold start on the tiny Qwen3-VL, for real."""

import numpy as np
import pytest
import torch

from learner.config import GRPOConfig, LoraSettings
from learner.grpo_learner import BatchError, GRPOExample, GRPOLearner
from learner.policy import completion_logits, encode, token_logprobs
from tests.rollout.conftest import make_prompt

pytestmark = pytest.mark.slow

LORA = LoraSettings(rank=8, alpha=16, dropout=0.0)


def learner(tiny_model, zero_stage=0, lr=1e-2, group_size=4):
    cfg = GRPOConfig(
        lr=lr,
        zero_stage=zero_stage,
        warmup_ratio=0.0,
        precision="fp32",
        gradient_checkpointing=True,
        lora=LORA,
    )
    return GRPOLearner(tiny_model, cfg, group_size=group_size, total_steps=20)


def current_logprobs(lrn, messages, ids):
    seq = encode(lrn.processor, messages, ids)
    with torch.no_grad():
        return token_logprobs(
            completion_logits(lrn.engine.module, seq, lrn.device), seq.completion_ids
        ).tolist()


def lora_params(lrn):
    return {
        n: p.detach().clone() for n, p in lrn.engine.module.named_parameters() if p.requires_grad
    }


@pytest.fixture(scope="module")
def grpo(tiny_model):
    return learner(tiny_model)


def test_on_policy_loss_equals_minus_mean_advantage_and_only_the_adapter_learns(grpo):
    prompt = make_prompt("a")
    completions = [(20, 31, 40), (21, 30), (22, 33, 44, 55), (23,)]
    advantages = [1.5, -0.5, 0.5, 0.0]
    batch = [
        GRPOExample(
            prompt.messages, ids, tuple(current_logprobs(grpo, prompt.messages, list(ids))), a
        )
        for ids, a in zip(completions, advantages)
    ]
    frozen = {
        n: p.detach().clone()
        for n, p in grpo.engine.module.named_parameters()
        if not p.requires_grad
    }
    trainable = {n for n, p in grpo.engine.module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = lora_params(grpo)
    metrics = grpo.step(batch)
    # rho = 1 and pi = pi_ref (fresh adapter): loss = -(1/G) sum_i A_i = -(1.5 - 0.5 + 0.5) / 4
    assert metrics.loss == pytest.approx(-0.375, abs=1e-5)
    assert metrics.kl == pytest.approx(0.0, abs=1e-6) and metrics.clip_fraction == 0.0
    assert metrics.tokens == 10 and metrics.grad_norm > 0 and metrics.entropy > 0
    after = lora_params(grpo)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    for n, p in grpo.engine.module.named_parameters():
        if not p.requires_grad:
            assert torch.equal(frozen[n], p.detach()), n


def test_bad_batches_raise_before_any_weight_changes(grpo):
    prompt = make_prompt("a")
    good = GRPOExample(prompt.messages, (20, 21), (-1.0, -1.0), 1.0)
    before = lora_params(grpo)
    cases = [
        ([], "empty batch"),
        ([good] * 3, "3 completions, the learner was built for 4"),
        (
            [good] * 3 + [GRPOExample(prompt.messages, (20, 21), (-1.0,), 1.0)],
            "2 tokens but 1 old logprobs",
        ),
        ([good] * 3 + [GRPOExample(prompt.messages, (20, 21), (-1.0, float("nan")), 1.0)], "NaN"),
        (
            [good] * 3 + [GRPOExample(prompt.messages, (20, 21), (-1.0, -1.0), float("nan"))],
            "advantage nan is not finite",
        ),
        ([good] * 3 + [GRPOExample(prompt.messages, (), (), 1.0)], "no tokens"),
    ]
    for batch, message in cases:
        with pytest.raises(BatchError, match=message):
            grpo.step(batch)
    after = lora_params(grpo)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_exported_adapter_loads_in_peft_and_matches_the_learner(grpo, tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import Qwen3VLForConditionalGeneration

    update = grpo.export(tmp_path, version=7)
    assert update.version == 7 and (update.adapter_dir / "adapter_config.json").exists()
    base = Qwen3VLForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(update.adapter_dir)).eval()
    prompt = make_prompt("a")
    seq = encode(grpo.processor, prompt.messages, [20, 31, 40])
    with torch.no_grad():
        ours = completion_logits(grpo.engine.module, seq, grpo.device)
        theirs = completion_logits(loaded, seq, "cpu")
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_checkpoint_round_trip(grpo, tmp_path):
    grpo.save_checkpoint(tmp_path, "step3", {"step": 3, "position": 12})
    before = lora_params(grpo)
    with torch.no_grad():
        for p in grpo.engine.module.parameters():
            if p.requires_grad:
                p.add_(1.0)
    state = grpo.load_checkpoint(tmp_path)
    assert state["step"] == 3 and state["position"] == 12
    after = lora_params(grpo)
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stages_train(tiny_model, stage):
    lrn = learner(tiny_model, zero_stage=stage)
    prompt = make_prompt("z")
    ids = [(20, 31), (21, 30), (22, 33), (23, 34)]
    batch = [
        GRPOExample(prompt.messages, i, tuple(current_logprobs(lrn, prompt.messages, list(i))), a)
        for i, a in zip(ids, (1.0, -1.0, 0.5, -0.5))
    ]
    before = {
        n: p.detach().clone() for n, p in lrn.engine.module.named_parameters() if p.requires_grad
    }
    metrics = lrn.step(batch)
    assert np.isfinite(metrics.loss) and metrics.grad_norm > 0
    del lrn, before
