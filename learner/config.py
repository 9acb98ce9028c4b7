"""Settings of the learner: the LoRA cold start (SFT) and the GRPO update, paper values default."""

from __future__ import annotations

from dataclasses import dataclass

LOSS_AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_sum_norm")
KL_ESTIMATORS = ("k3", "k1", "none")
SCALES = ("group", "batch", "none")  # what the centred rewards are divided by


@dataclass
class LoraSettings:
    rank: int = 128  # LoRA rank on all linear layers of the language model (paper: 128)
    alpha: int = 256  # LoRA scaling numerator (alpha / rank = 2)
    # Dropout on the LoRA branch; None: 0.05 for SFT, 0 for GRPO (whose pi must equal pi_old, so
    # GRPO refuses any other value).
    dropout: float | None = None
    # Linear layers that get LoRA: every projection of the language model. The vision tower and
    # merger stay frozen, as vLLM serves LoRA on the language model only.
    target_modules: str = (
        r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|"
        r"down_proj)"
    )


@dataclass
class SFTConfig:
    lr: float = 2e-5  # paper: 2e-5
    epochs: int = 1  # paper: 1
    batch_size: int = 2  # sequences per optimizer step per GPU (paper: 2)
    warmup_ratio: float = 0.1  # paper: 0.1, then cosine decay
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # gradient norm clip
    precision: str = "auto"  # "auto": bf16 where the hardware has it, else fp32; or bf16 | fp32
    gradient_checkpointing: bool = True  # paper: on
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0-3
    top_k: int | None = None  # Top-K for key slices, given for 64 slices; None = data.top_k
    max_steps: int | None = None  # stop early after this many optimizer steps (smoke runs)
    checkpoint_every: int = 50  # optimizer steps between resumable checkpoints
    # An SFT adapter to start from and keep training (its own rank and layers; sft.lora is then
    # unused), e.g. the cold start continued for as many sample passes as GRPO made (the default
    # run's "SFT (equal updates)" control); null: a fresh adapter (the paper's cold start)
    init_adapter: str | None = None
    lora: LoraSettings = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.lora is None:
            self.lora = LoraSettings()
        if self.lora.dropout is None:
            self.lora.dropout = 0.05


@dataclass
class GRPOConfig:
    lr: float = 2e-6  # paper: 2e-6
    epochs: int = 3  # passes over the training prompts (paper: 3)
    batch_size: int = 1  # prompts per update per GPU (paper: 1); each brings G completions
    updates_per_batch: int = 1  # optimizer updates on one batch of rollouts (mu)
    clip_eps: float = (
        0.2  # PPO clip range eps (the paper gives none; 0.2 is PPO's and GRPO's usual)
    )
    # Upper clip range eps_high (DAPO's clip-higher); None: eps_high = clip_eps (the paper's form)
    clip_eps_high: float | None = None
    beta: float = 0.01  # KL weight (paper: 0.01); 0 drops the KL term and the reference pass
    kl_estimator: str = "k3"  # per-token KL estimate: k3 (paper), k1, or none (no reference pass)
    # Loss aggregation: seq_mean_token_mean (paper: 1/G sum_i 1/|o_i| sum_t), token_mean (DAPO),
    # seq_sum_norm (Dr. GRPO: each completion's token sum over rollout.max_tokens)
    loss_agg: str = "seq_mean_token_mean"
    # How the learner runs a group: "grouped" packs the prompt once with its G completions (one
    # pass per group, vision tower once per step); "per_completion" runs prompt + completion
    # for each completion (the reference path, and the fallback for flash attention).
    learner_pass: str = "grouped"
    adv_eps: float = 1e-6  # added to the group std in A_i = (r_i - mean) / (std + eps)
    # What A_i's centred reward is divided by: group (the group's std, the paper), batch (the
    # std of the whole batch's rewards) or none (Dr. GRPO: A_i = r_i - mean)
    scale_rewards: str = "group"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    precision: str = "auto"
    gradient_checkpointing: bool = True
    zero_stage: int = 2
    max_steps: int | None = None  # stop after this many GRPO steps (smoke runs, tests)
    export: str = "adapter"  # weights pushed to rollout: "adapter" (LoRA) or "merged"
    # Truncated importance sampling for the sampler/learner gap: each token's surrogate times
    # min(pi_old_learner / pi_vllm, tis_cap). None: off (the paper has no such correction).
    tis_cap: float | None = None
    # One-step off-policy overlap (a deviation from the paper, off by default): the rollout of
    # batch t+1 runs on the previous weights while the learner learns on batch t; staleness is
    # at most one version (logged as rollout/staleness). Needs tis_cap, which corrects for it.
    overlap: bool = False
    # Dynamic sampling (DAPO; off by default): drop groups whose rewards are all equal (zero
    # advantage) and draw more prompts to refill the batch, at most this many extra rounds; a
    # batch still short is topped up with dropped groups. Logged as data/dropped_group_share.
    dynamic_sampling: bool = False
    dynamic_sampling_rounds: int = 3
    # An SFT term in every update (InstructGPT's PPO-ptx; 0, the paper's GRPO, by default): the
    # loss adds sft_coef x the token-mean cross-entropy of cold-start target answers (the mask's
    # evidence anchor) of grpo.batch_size training samples drawn at random each step, so the
    # answers of targets a batch does not ask about are held where SFT put them.
    sft_coef: float = 0.0
    lora: LoraSettings = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.lora is None:
            self.lora = LoraSettings()
        if self.lora.dropout is None:
            self.lora.dropout = 0.0
        if self.overlap and self.tis_cap is None:
            raise ValueError(
                "grpo.overlap samples each batch with the previous weights: set grpo.tis_cap "
                "(e.g. 2.0) so truncated importance sampling corrects for it"
            )
        if self.dynamic_sampling_rounds < 0:
            raise ValueError(
                f"grpo.dynamic_sampling_rounds must be >= 0, got {self.dynamic_sampling_rounds}"
            )
        if self.lora.dropout != 0.0:
            raise ValueError(
                f"grpo.lora.dropout must be 0 (pi must equal pi_old), got {self.lora.dropout}"
            )
        if not self.sft_coef >= 0:
            raise ValueError(f"grpo.sft_coef must be >= 0, got {self.sft_coef}")
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ValueError(f"grpo.tis_cap must be > 0 or null, got {self.tis_cap}")
        if self.loss_agg not in LOSS_AGGREGATIONS:
            raise ValueError(
                f"grpo.loss_agg must be one of {', '.join(LOSS_AGGREGATIONS)}, "
                f"got {self.loss_agg!r}"
            )
        if self.scale_rewards not in SCALES:
            raise ValueError(
                f"grpo.scale_rewards must be one of {', '.join(SCALES)}, got {self.scale_rewards!r}"
            )
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(
                f"grpo.kl_estimator must be one of {', '.join(KL_ESTIMATORS)}, "
                f"got {self.kl_estimator!r}"
            )
        if self.clip_eps_high is not None and self.clip_eps_high < self.clip_eps:
            raise ValueError(
                f"grpo.clip_eps_high ({self.clip_eps_high}) must be >= grpo.clip_eps "
                f"({self.clip_eps})"
            )
        if self.learner_pass not in ("grouped", "per_completion"):
            raise ValueError(
                f"grpo.learner_pass must be 'grouped' or 'per_completion', "
                f"got {self.learner_pass!r}"
            )
        if self.export not in ("adapter", "merged"):
            raise ValueError(f"grpo.export must be 'adapter' or 'merged', got {self.export!r}")
