"""The GRPO learner: a DeepSpeed engine over the LoRA policy, updated on groups of rollouts.

pi_old is the learner's own probability of each sampled token under the weights that sampled
it, not the sampler's: vLLM's logprobs differ from the learner's by kernels, precision and how
LoRA is applied, and a ratio built on them would start away from 1 and clip on noise. The first
update's forward pass runs on exactly those weights (the optimizer steps only at the end of the
batch), so its detached logprobs are pi_old at no extra cost; vLLM's logprobs are kept to
report the sampler/learner gap, and to weight tokens when truncated importance sampling is on.

Data-parallel (``WORLD_SIZE`` ranks, see ``learner.engine.setup_rank``): each rank learns on an
equal share of the batch's groups (:func:`split_groups`) and DeepSpeed all-reduces the
gradients, so one update equals one single-rank update on the whole batch. Everything a rank
normalises by is the whole batch's: DeepSpeed averages over every rank's micro-batches, a
token-mean loss divides by the whole batch's token count (``batch_tokens``), and each rank's
metrics are its part of the batch's means, so :func:`combine_metrics` adds them up.

Two checks guard the weights: each prompt's token ids must equal the ones the rollout engine
sampled from (:func:`check_prompt_ids`, before anything runs), and an update whose loss or
gradient is not finite on any rank is skipped, not applied, and counted
(``StepMetrics.skipped_updates``; learner.engine.skip_update).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from common.config import GRPOConfig
from learner.adapters import merged_state, save_adapter, save_merged, save_stacked_adapter
from learner.encoding import (
    EncodedSequence,
    PackedGroup,
    check_packing,
    completion_logits,
    encode,
    encode_prompt,
    group_completion_logits,
    pack_group,
    target_ids,
    token_logprobs,
    vision_features,
    with_completion,
)
from learner.engine import (
    adapter_grad_norm,
    all_finite,
    build_engine,
    deepspeed_config,
    load_lora_policy,
    resolve_precision,
    skip_update,
    world_size,
)
from learner.grpo import LossParts, grpo_loss, token_entropy, truncated_is_weights
from learner.training_frame import TrainingFrame
from rollout.hf_engine import merge_adapter
from rollout.records import WeightUpdate

log = logging.getLogger(__name__)


class BatchError(ValueError):
    """A training batch that cannot be used; raised before any weight changes."""


class PromptMismatchError(BatchError):
    """The learner tokenised a prompt differently from the rollout engine that sampled its
    completions: every logprob of those completions would be taken in another context."""


@dataclass(frozen=True)
class GRPOExample:
    """One completion to learn from: its prompt, tokens, sampling logprobs and advantage."""

    messages: list[dict]
    completion_ids: tuple[int, ...]
    sampler_logprobs: tuple[float, ...]  # log-probability of each token under the sampler (vLLM)
    advantage: float  # A_i of the completion within its group
    # The prompt as the rollout engine tokenised it (rollout Group.prompt_token_ids), checked
    # against the learner's own encoding; None only where no engine tokenised it (a batch
    # made up for a benchmark or a test).
    prompt_token_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class SFTExample:
    """A cold-start target an update also learns (``grpo.sft_coef``): a training prompt and
    the SFT target answer for it."""

    messages: list[dict]
    target: str  # the assistant's answer text (data.prompts.sft_target_text)


@dataclass(frozen=True)
class StepMetrics:
    """One step's metrics over the whole batch; from one rank of several, that rank's part of
    each mean (see :func:`combine_metrics`)."""

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
    sft_loss: float = 0.0  # mean cross-entropy of the SFT targets (0 without grpo.sft_coef)
    skipped_updates: int = 0  # updates of this step not applied: loss or gradient not finite


def at_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits as the sampler draws from them: in fp32, divided by the temperature (bf16 logits
    divided in bf16 land up to ~0.1 nats away from the sampler's log-probabilities)."""
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


def pad_rows(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths as one zero-padded (N, T) tensor and its 0/1 mask."""
    from torch.nn.utils.rnn import pad_sequence

    mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True)
    return pad_sequence(rows, batch_first=True), mask


def combine_metrics(parts: list[StepMetrics]) -> StepMetrics:
    """The batch's metrics from each rank's: parts of means add up, the largest gap is the
    largest of any rank, and the gradient norm (of the all-reduced gradient), learning rate and
    skipped updates are the same on every rank."""
    first = parts[0]
    total = {
        name: sum(getattr(p, name) for p in parts)
        for name in (
            "loss",
            "kl",
            "clip_fraction",
            "entropy",
            "tokens",
            "logprob_gap_mean",
            "ratio_mean",
            "sft_loss",
        )
    }
    return StepMetrics(
        **total,
        grad_norm=first.grad_norm,
        lr=first.lr,
        skipped_updates=first.skipped_updates,
        logprob_gap_max=max(p.logprob_gap_max for p in parts),
    )


def split_groups(batch: list[GRPOExample], parts: int) -> list[list[GRPOExample]]:
    """The batch as ``parts`` equal shares of whole groups (the completions of one prompt stay
    together, in order), one per data-parallel rank."""
    groups: dict[int, list[GRPOExample]] = {}
    for ex in batch:
        groups.setdefault(id(ex.messages), []).append(ex)
    ordered = list(groups.values())
    if len(ordered) % parts:
        raise BatchError(
            f"{len(ordered)} groups cannot be shared equally by {parts} learner ranks "
            "(grpo.batch_size must divide by grpo.num_learners)"
        )
    n = len(ordered) // parts
    return [[ex for g in ordered[i * n : (i + 1) * n] for ex in g] for i in range(parts)]


def check_prompt_ids(learner_ids: list[int], rollout_ids: tuple[int, ...], where: str) -> None:
    """Raise :class:`PromptMismatchError` unless the learner's prompt token ids equal the rollout
    engine's, naming both lengths and the first position where they differ."""
    rollout_ids = list(rollout_ids)
    if learner_ids == rollout_ids:
        return
    at = next(
        (k for k, (a, b) in enumerate(zip(learner_ids, rollout_ids)) if a != b),
        min(len(learner_ids), len(rollout_ids)),
    )

    def token(ids: list[int]) -> str:
        return str(ids[at]) if at < len(ids) else "none (ended)"

    raise PromptMismatchError(
        f"{where}: the learner's prompt has {len(learner_ids)} tokens, the rollout engine's "
        f"{len(rollout_ids)}; they first differ at position {at} (learner token "
        f"{token(learner_ids)}, rollout token {token(rollout_ids)}). The two processors "
        "disagree (chat template, or image resizing: min_pixels / max_pixels)"
    )


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
        max_tokens: int | None = None,
        temperature: float = 1.0,
    ):
        self.cfg = cfg
        self.max_tokens = max_tokens  # L_max of loss_agg seq_sum_norm (rollout.max_tokens)
        if not temperature > 0:
            raise ValueError(
                f"rollout.temperature must be > 0 to learn from samples, got {temperature}"
            )
        # Tokens are scored under the distribution they were sampled from, logits / T (as TRL
        # and verl do): pi, pi_old and pi_ref alike.
        self.temperature = float(temperature)
        if cfg.loss_agg == "seq_sum_norm" and not max_tokens:
            raise ValueError("grpo.loss_agg seq_sum_norm needs max_tokens (rollout.max_tokens)")
        self.model_path = Path(model_path)
        self.sft_adapter = Path(sft_adapter) if sft_adapter is not None else None
        self.precision = resolve_precision(cfg.precision)
        model, self.processor = load_lora_policy(
            self.model_path,
            cfg.lora,
            self.precision,
            cfg.gradient_checkpointing,
            merge=self.sft_adapter,
            slice_size=cfg.slice_size,
        )
        # This rank's share of each batch: grpo.batch_size / WORLD_SIZE prompts.
        self.world = world_size()
        if cfg.batch_size % self.world:
            raise ValueError(
                f"grpo.batch_size ({cfg.batch_size}) must divide by the number of learner ranks "
                f"(grpo.num_learners = WORLD_SIZE = {self.world}): each takes an equal share"
            )
        self.prompts_per_rank = cfg.batch_size // self.world
        self.batch_len = self.prompts_per_rank * group_size
        self.learner_pass = cfg.learner_pass
        if self.learner_pass == "grouped":
            check_packing(model)
        # The vision tower's output can be reused across passes only while it is frozen.
        self.reuse_vision = not any(
            p.requires_grad for n, p in model.named_parameters() if ".visual." in n
        )
        micro_batches = self.prompts_per_rank if self.learner_pass == "grouped" else self.batch_len
        ds = deepspeed_config(
            cfg.lr, cfg.weight_decay, cfg.grad_clip, cfg.zero_stage, self.precision, micro_batches
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

    def _units(self, batch: list[GRPOExample]) -> list[list[int]]:
        """The micro-batches of a batch as lists of completion indices: one per group (the
        completions of one prompt) on the grouped pass, one per completion otherwise."""
        if self.learner_pass == "per_completion":
            return [[i] for i in range(len(batch))]
        groups: dict[int, list[int]] = {}
        for i, ex in enumerate(batch):
            groups.setdefault(id(ex.messages), []).append(i)
        units = list(groups.values())
        if len(units) != self.prompts_per_rank or len({len(u) for u in units}) != 1:
            share = " per learner rank" if self.world > 1 else ""
            raise BatchError(
                f"the grouped pass needs {self.prompts_per_rank} prompts{share} (grpo.batch_size"
                f" / {self.world}) with the same number of completions each, got "
                f"{[len(u) for u in units]} completions per prompt"
            )
        return units

    def _logits(self, model, unit: list[int], packed, seqs, vision) -> list[torch.Tensor]:
        """Logits predicting the completion tokens of one micro-batch, one tensor per completion
        (``packed``: the unit's packed group on the grouped pass, None per completion)."""
        if packed is None:
            logits = [completion_logits(model, seqs[i], self.device) for i in unit]
        else:
            logits = group_completion_logits(model, packed, self.device, vision)
        return [at_temperature(lg, self.temperature) for lg in logits]

    def step(
        self,
        batch: list[GRPOExample],
        batch_tokens: int | None = None,
        sft_batch: list[SFTExample] | None = None,
    ) -> StepMetrics:
        """``updates_per_batch`` optimizer updates on one batch (this rank's share of it, whose
        whole has ``batch_tokens`` completion tokens); metrics of the last one. With
        ``grpo.sft_coef`` > 0, ``sft_batch`` holds one SFT target per prompt of the share, and
        the update adds sft_coef x their mean cross-entropy (at temperature 1, the cold start's
        loss): each target rides on the micro-batch of its group's first completion."""
        validate_batch(batch, self.batch_len)
        if self.world > 1 and batch_tokens is None:
            raise BatchError("with several learner ranks, step needs the whole batch's tokens")
        units = self._units(batch)
        sft_seqs, sft_at, sft_weight = self._sft_targets(batch, units, sft_batch)
        seqs, packs, visions = self._encode(batch, units)
        refs = self._reference_logprobs(units, packs, visions, seqs)
        tokens = sum(len(ex.completion_ids) for ex in batch)
        # What the whole batch's means divide by: every rank's tokens, units and completions.
        all_tokens = tokens if batch_tokens is None else batch_tokens
        all_units = len(units) * self.world
        all_completions = len(batch) * self.world
        olds: list[torch.Tensor | None] = [None] * len(batch)  # log pi_old, from the first update
        gaps: list[torch.Tensor] = []
        skipped = 0
        for update in range(self.cfg.updates_per_batch):
            totals = {"loss": 0.0, "kl": 0.0, "clip": 0.0, "entropy": 0.0, "ratio": 0.0, "sft": 0.0}
            grad_norm = float("nan")
            backpropagated = 0.0  # this rank's sum of the losses its micro-batches backpropagate
            for u, (unit, packed, vision) in enumerate(zip(units, packs, visions)):
                logits = self._logits(self.engine, unit, packed, seqs, vision)
                logps = [token_logprobs(lg, seqs[i].completion_ids) for i, lg in zip(unit, logits)]
                samplers = [
                    torch.tensor(batch[i].sampler_logprobs, dtype=lp.dtype, device=lp.device)
                    for i, lp in zip(unit, logps)
                ]
                if update == 0:
                    for i, lp, sampler in zip(unit, logps, samplers):
                        olds[i] = lp.detach()
                        gaps.append((olds[i] - sampler).abs())
                parts, n = self._grpo_loss(
                    batch, unit, logps, samplers, olds, refs, all_tokens / all_units
                )
                loss = parts.loss
                if u in sft_at:
                    sft_loss = self._sft_loss(sft_seqs[sft_at[u]])
                    loss = loss + sft_weight * sft_loss
                    totals["sft"] += sft_loss.item() / (len(sft_seqs) * self.world)
                self.engine.backward(loss)  # DeepSpeed averages over the micro-batches
                backpropagated += loss.item()
                if u < len(units) - 1:
                    self.engine.step()  # counts the micro-batch; the optimizer waits
                else:
                    grad_norm = adapter_grad_norm(self.engine)
                    skipped += not self._apply_update(backpropagated, grad_norm)
                totals["loss"] += parts.loss.item() / all_units
                totals["kl"] += parts.kl.item() / all_units
                totals["clip"] += parts.clip_fraction.item() * n
                totals["ratio"] += parts.ratio_mean.item() * n
                for lg in logits:
                    totals["entropy"] += token_entropy(lg.detach()).mean().item() / all_completions
            self.updates += 1
        gap = torch.cat(gaps)
        return StepMetrics(
            loss=totals["loss"],
            kl=totals["kl"],
            clip_fraction=totals["clip"] / all_tokens,
            entropy=totals["entropy"],
            grad_norm=grad_norm,
            lr=float(self.engine.get_lr()[0]),
            tokens=tokens,
            logprob_gap_mean=float(gap.sum()) / all_tokens,
            logprob_gap_max=float(gap.max()),
            ratio_mean=totals["ratio"] / all_tokens,
            sft_loss=totals["sft"],
            skipped_updates=skipped,
        )

    def _apply_update(self, loss: float, grad_norm: float) -> bool:
        """End the batch's accumulation: the optimizer steps when this rank's backpropagated
        ``loss`` and the adapter's ``grad_norm`` are finite on every rank, else the update is
        skipped (adapter, AdamW moments and lr schedule untouched, gradients dropped: one NaN
        would otherwise poison the adapter for good). Returns whether it was applied."""
        if all_finite(self.engine, loss, grad_norm):
            self.engine.step()
            return True
        log.warning(
            "update %d skipped: loss %s, adapter gradient norm %s: not finite on some rank",
            self.updates + 1,
            loss,
            grad_norm,
        )
        skip_update(self.engine)
        return False

    def _sft_targets(
        self, batch: list[GRPOExample], units: list[list[int]], sft_batch: list[SFTExample] | None
    ) -> tuple[list[EncodedSequence], dict[int, int], float]:
        """``grpo.sft_coef``'s targets encoded, which micro-batch carries each (micro-batch ->
        target: its group's first), and the weight of a target's cross-entropy in the loss;
        nothing when the term is off."""
        if self.cfg.sft_coef <= 0:
            return [], {}, 0.0
        if sft_batch is None or len(sft_batch) != self.prompts_per_rank:
            got = "none" if sft_batch is None else len(sft_batch)
            raise BatchError(
                f"grpo.sft_coef {self.cfg.sft_coef} needs one SFT target per prompt "
                f"({self.prompts_per_rank}), got {got}"
            )
        sft_seqs = [
            encode(self.processor, ex.messages, target_ids(self.processor, ex.target))
            for ex in sft_batch
        ]
        firsts: dict[int, int] = {}  # group -> its first micro-batch
        for u, unit in enumerate(units):
            firsts.setdefault(id(batch[unit[0]].messages), u)
        sft_at = {u: j for j, u in enumerate(firsts.values())}
        # DeepSpeed divides each micro-batch's loss by their number: a target on one of
        # them is weighted by micro-batches / targets, so the update adds sft_coef x the mean.
        sft_weight = self.cfg.sft_coef * len(units) / len(sft_seqs)
        return sft_seqs, sft_at, sft_weight

    def _encode(
        self, batch: list[GRPOExample], units: list[list[int]]
    ) -> tuple[list[EncodedSequence], list[PackedGroup | None], list[dict | None]]:
        """The batch as model inputs, made once for every pass of this step: each completion
        after its prompt, each micro-batch's packed group (grouped pass; None per completion)
        and the frozen vision tower's output for its prompt (None while the tower trains)."""
        # The G completions of a prompt share its messages: run the processor (images) once.
        prompts: dict[int, dict] = {}
        for i, ex in enumerate(batch):
            if id(ex.messages) not in prompts:
                prompts[id(ex.messages)] = encode_prompt(self.processor, ex.messages)
            if ex.prompt_token_ids is not None:  # as vLLM saw it: once per completion, cheap
                ids = prompts[id(ex.messages)]["input_ids"][0].tolist()
                check_prompt_ids(ids, ex.prompt_token_ids, f"completion {i}")
        unit_prompts = [prompts[id(batch[u[0]].messages)] for u in units]
        seqs = [with_completion(prompts[id(ex.messages)], list(ex.completion_ids)) for ex in batch]
        # The frozen vision tower, once per prompt for every pass of this step.
        visions = [
            vision_features(self.engine.module, p, self.device) if self.reuse_vision else None
            for p in unit_prompts
        ]
        # Each group packed once (its 4D mask and positions), for every pass of this step.
        packs = [
            pack_group(self.engine.module, p, [seqs[i].completion_ids.tolist() for i in u])
            if self.learner_pass == "grouped"
            else None
            for u, p in zip(units, unit_prompts)
        ]
        return seqs, packs, visions

    def _reference_logprobs(
        self,
        units: list[list[int]],
        packs: list[PackedGroup | None],
        visions: list[dict | None],
        seqs: list[EncodedSequence],
    ) -> list[torch.Tensor | None]:
        """log pi_ref of each completion's tokens: the adapter disabled, the SFT policy. None
        for every completion when there is no KL term."""
        refs: list[torch.Tensor | None] = [None] * len(seqs)
        if self.cfg.beta != 0.0 and self.cfg.kl_estimator != "none":
            with torch.no_grad(), self.engine.module.disable_adapter():
                for unit, packed, vision in zip(units, packs, visions):
                    logits = self._logits(self.engine.module, unit, packed, seqs, vision)
                    for i, lg in zip(unit, logits):
                        refs[i] = token_logprobs(lg, seqs[i].completion_ids)
        return refs

    def _grpo_loss(
        self,
        batch: list[GRPOExample],
        unit: list[int],
        logps: list[torch.Tensor],
        samplers: list[torch.Tensor],
        olds: list[torch.Tensor | None],
        refs: list[torch.Tensor | None],
        token_count: float,
    ) -> tuple[LossParts, int]:
        """The GRPO loss of one micro-batch (``token_count``: what its token sum is divided by)
        and its number of completion tokens."""
        logp, mask = pad_rows(logps)
        old, _ = pad_rows([olds[i] for i in unit])
        ref = pad_rows([refs[i] for i in unit])[0] if refs[unit[0]] is not None else None
        weights = None
        if self.cfg.tis_cap is not None:
            sampler, _ = pad_rows(samplers)
            weights = truncated_is_weights(old, sampler, self.cfg.tis_cap)
        advantages = [batch[i].advantage for i in unit]
        parts = grpo_loss(
            logp,
            old,
            ref,
            torch.tensor(advantages, dtype=logp.dtype, device=logp.device),
            mask,
            self.cfg.clip_eps,
            self.cfg.beta,
            weights,
            clip_eps_high=self.cfg.clip_eps_high,
            kl_estimator=self.cfg.kl_estimator,
            loss_agg=self.cfg.loss_agg,
            # DeepSpeed averages the micro-batch losses of every rank: the batch's token mean
            # needs each one's token sum over (batch tokens / micro-batches).
            token_count=token_count,
            max_tokens=self.max_tokens,
        )
        return parts, int(mask.sum())

    def _sft_loss(self, seq: EncodedSequence) -> torch.Tensor:
        """The token-mean cross-entropy of one SFT target, at temperature 1."""
        lg = completion_logits(self.engine, seq, self.device)
        return -token_logprobs(lg, seq.completion_ids).mean()

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
            # No medvol.json: a pushed adapter sits on the SFT-merged weights, never on the base.
            adapter_dir=save_adapter(
                self.engine, self.processor, out_dir / f"adapter-v{version}", frame=None
            ),
        )

    def merged_weights(self) -> dict[str, torch.Tensor]:
        """The policy's full weights (adapter folded into :meth:`write_policy_base`'s folder), by
        checkpoint name: what a broadcast push sends. Every rank calls it (ZeRO-3 gathers)."""
        return merged_state(self.engine, self.policy_base)

    def export_final(self, out_dir: Path, frame: TrainingFrame | None = None) -> Path:
        """The trained policy as one adapter on the original base (SFT and GRPO adapters
        stacked, or the GRPO adapter alone when there was no SFT), for evaluate and predict,
        with ``frame`` (the run's) as its medvol.json."""
        if self.sft_adapter is None:
            return save_adapter(self.engine, self.processor, Path(out_dir), frame=frame)
        return save_stacked_adapter(
            self.engine, self.processor, self.sft_adapter, Path(out_dir), frame=frame
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
