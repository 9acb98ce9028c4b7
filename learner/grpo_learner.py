"""The GRPO learner: a DeepSpeed engine over the LoRA policy, updated on groups of rollouts.

pi_old is the learner's own probability of each sampled token under the weights that sampled
it, not the sampler's: vLLM's logprobs differ from the learner's by kernels, precision and how
LoRA is applied, and a ratio built on them would start away from 1 and clip on noise. The first
update's forward pass runs on exactly those weights (the optimizer steps only at the end of the
batch), so its detached logprobs are pi_old at no extra cost; vLLM's logprobs are kept to
report the sampler/learner gap, and to weight tokens when truncated importance sampling is on.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from learner.config import GRPOConfig
from learner.grpo import grpo_loss, token_entropy, truncated_is_weights
from learner.policy import (
    adapter_grad_norm,
    build_engine,
    completion_logits,
    deepspeed_config,
    encode_prompt,
    load_lora_policy,
    merge_adapter,
    resolve_precision,
    save_adapter,
    save_merged,
    save_stacked_adapter,
    token_logprobs,
    with_completion,
)
from rollout.records import WeightUpdate

log = logging.getLogger(__name__)


class BatchError(ValueError):
    """A training batch that cannot be used; raised before any weight changes."""


@dataclass(frozen=True)
class GRPOExample:
    """One completion to learn from: its prompt, tokens, sampling logprobs and advantage."""

    messages: list[dict]
    completion_ids: tuple[int, ...]
    sampler_logprobs: tuple[float, ...]  # log-probability of each token under the sampler (vLLM)
    advantage: float  # A_i of the completion within its group


@dataclass(frozen=True)
class StepMetrics:
    loss: float
    kl: float
    clip_fraction: float
    entropy: float
    grad_norm: float
    lr: float
    tokens: int
    logprob_gap_mean: float  # mean |log pi_old (learner) - log pi (sampler)| over tokens
    logprob_gap_max: float  # its largest value in the batch
    ratio_mean: float  # mean pi / pi_old over tokens at the last update (1 with one update)


def validate_batch(batch: list[GRPOExample], expected: int) -> None:
    """Every check that must pass before the weights may change."""
    if not batch:
        raise BatchError("empty batch")
    if len(batch) != expected:
        raise BatchError(
            f"batch has {len(batch)} completions, the learner was built for "
            f"{expected} (grpo.batch_size x rollout.group_size)"
        )
    for i, ex in enumerate(batch):
        if len(ex.completion_ids) == 0:
            raise BatchError(f"completion {i} has no tokens")
        if len(ex.completion_ids) != len(ex.sampler_logprobs):
            raise BatchError(
                f"completion {i}: {len(ex.completion_ids)} tokens but "
                f"{len(ex.sampler_logprobs)} sampler logprobs"
            )
        if not all(math.isfinite(v) for v in ex.sampler_logprobs):
            raise BatchError(f"completion {i}: sampler logprobs contain NaN or infinity")
        if not math.isfinite(ex.advantage):
            raise BatchError(
                f"completion {i}: advantage {ex.advantage} is not finite (NaN or infinite reward?)"
            )


class GRPOLearner:
    """GRPO on a fresh LoRA adapter over the base with ``sft_adapter`` merged in (when given):
    the reference policy, the adapter disabled, is then the SFT policy."""

    def __init__(
        self,
        model_path: Path,
        cfg: GRPOConfig,
        group_size: int,
        total_steps: int,
        sft_adapter: Path | None = None,
    ):
        self.cfg = cfg
        self.model_path = Path(model_path)
        self.sft_adapter = Path(sft_adapter) if sft_adapter is not None else None
        self.precision = resolve_precision(cfg.precision)
        model, self.processor = load_lora_policy(
            self.model_path,
            cfg.lora,
            self.precision,
            cfg.gradient_checkpointing,
            merge=self.sft_adapter,
        )
        self.batch_len = cfg.batch_size * group_size
        ds = deepspeed_config(
            cfg.lr, cfg.weight_decay, cfg.grad_clip, cfg.zero_stage, self.precision, self.batch_len
        )
        self.engine = build_engine(model, ds, total_steps * cfg.updates_per_batch, cfg.warmup_ratio)
        # Training mode, so gradient checkpointing takes effect; the GRPO adapter has no dropout
        # (GRPOConfig refuses any), so pi still equals pi_old before the first update.
        self.engine.module.train()
        self.updates = 0
        self.policy_base = self.model_path  # the weights the adapter sits on, as a folder

    def write_policy_base(self, out_dir: Path) -> Path:
        """The folder of weights the rollout engines serve under this adapter: the base with the
        SFT adapter merged (written once, kept across resumes), or the base itself."""
        if self.sft_adapter is None:
            return self.model_path
        import hashlib

        out_dir = Path(out_dir)
        marker = out_dir / "merged_from.txt"
        # By content: an SFT re-run writes a new adapter to the same folder.
        digest = hashlib.sha256()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            digest.update((self.sft_adapter / name).read_bytes())
        source = f"{self.model_path.resolve()}\n{digest.hexdigest()}\n"
        if not (marker.exists() and marker.read_text() == source):
            merge_adapter(self.model_path, self.sft_adapter, out_dir)
            marker.write_text(source)
        self.policy_base = out_dir
        return out_dir

    @property
    def device(self):
        return self.engine.device

    def _reference_logprobs(self, seq) -> torch.Tensor:
        with torch.no_grad(), self.engine.module.disable_adapter():
            logits = completion_logits(self.engine.module, seq, self.device)
            return token_logprobs(logits, seq.completion_ids)

    def step(self, batch: list[GRPOExample]) -> StepMetrics:
        """``updates_per_batch`` optimizer updates on one batch; metrics of the last one."""
        validate_batch(batch, self.batch_len)
        # The G completions of a prompt share its messages: run the processor (images) once.
        prompts: dict[int, dict] = {}
        for ex in batch:
            if id(ex.messages) not in prompts:
                prompts[id(ex.messages)] = encode_prompt(self.processor, ex.messages)
        encoded = [
            with_completion(prompts[id(ex.messages)], list(ex.completion_ids)) for ex in batch
        ]
        refs = [self._reference_logprobs(seq) for seq in encoded]
        olds: list[torch.Tensor] = []  # log pi_old per completion, from the first update's pass
        gaps: list[torch.Tensor] = []
        for update in range(self.cfg.updates_per_batch):
            totals = {"loss": 0.0, "kl": 0.0, "clip": 0.0, "entropy": 0.0, "ratio": 0.0}
            tokens = 0
            grad_norm = float("nan")
            for i, (ex, seq, ref) in enumerate(zip(batch, encoded, refs)):
                logits = completion_logits(self.engine, seq, self.device)
                logp = token_logprobs(logits, seq.completion_ids)
                sampler = torch.tensor(ex.sampler_logprobs, dtype=logp.dtype, device=logp.device)
                if update == 0:
                    olds.append(logp.detach())
                    gaps.append((olds[i] - sampler).abs())
                weights = None
                if self.cfg.tis_cap is not None:
                    weights = truncated_is_weights(olds[i], sampler, self.cfg.tis_cap)[None]
                parts = grpo_loss(
                    logp[None],
                    olds[i][None],
                    ref.to(logp.device)[None],
                    torch.tensor([ex.advantage], dtype=logp.dtype, device=logp.device),
                    torch.ones_like(logp)[None],
                    self.cfg.clip_eps,
                    self.cfg.beta,
                    weights,
                )
                self.engine.backward(parts.loss)  # DeepSpeed averages over the batch
                if i == len(batch) - 1:
                    grad_norm = adapter_grad_norm(self.engine)
                self.engine.step()  # steps the optimizer at the end of the batch only
                n = len(ex.completion_ids)
                tokens += n
                totals["loss"] += parts.loss.item() / len(batch)
                totals["kl"] += parts.kl.item() / len(batch)
                totals["clip"] += parts.clip_fraction.item() * n
                totals["ratio"] += parts.ratio_mean.item() * n
                totals["entropy"] += token_entropy(logits.detach()).mean().item() / len(batch)
            self.updates += 1
        gap = torch.cat(gaps)
        return StepMetrics(
            loss=totals["loss"],
            kl=totals["kl"],
            clip_fraction=totals["clip"] / tokens,
            entropy=totals["entropy"],
            grad_norm=grad_norm,
            lr=float(self.engine.get_lr()[0]),
            tokens=tokens,
            logprob_gap_mean=float(gap.mean()),
            logprob_gap_max=float(gap.max()),
            ratio_mean=totals["ratio"] / tokens,
        )

    def export(self, out_dir: Path, version: int) -> WeightUpdate:
        """Weights for the rollout engines, which serve :meth:`write_policy_base`'s folder: the
        adapter (or the merged weights) with a version."""
        out_dir = Path(out_dir)
        if self.cfg.export == "merged":
            return WeightUpdate(
                version,
                weights_dir=save_merged(
                    self.engine, self.processor, self.policy_base, out_dir / f"merged-v{version}"
                ),
            )
        return WeightUpdate(
            version,
            adapter_dir=save_adapter(self.engine, self.processor, out_dir / f"adapter-v{version}"),
        )

    def export_final(self, out_dir: Path) -> Path:
        """The trained policy as one adapter on the original base (SFT and GRPO adapters
        stacked, or the GRPO adapter alone when there was no SFT), for evaluate and predict."""
        if self.sft_adapter is None:
            return save_adapter(self.engine, self.processor, Path(out_dir))
        return save_stacked_adapter(self.engine, self.processor, self.sft_adapter, Path(out_dir))

    def save_checkpoint(self, folder: Path, tag: str, client_state: dict) -> None:
        """Adapter, optimizer and scheduler state (DeepSpeed's format) plus ``client_state``."""
        self.engine.save_checkpoint(
            str(folder), tag=tag, client_state=client_state, exclude_frozen_parameters=True
        )

    def load_checkpoint(self, folder: Path, tag: str | None = None) -> dict:
        _, client_state = self.engine.load_checkpoint(
            str(folder), tag=tag, load_module_strict=False
        )
        if client_state is None:
            raise FileNotFoundError(f"no learner checkpoint in {folder}")
        return client_state
