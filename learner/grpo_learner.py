"""The GRPO learner: a DeepSpeed engine over the LoRA policy, updated on groups of rollouts."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from learner.config import GRPOConfig
from learner.grpo import grpo_loss, token_entropy
from learner.policy import (
    adapter_grad_norm,
    build_engine,
    completion_logits,
    deepspeed_config,
    encode_prompt,
    load_lora_policy,
    resolve_precision,
    save_adapter,
    save_merged,
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
    old_logprobs: tuple[float, ...]  # log pi_old of each completion token (from rollout)
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
        if len(ex.completion_ids) != len(ex.old_logprobs):
            raise BatchError(
                f"completion {i}: {len(ex.completion_ids)} tokens but "
                f"{len(ex.old_logprobs)} old logprobs"
            )
        if not all(math.isfinite(v) for v in ex.old_logprobs):
            raise BatchError(f"completion {i}: old logprobs contain NaN or infinity")
        if not math.isfinite(ex.advantage):
            raise BatchError(
                f"completion {i}: advantage {ex.advantage} is not finite (NaN or infinite reward?)"
            )


class GRPOLearner:
    def __init__(
        self,
        model_path: Path,
        cfg: GRPOConfig,
        group_size: int,
        total_steps: int,
        adapter: Path | None = None,
    ):
        self.cfg = cfg
        self.model_path = Path(model_path)
        self.precision = resolve_precision(cfg.precision)
        model, self.processor = load_lora_policy(
            self.model_path, cfg.lora, self.precision, cfg.gradient_checkpointing, adapter
        )
        self.batch_len = cfg.batch_size * group_size
        ds = deepspeed_config(
            cfg.lr, cfg.weight_decay, cfg.grad_clip, cfg.zero_stage, self.precision, self.batch_len
        )
        self.engine = build_engine(model, ds, total_steps * cfg.updates_per_batch, cfg.warmup_ratio)
        # No dropout while learning from rollouts: pi must equal pi_old before the first update.
        self.engine.module.eval()
        self.updates = 0

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
        for _ in range(self.cfg.updates_per_batch):
            totals = {"loss": 0.0, "kl": 0.0, "clip": 0.0, "entropy": 0.0}
            tokens = 0
            grad_norm = float("nan")
            for i, (ex, seq, ref) in enumerate(zip(batch, encoded, refs)):
                logits = completion_logits(self.engine, seq, self.device)
                logp = token_logprobs(logits, seq.completion_ids)
                old = torch.tensor(ex.old_logprobs, dtype=logp.dtype, device=logp.device)
                parts = grpo_loss(
                    logp[None],
                    old[None],
                    ref.to(logp.device)[None],
                    torch.tensor([ex.advantage], dtype=logp.dtype, device=logp.device),
                    torch.ones_like(logp)[None],
                    self.cfg.clip_eps,
                    self.cfg.beta,
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
                totals["entropy"] += token_entropy(logits.detach()).mean().item() / len(batch)
            self.updates += 1
        return StepMetrics(
            loss=totals["loss"],
            kl=totals["kl"],
            clip_fraction=totals["clip"] / tokens,
            entropy=totals["entropy"],
            grad_norm=grad_norm,
            lr=float(self.engine.get_lr()[0]),
            tokens=tokens,
        )

    def export(self, out_dir: Path, version: int) -> WeightUpdate:
        """Weights for the rollout engines: the adapter (or merged weights) with a version."""
        out_dir = Path(out_dir)
        if self.cfg.export == "merged":
            return WeightUpdate(
                version,
                weights_dir=save_merged(
                    self.engine, self.processor, self.model_path, out_dir / f"merged-v{version}"
                ),
            )
        return WeightUpdate(
            version,
            adapter_dir=save_adapter(self.engine, self.processor, out_dir / f"adapter-v{version}"),
        )

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
