"""A GRPO update whose loss or gradient is not finite is skipped, not applied: real DeepSpeed on
the tiny Qwen3-VL on the CPU, under each optimizer DeepSpeed wraps AdamW in (fp32: none, ZeRO-2,
ZeRO-3; bf16: its bf16 optimizer at stage 0, BF16_Optimizer at stage 1, ZeRO-2)."""

import warnings

import pytest
import torch

from common.config import GRPOConfig, LoraSettings
from learner.grpo_learner import GRPOExample, GRPOLearner
from tests.rollout.conftest import make_prompt

pytestmark = pytest.mark.slow

COMPLETIONS = [(20, 31, 40), (21, 30), (22, 33, 44, 55), (23,)]


def learner(tiny_model, zero_stage: int, precision: str) -> GRPOLearner:
    cfg = GRPOConfig(
        lr=1e-2,
        zero_stage=zero_stage,
        warmup_ratio=0.5,  # a moving schedule: a skipped update must not advance it
        precision=precision,
        gradient_checkpointing=False,
        beta=0.0,
        lora=LoraSettings(rank=4, alpha=8),
    )
    return GRPOLearner(tiny_model, cfg, group_size=4, total_steps=6)


def batch(prompt, advantages) -> list[GRPOExample]:
    return [
        GRPOExample(prompt.messages, ids, (-6.0,) * len(ids), a)
        for ids, a in zip(COMPLETIONS, advantages)
    ]


def adapter(lrn) -> dict[str, torch.Tensor]:
    """Every adapter tensor, whole (gathered from its partitions under ZeRO-3)."""
    from deepspeed.runtime.zero import GatheredParameters

    named = [(n, p) for n, p in lrn.engine.module.named_parameters() if p.requires_grad]
    with GatheredParameters([p for _, p in named], enabled=lrn.cfg.zero_stage == 3):
        return {n: p.detach().clone() for n, p in named}


def optimizer_state(lrn) -> list[tuple[str, torch.Tensor]]:
    """AdamW's state (moments and step count of every tensor it updates) and each group's lr."""
    torch_adamw = lrn.engine.basic_optimizer
    state = []
    for g, group in enumerate(torch_adamw.param_groups):
        state.append((f"group{g}.lr", torch.tensor(group["lr"], dtype=torch.float64)))
    # by the tensors it updates (ZeRO-3 swaps its flat partitions in and out of the groups)
    for i, tensor_state in enumerate(torch_adamw.state.values()):
        for key, value in sorted(tensor_state.items()):
            state.append((f"{i}.{key}", torch.as_tensor(value).detach().clone()))
    return state


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return [k for k, _ in a] == [k for k, _ in b] and all(
        torch.equal(x, y) for (_, x), (_, y) in zip(a, b)
    )


@pytest.mark.parametrize(
    "zero_stage, precision",
    [(0, "fp32"), (2, "fp32"), (3, "fp32"), (0, "bf16"), (1, "bf16"), (2, "bf16")],
)
def test_a_non_finite_update_is_skipped_and_counted_and_training_goes_on(
    tiny_model, zero_stage, precision
):
    """An advantage of 1e300 is a finite float (the batch is valid) but infinite in the
    learner's fp32: the loss is -inf and the gradient NaN. That update is skipped: every adapter
    tensor, AdamW's moments and step counts, and the lr schedule stay bit-identical, gradients
    are dropped, and it is counted (StepMetrics and DeepSpeed's skipped_steps). The learner that
    went through it then takes the next finite batch exactly as a twin that never saw it: same
    weights, bit for bit (DeepSpeed's micro-step count stayed aligned to the batches)."""
    prompt = make_prompt("a")
    first, second = batch(prompt, [1.5, -0.5, 0.5, 0.0]), batch(prompt, [-1.0, 1.0, 0.5, -0.5])
    poisoned = batch(prompt, [1.0, 1e300, -0.5, 0.0])
    torch.manual_seed(0)  # the same fresh adapter in both (ZeRO keeps its own fp32 copy)
    lrn = learner(tiny_model, zero_stage, precision)
    torch.manual_seed(0)
    twin = learner(tiny_model, zero_stage, precision)
    assert same(adapter(lrn), adapter(twin))
    assert lrn.step(first).skipped_updates == 0
    twin.step(first)
    weights, moments = adapter(lrn), optimizer_state(lrn)
    lr, steps = lrn.engine.get_lr(), lrn.engine.global_steps
    assert any(float(m.abs().sum()) > 0 for k, m in moments if k.endswith("exp_avg"))

    metrics = lrn.step(poisoned)
    assert metrics.skipped_updates == 1
    assert not torch.isfinite(torch.tensor([metrics.loss, metrics.grad_norm])).all()
    assert same(adapter(lrn), weights)
    assert same(optimizer_state(lrn), moments)
    assert lrn.engine.get_lr() == lr and metrics.lr == lr[0]
    assert lrn.engine.skipped_steps == 1 and lrn.engine.global_steps == steps + 1
    assert all(p.grad is None for p in lrn.engine.module.parameters())

    with warnings.catch_warnings():  # the lr schedule still sees AdamW's own step
        warnings.filterwarnings("error", message=r".*optimizer\.step\(\)` has been overridden")
        metrics = lrn.step(second)
    assert metrics.skipped_updates == 0
    assert not same(adapter(lrn), weights)
    twin.step(second)
    assert same(adapter(lrn), adapter(twin))
    assert same(optimizer_state(lrn), optimizer_state(twin))
    del lrn, twin
