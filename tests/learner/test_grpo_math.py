"""GRPO's pure functions against values computed by hand."""

import math

import pytest
import torch

from learner.grpo import (
    KL_CLAMP,
    aggregate_loss,
    clipped_surrogate,
    group_advantages,
    grpo_loss,
    k3_kl,
    token_entropy,
    truncated_is_weights,
    zero_std_groups,
)


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 3.0, 2.0, 2.0], [0.5, 0.5, 0.5, 0.5]])
    adv = group_advantages(rewards, eps=0.0)
    # group 1: mean 2, population std sqrt((1 + 1 + 0 + 0) / 4) = sqrt(0.5)
    s = math.sqrt(0.5)
    assert adv[0].tolist() == pytest.approx([-1 / s, 1 / s, 0.0, 0.0])
    # group 2: all equal -> zero advantage, not NaN
    adv = group_advantages(rewards, eps=1e-6)
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert zero_std_groups(rewards) == 1
    with pytest.raises(ValueError, match="prompts, G"):
        group_advantages(torch.ones(4))


def test_advantage_scales_by_hand():
    rewards = torch.tensor([[1.0, 3.0, 2.0, 2.0], [2.0, 2.1, 2.0, 1.9]])
    # none (Dr. GRPO): r - group mean; a group that barely differs gets small advantages
    none = group_advantages(rewards, eps=0.0, scale="none")
    assert none[0].tolist() == pytest.approx([-1.0, 1.0, 0.0, 0.0])
    assert none[1].tolist() == pytest.approx([0.0, 0.1, 0.0, -0.1], abs=1e-6)
    # group: the second group's std is sqrt(0.02 / 4) = 0.0707, so +-0.1 becomes +-1.414
    group = group_advantages(rewards, eps=0.0, scale="group")
    assert group[1].tolist() == pytest.approx(
        [0.0, 0.1 / math.sqrt(0.005), 0.0, -0.1 / math.sqrt(0.005)], abs=1e-5
    )
    # batch: one std over all eight rewards: mean 2.0, squares 1 + 1 + 0 + 0 + 0 + .01 + 0 + .01
    batch_std = math.sqrt(2.02 / 8)
    batch = group_advantages(rewards, eps=0.0, scale="batch")
    assert batch[0].tolist() == pytest.approx([-1 / batch_std, 1 / batch_std, 0.0, 0.0], abs=1e-5)
    with pytest.raises(ValueError, match="advantage scale must be one of group, batch, none"):
        group_advantages(rewards, scale="mean")


def test_k3_kl_by_hand():
    logp = torch.tensor([math.log(0.5), math.log(0.2)])
    ref = torch.tensor([math.log(0.25), math.log(0.2)])
    # token 1: ref/new = 0.5 -> 0.5 - log 0.5 - 1 = 0.5 + 0.693147 - 1 = 0.193147
    assert k3_kl(logp, ref).tolist() == pytest.approx([0.5 + math.log(2) - 1, 0.0])


def test_k3_kl_is_clamped_at_ten_per_token():
    # ref - new = 3: e^3 - 3 - 1 = 16.09 > 10; ref - new = 2: e^2 - 3 = 4.39 stays
    logp = torch.tensor([0.0, 0.0, 0.0])
    ref = torch.tensor([3.0, 2.0, -20.0])  # -20: e^-20 + 20 - 1 = 19.0 -> 10
    assert KL_CLAMP == 10.0
    assert k3_kl(logp, ref).tolist() == pytest.approx([10.0, math.exp(2) - 3, 10.0])


def test_clipped_surrogate_by_hand():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # rho = 1.5, 0.5, 1.1
    surrogate, clipped = clipped_surrogate(new, old, torch.tensor([2.0]), 0.2)
    # A > 0: min(rho A, clip(rho) A) = min(3.0, 2.4), min(1.0, 1.6), min(2.2, 2.2)
    assert surrogate[0].tolist() == pytest.approx([2.4, 1.0, 2.2])
    # clipping changed the loss only for rho = 1.5 (rho = 0.5 keeps its unclipped 1.0)
    assert clipped[0].tolist() == [True, False, False]
    surrogate, clipped = clipped_surrogate(new, old, torch.tensor([-1.0]), 0.2)
    # A < 0: min(-1.5, -1.2) = -1.5, min(-0.5, -0.8) = -0.8, -1.1
    assert surrogate[0].tolist() == pytest.approx([-1.5, -0.8, -1.1])
    assert clipped[0].tolist() == [False, True, False]  # only rho = 0.5 took the clipped -0.8


def test_grpo_loss_on_a_toy_batch_by_hand():
    # Two completions: the first 2 tokens long, the second 3 (one padded token masked out).
    old = torch.log(torch.tensor([[0.5, 0.5, 1.0], [0.4, 0.4, 0.4]]))
    new = torch.log(torch.tensor([[0.6, 0.5, 1.0], [0.4, 0.2, 0.6]]))
    ref = torch.log(torch.tensor([[0.3, 0.5, 1.0], [0.4, 0.4, 0.4]]))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, -1.0])
    parts = grpo_loss(new, old, ref, adv, mask, clip_eps=0.2, beta=0.1)

    def k3(p, r):
        return r / p - math.log(r / p) - 1

    # completion 1: rho = 1.2, 1.0 -> surrogate 1.2, 1.0; kl = k3(.6,.3), 0
    c1 = -((1.2 - 0.1 * k3(0.6, 0.3)) + (1.0 - 0.0)) / 2
    # completion 2 (A = -1): rho = 1.0, 0.5, 1.5 -> min(-rho, -clip(rho)) = -1, -0.8, -1.5
    c2 = -((-1.0 - 0.1 * 0.0) + (-0.8 - 0.1 * k3(0.2, 0.4)) + (-1.5 - 0.1 * k3(0.6, 0.4))) / 3
    assert parts.loss.item() == pytest.approx((c1 + c2) / 2, rel=1e-5)
    # of 5 real tokens only rho = 0.5 with A < 0 took the clipped term (1.5 with A < 0 did not)
    assert parts.clip_fraction.item() == pytest.approx(1 / 5)
    kl = (k3(0.6, 0.3) / 2 + (k3(0.2, 0.4) + k3(0.6, 0.4)) / 3) / 2
    assert parts.kl.item() == pytest.approx(kl, rel=1e-5)


def test_on_policy_loss_is_minus_mean_advantage_and_its_gradient_follows_the_advantage():
    logp = torch.log(torch.tensor([[0.5, 0.25]])).requires_grad_(True)
    parts = grpo_loss(
        logp, logp.detach(), logp.detach(), torch.tensor([2.0]), torch.ones(1, 2), beta=0.01
    )
    assert parts.loss.item() == pytest.approx(-2.0)
    parts.loss.backward()
    # d/dlogp of -(exp(logp - old) A) / 2 at logp = old is -A / 2 per token
    assert logp.grad[0].tolist() == pytest.approx([-1.0, -1.0])


def test_truncated_importance_weights_scale_the_surrogate_not_the_kl():
    learner = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    sampler = torch.log(torch.tensor([[0.25, 0.3, 0.02]]))
    w = truncated_is_weights(learner, sampler, cap=2.0)
    assert w[0].tolist() == pytest.approx([2.0, 1.0, 2.0])  # 0.5/0.25 = 2, 1, 10 -> capped at 2
    with pytest.raises(ValueError, match="cap must be > 0"):
        truncated_is_weights(learner, sampler, cap=0.0)
    new = torch.log(torch.tensor([[0.5, 0.3, 0.25]]))  # rho = 1, 1, 1.25 against learner
    ref = torch.log(torch.tensor([[0.25, 0.3, 0.25]]))
    parts = grpo_loss(new, learner, ref, torch.tensor([1.0]), torch.ones(1, 3), 0.2, 0.1, w)

    def k3(p, r):
        return r / p - math.log(r / p) - 1

    # surrogates 1, 1, min(1.25, 1.2) = 1.2, times w = 2, 1, 2; kl on token 1 only, unweighted
    expected = -((2 * 1.0 - 0.1 * k3(0.5, 0.25)) + 1.0 + 2 * 1.2) / 3
    assert parts.loss.item() == pytest.approx(expected, rel=1e-6)


def test_entropy_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.5], [1.0, 1e-12]]))
    assert token_entropy(logits).tolist() == pytest.approx([math.log(2), 0.0], abs=1e-6)


def test_lr_schedule_warms_up_linearly_then_decays_by_cosine():
    from learner.engine import lr_factor

    # 10 steps, warmup 0.2 -> 2 warmup steps at 1/3 and 2/3, then cosine from 1 to 0
    factors = [lr_factor(s, 10, 0.2) for s in range(10)]
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert factors[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert lr_factor(0, 10, 0.0) == 1.0 and lr_factor(10, 10, 0.0) == pytest.approx(0.0)


def test_loss_aggregations_by_hand():
    # Per-token losses of 2 completions, 2 and 3 tokens long (the first padded by one).
    per_token = torch.tensor([[1.0, 3.0, 100.0], [2.0, 2.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # paper: mean per completion, then over completions: ((1+3)/2 + (2+2+5)/3) / 2 = (2 + 3) / 2
    assert aggregate_loss(per_token, mask).item() == pytest.approx(2.5)
    # DAPO token mean: (1+3+2+2+5) / 5 tokens
    assert aggregate_loss(per_token, mask, "token_mean").item() == pytest.approx(13 / 5)
    # ... over a given count: one of two micro-batches of a 20-token batch divides by 20 / 2
    loss = aggregate_loss(per_token, mask, "token_mean", token_count=10.0)
    assert loss.item() == pytest.approx(13 / 10)
    # Dr. GRPO: sums 4 and 9 over L_max = 8, mean over completions: (4/8 + 9/8) / 2
    assert aggregate_loss(per_token, mask, "seq_sum_norm", max_tokens=8).item() == pytest.approx(
        13 / 16
    )
    with pytest.raises(ValueError, match="seq_sum_norm needs max_tokens"):
        aggregate_loss(per_token, mask, "seq_sum_norm")
    with pytest.raises(ValueError, match="loss_agg must be one of"):
        aggregate_loss(per_token, mask, "sum")


def test_clip_higher_by_hand():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.25, 1.4, 0.7]]))  # rho = 1.25, 1.4, 0.7
    surrogate, clipped = clipped_surrogate(new, old, torch.tensor([1.0]), 0.2, clip_eps_high=0.28)
    # A > 0: upper bound 1.28, so 1.25 stays, 1.4 -> 1.28; rho = 0.7 keeps its unclipped 0.7
    assert surrogate[0].tolist() == pytest.approx([1.25, 1.28, 0.7])
    assert clipped[0].tolist() == [False, True, False]
    surrogate, clipped = clipped_surrogate(new, old, torch.tensor([-1.0]), 0.2, clip_eps_high=0.28)
    # A < 0: the lower bound is still 1 - 0.2: min(-0.7, -0.8) = -0.8 is clipped
    assert surrogate[0].tolist() == pytest.approx([-1.25, -1.4, -0.8])
    assert clipped[0].tolist() == [False, False, True]


def test_kl_estimators_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.2]]))
    ref = torch.log(torch.tensor([[0.25, 0.4]]))
    mask = torch.ones(1, 2)
    with pytest.raises(ValueError, match="must be k3"):
        grpo_loss(logp, logp, ref, torch.tensor([0.0]), mask, beta=0.1, kl_estimator="k1")
    # no KL term: the loss is the surrogate alone, the reference may be absent, KL unmeasured
    for kwargs in ({"kl_estimator": "none"}, {"beta": 0.0}):
        parts = grpo_loss(logp, logp, None, torch.tensor([2.0]), mask, **kwargs)
        assert parts.loss.item() == pytest.approx(-2.0) and math.isnan(parts.kl.item())
    with pytest.raises(ValueError, match="needs the reference logprobs"):
        grpo_loss(logp, logp, None, torch.tensor([0.0]), mask, beta=0.1)


def test_grpo_config_refuses_unknown_options():
    from common.config import GRPOConfig

    with pytest.raises(ValueError, match="grpo.loss_agg must be one of"):
        GRPOConfig(loss_agg="sum")
    with pytest.raises(ValueError, match="grpo.kl_estimator must be one of"):
        GRPOConfig(kl_estimator="k2")
    with pytest.raises(ValueError, match=r"clip_eps_high \(0.1\) must be >= grpo.clip_eps"):
        GRPOConfig(clip_eps_high=0.1)
    with pytest.raises(ValueError, match="grpo.learner_pass must be"):
        GRPOConfig(learner_pass="batched")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_log_ratio_of_100_gives_a_finite_loss_and_gradient(dtype):
    """exp(100) overflows fp32 and bf16: without the clamp before exp, k3's clamp of inf and the
    ratio's clip leave NaN gradients (0 x inf)."""
    logp = torch.tensor([[-101.0, -1.0]], dtype=dtype, requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0]], dtype=dtype)  # ref - logp = 100 on the first token
    old = torch.tensor([[-101.0, -101.0]], dtype=dtype)  # logp - old = 100 on the second
    parts = grpo_loss(logp, old, ref, torch.tensor([1.0]), torch.ones(1, 2), beta=0.1)
    parts.loss.backward()
    assert torch.isfinite(parts.loss) and torch.isfinite(logp.grad).all(), logp.grad
    assert torch.isfinite(parts.ratio_mean)
    # k3 at the clamp: exp(20) - 20 - 1 is far over KL_CLAMP, so the token's KL is 10
    assert k3_kl(logp.detach().float(), ref.float())[0, 0].item() == pytest.approx(10.0)
    # inside the bounds nothing changes: exp(0.5) - 0.5 - 1 exactly
    small = k3_kl(torch.tensor([[-1.5]]), torch.tensor([[-1.0]]))
    assert small.item() == pytest.approx(math.exp(0.5) - 1.5)


def test_the_unclamped_exp_is_what_made_the_gradient_nan():
    """The failure the clamp removes, shown on the formula it replaced."""
    logp = torch.tensor([-101.0], requires_grad=True)
    delta = torch.tensor([-1.0]) - logp
    torch.clamp(torch.exp(delta) - delta - 1.0, -10, 10).sum().backward()
    assert torch.isnan(logp.grad).all()


def test_logits_are_divided_by_the_temperature_in_fp32():
    from learner.grpo_learner import at_temperature

    torch.manual_seed(0)
    exact = torch.randn(4, 1000) * 8  # fp32 logits of a wide vocabulary
    logits = exact.to(torch.bfloat16)
    scaled = at_temperature(logits, 0.7)
    assert scaled.dtype == torch.float32
    assert torch.equal(scaled, logits.float() / 0.7)
    assert at_temperature(logits, 1.0).dtype == torch.float32
    # what dividing in bf16 would cost, in log-probabilities: measurable, and avoided
    reference = torch.log_softmax(logits.float() / 0.7, dim=-1)
    in_bf16 = torch.log_softmax((logits / 0.7).float(), dim=-1)
    assert (in_bf16 - reference).abs().max() > 1e-2
    assert torch.equal(torch.log_softmax(scaled, dim=-1), reference)
