"""GRPO's algorithm as pure functions over tensors (advantages, clipped surrogate, KL, loss).

Symbols follow the paper: G completions o_i per prompt with rewards r_i; group-normalised
advantage A_i = (r_i - mean(r)) / (std(r) + eps); per-token ratio rho_i,t = pi(o_i,t) /
pi_old(o_i,t); loss = -(1/G) sum_i (1/|o_i|) sum_t [min(rho A_i, clip(rho, 1-eps, 1+eps) A_i)
- beta KL_t(pi || pi_ref)].

Choices made here:
- std is the population standard deviation of the group (``unbiased=False``); a group whose
  rewards are all equal gets A_i = 0 for every i (and is counted, see ``zero_std_groups``).
- KL uses the k3 estimator of DeepSeekMath/R1, per token: exp(ref - new) - (ref - new) - 1,
  which is unbiased for KL(pi || pi_ref) and always >= 0. It grows exponentially in ref - new, so
  one token far from the reference could swamp the loss: each token's value is clamped to
  [-10, 10] (as verl's ``low_var_kl``; the lower bound never binds since k3 >= 0).
- Log-ratios are clamped to [-20, 20] before ``exp`` (the KL's ref - new and the surrogate's
  new - old): exp overflows fp32 near 89 (bf16 too), and clamping exp's inf afterwards leaves a
  0 x inf = NaN gradient that would poison the adapter. Inside the bounds nothing changes;
  beyond them the token's gradient is 0 (a token that far from the old or the reference
  policy is dropped from the update, not turned into NaN).
- The clip fraction counts the tokens where clipping changes the loss (the clipped term is the
  one taken: rho > 1 + eps with A > 0, or rho < 1 - eps with A < 0), the usual PPO statistic;
  a ratio outside the range on the other side is not clipped (min keeps the unclipped term).
- Truncated importance sampling (optional): the sampler (vLLM) and the learner compute
  slightly different probabilities of the same tokens. With ``is_weights`` w_t =
  min(pi_old_learner / pi_sampler, C), detached, the surrogate of each token is multiplied by
  w_t, correcting for that gap; the KL term is not weighted.
- Aggregation (``loss_agg``): ``seq_mean_token_mean`` (the paper, default) is the mean over the
  tokens of each completion, then over completions (the 1/G sum of 1/|o_i| sums above), so every
  completion weighs the same whatever its length; ``token_mean`` (DAPO) is the mean over all
  tokens of the batch, so long completions weigh more; ``seq_sum_norm`` (Dr. GRPO) sums each
  completion's tokens and divides by a constant, the longest allowed completion L_max, then
  takes the mean over completions, so no length normalisation biases the gradient.
- Clip-higher (DAPO, optional): the ratio is clipped to [1 - eps, 1 + eps_high] with
  eps_high >= eps, letting unlikely tokens with A > 0 grow further before clipping.
- KL estimators: ``k3`` (above, default); with ``none`` or beta = 0 the KL term is dropped and
  the learner skips the reference pass. There is no ``k1`` (log pi - log pi_ref) in the loss:
  its expected gradient under samples of pi is 0 (E[grad log pi] = 0), so as a loss term it does
  not regularise at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.config import LOSS_AGGREGATIONS, SCALES


def group_advantages(
    rewards: torch.Tensor, eps: float = 1e-6, scale: str = "group"
) -> torch.Tensor:
    """A_i = (r_i - mean_g r) / (std + eps) for rewards of shape (B, G); returns (B, G).

    ``scale``: ``group`` divides by each group's std (the paper); ``batch`` by the std of every
    reward of the batch; ``none`` leaves A_i = r_i - mean_g r (Dr. GRPO), so a group whose
    rewards differ only a little gets small advantages instead of unit-sized ones.
    """
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be (prompts, G), got shape {tuple(rewards.shape)}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if scale == "group":
        return centred / (rewards.std(dim=1, unbiased=False, keepdim=True) + eps)
    if scale == "batch":
        return centred / (rewards.std(unbiased=False) + eps)
    if scale == "none":
        return centred
    raise ValueError(f"advantage scale must be one of {', '.join(SCALES)}, got {scale!r}")


def zero_std_groups(rewards: torch.Tensor, tol: float = 1e-8) -> int:
    """How many groups have identical rewards (zero advantage: no learning signal)."""
    return int((rewards.std(dim=1, unbiased=False) <= tol).sum())


KL_CLAMP = 10.0  # per-token bound of the k3 estimate (verl's low_var_kl uses the same)
LOG_RATIO_CLAMP = 20.0  # bound of a log-ratio before exp (verl clamps at the same)


def safe_exp_log_ratio(log_ratio: torch.Tensor) -> torch.Tensor:
    """exp of a log-ratio clamped to [-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP]: finite, with a finite
    gradient (0 outside the bounds), in fp32 and bf16."""
    return torch.exp(torch.clamp(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): exp(ref - logp) - (ref - logp) - 1, with
    ref - logp clamped to [-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP] and the estimate to
    [-KL_CLAMP, KL_CLAMP]."""
    delta = torch.clamp(ref_logp - logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.clamp(torch.exp(delta) - delta - 1.0, -KL_CLAMP, KL_CLAMP)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL estimate by name: ``k3``."""
    if estimator == "k3":
        return k3_kl(logp, ref_logp)
    raise ValueError(f"KL estimator must be k3 (or none: no KL), got {estimator!r}")


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float,
    clip_eps_high: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token min(rho A, clip(rho, 1-eps, 1+eps_high) A) and whether the clipped term was
    taken (clipping changed the loss: rho > 1 + eps_high with A > 0, or rho < 1 - eps with
    A < 0). ``clip_eps_high`` None: eps_high = eps (symmetric, the paper's form).

    ``logp``/``old_logp`` are (N, T); ``advantages`` (N,) broadcast over tokens.
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = safe_exp_log_ratio(logp - old_logp)
    adv = advantages[:, None]
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + high) * adv)
    clipped = ((ratio > 1 + high) & (adv > 0)) | ((ratio < 1 - clip_eps) & (adv < 0))
    return surrogate, clipped


def masked_mean_per_row(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of each row over its masked-in tokens: (N, T) -> (N,)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def aggregate_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    loss_agg: str = "seq_mean_token_mean",
    token_count: float | None = None,
    max_tokens: int | None = None,
) -> torch.Tensor:
    """Per-token losses (N, T) to one scalar by ``loss_agg`` (see the module docstring).

    ``token_count`` (``token_mean``): the count dividing the token sum; None is this call's own
    token count. A batch split into M equal micro-batches whose losses are averaged passes the
    batch's count over M, so that the average is the batch's token mean.
    ``max_tokens`` (``seq_sum_norm``): L_max, the constant each completion's sum is divided by.
    """
    maskf = mask.to(per_token.dtype)
    if loss_agg == "seq_mean_token_mean":
        return masked_mean_per_row(per_token, mask).mean()
    if loss_agg == "token_mean":
        count = maskf.sum().clamp(min=1.0) if token_count is None else token_count
        return (per_token * maskf).sum() / count
    if loss_agg == "seq_sum_norm":
        if not max_tokens or max_tokens <= 0:
            raise ValueError(f"seq_sum_norm needs max_tokens (L_max) > 0, got {max_tokens}")
        return (per_token * maskf).sum(dim=1).mean() / max_tokens
    raise ValueError(f"loss_agg must be one of {', '.join(LOSS_AGGREGATIONS)}, got {loss_agg!r}")


@dataclass(frozen=True)
class LossParts:
    loss: torch.Tensor  # scalar to minimise
    kl: torch.Tensor  # per-token KL estimate, mean per completion then over them (NaN: no KL)
    clip_fraction: torch.Tensor  # share of completion tokens where clipping changed the loss
    ratio_mean: torch.Tensor


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    beta: float = 0.01,
    is_weights: torch.Tensor | None = None,
    clip_eps_high: float | None = None,
    kl_estimator: str = "k3",
    loss_agg: str = "seq_mean_token_mean",
    token_count: float | None = None,
    max_tokens: int | None = None,
) -> LossParts:
    """The GRPO loss of N completions (tensors (N, T), ``mask`` 1 on completion tokens).

    ``is_weights`` (N, T), optional: truncated importance weights min(pi_old / pi_sampler, C)
    multiplying each token's surrogate (see the module docstring); treated as constants.
    ``ref_logp`` may be None when there is no KL term (``kl_estimator="none"`` or beta = 0);
    the reported KL is then NaN (not measured). ``loss_agg``, ``token_count`` and
    ``max_tokens``: see :func:`aggregate_loss`. The reported KL is always the per-completion
    token mean, whatever the loss's aggregation.
    """
    surrogate, clipped = clipped_surrogate(logp, old_logp, advantages, clip_eps, clip_eps_high)
    if is_weights is not None:
        surrogate = surrogate * is_weights.detach()
    per_token = -surrogate
    kl_value = torch.tensor(float("nan"))
    if kl_estimator != "none" and beta != 0.0:
        if ref_logp is None:
            raise ValueError("a KL term (beta > 0) needs the reference logprobs")
        kl = kl_estimate(logp, ref_logp, kl_estimator)
        per_token = per_token + beta * kl
        kl_value = masked_mean_per_row(kl, mask).mean().detach()
    loss = aggregate_loss(per_token, mask, loss_agg, token_count, max_tokens)
    maskf = mask.to(logp.dtype)
    return LossParts(
        loss=loss,
        kl=kl_value,
        clip_fraction=((clipped.to(logp.dtype) * maskf).sum() / maskf.sum().clamp(min=1)).detach(),
        ratio_mean=(
            (safe_exp_log_ratio(logp - old_logp) * maskf).sum() / maskf.sum().clamp(min=1)
        ).detach(),
    )


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution at each position: (..., V) -> (...)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def truncated_is_weights(
    learner_logp: torch.Tensor, sampler_logp: torch.Tensor, cap: float
) -> torch.Tensor:
    """w_t = min(pi_old(o_t) / pi_sampler(o_t), C): the learner's probability of a sampled token
    over the sampler's, truncated at ``cap`` (truncated importance sampling)."""
    if cap <= 0:
        raise ValueError(f"the importance-weight cap must be > 0, got {cap}")
    return torch.exp(learner_logp - sampler_logp).clamp(max=cap)
