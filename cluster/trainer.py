"""The GRPO trainer: one step (generate, score, learn, sync, log) and the run's loop over them.

Each step: prompts -> G completions each (vLLM rollout actors) -> the four rewards (the reward
pool) -> group advantages -> a DeepSpeed update (the learner group: ``grpo.num_learners``
data-parallel ranks) -> new weights pushed to the rollout actors (the weight sync) -> metrics to
MLflow. Every ``grpo.checkpoint_every`` steps a checkpoint is written atomically under
``<output_dir>/grpo/checkpoints``; a resumed run continues from the latest one in the same MLflow
run.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cluster.checkpoints import Checkpoints, rng_state
from cluster.learner_group import LearnerGroup
from cluster.placement import Placement, plan
from cluster.weight_sync import WeightSync
from common.config import ConfigError, RunConfig, to_dict
from rollout.records import FolderBytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rollout:
    """Prompts whose groups are being generated."""

    samples: list  # (Sample, PreparedVolume) of each prompt
    prompts: list  # RolloutPrompt of each
    pending: object  # rollout.actor.PendingGroups


@dataclass(frozen=True)
class ScoredGroup:
    """One prompt's G completions with their rewards."""

    sample: tuple  # (Sample, PreparedVolume)
    prompt: object  # RolloutPrompt
    group: object  # rollout.records.Group
    rewards: tuple  # RewardBreakdown per completion


def prompt_order(n: int, epochs: int, seed: int) -> list[int]:
    """Sample indices for every epoch, shuffled per epoch with the run's seed."""
    order = []
    for epoch in range(epochs):
        idx = list(range(n))
        random.Random(seed * 7919 + epoch).shuffle(idx)
        order += idx
    return order


def sft_start(cfg: RunConfig) -> Path | None:
    """The SFT adapter GRPO starts from (None under ``grpo.from_base``), checked before anything
    starts: a run must not quietly train from the base model because SFT wrote elsewhere, nor
    on other slices than the adapter's medvol.json says SFT trained on."""
    if cfg.sft_adapter is None:
        return None
    path = Path(cfg.sft_adapter)
    if not (path / "adapter_config.json").is_file():
        raise ConfigError(
            f"sft_adapter: no SFT adapter at {path} (no adapter_config.json there); run "
            "python -m learner.sft with the same output_dir first, give sft_adapter=PATH, or "
            "set grpo.from_base=true to start GRPO from the base model"
        )
    from learner.training_frame import TrainingFrame, TrainingFrameError

    try:  # GRPO must see the slices SFT learned on; an older adapter without medvol.json passes
        frame = TrainingFrame.read_if_any(path)
    except TrainingFrameError as err:
        raise ConfigError(f"sft_adapter: {err}") from None
    conflicts = frame.conflicts(cfg.data) if frame is not None else []
    if conflicts:
        raise ConfigError(f"sft_adapter: {path}: " + "; ".join(conflicts))
    return path


class GRPOTrainer:
    """A GRPO run on Ray: set-up in ``__init__``, one step in :meth:`step`, checkpoints in
    :meth:`checkpoint`, and :meth:`fit`, the loop over them."""

    def __init__(self, cfg: RunConfig, resume: bool = False):
        from learner.sft import model_path
        from learner.training_frame import TrainingFrame

        self.cfg = cfg
        sft_path = sft_start(cfg)
        self.out = Path(cfg.output_dir) / "grpo"
        self.out.mkdir(parents=True, exist_ok=True)
        placement = plan(cfg)
        self._load_prompts()  # the dataset, its usable samples, their order, the step count
        self.placement_group = self._place(placement)
        self.checkpoints = Checkpoints(self.out / "checkpoints", cfg.keep_checkpoints)
        latest = self._restore_state(resume)  # self.state; the checkpoint resumed from, if any
        # The SFT adapter is read here, on the driver's node, and travels as bytes.
        sft = FolderBytes.read(sft_path) if sft_path is not None else None
        base = model_path(cfg)
        # The frame this run trains in: medvol.json of its checkpoints and final adapter.
        self.frame = TrainingFrame.of_run(cfg.data, base)
        self.learners = self._start_learners(placement, base, sft, latest)
        self.fleet = self._start_fleet(base, sft)
        self.weights = WeightSync(self.learners, self.fleet, cfg)
        if latest is not None:  # the rollout actors start on the checkpoint's weights
            self.weights.push(self.state["version"])
        self.pool = self._start_reward_pool()
        self.tracker = self._start_tracking()
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = self.state["rng"]
        self.cursor = self.state["position"]  # next prompt of the order to roll out
        self.prefetched: Rollout | None = None  # the next batch's rollout, under grpo.overlap

    def _load_prompts(self) -> None:
        """The training split, the samples of it that can anchor an answer (``usable``; the
        others are ``skipped``), their order over every epoch, and the run's step count."""
        from data.dataset import VolumeDataset, anchorable

        cfg = self.cfg
        self.dataset = VolumeDataset(cfg.data.manifest, cfg.data, split="train")
        # indices of the samples that can anchor an answer
        self.usable, self.skipped = anchorable(self.dataset)
        for sample_id in self.skipped:
            log.warning("skipping %s: no box of its target on any sampled slice", sample_id)
        if not self.usable:
            raise ValueError(f"{cfg.data.manifest}: no training sample has a visible target")
        order = prompt_order(len(self.usable), cfg.grpo.epochs, cfg.seed)
        self.order = [self.usable[i] for i in order]
        steps = len(self.order) // cfg.grpo.batch_size
        if cfg.grpo.max_steps is not None:
            steps = min(steps, cfg.grpo.max_steps)
        self.steps = steps

    def _place(self, placement: Placement):
        """Ray (joined, or started locally sized to the plan) and the run's placement group,
        ready."""
        import ray
        from ray.util.placement_group import placement_group

        cfg = self.cfg
        if not ray.is_initialized():
            if cfg.cluster.address or os.environ.get("RAY_ADDRESS"):
                # On a cluster the actors' output (vLLM, DeepSpeed errors) must reach the driver,
                # so that `ray job logs` shows it.
                to_driver = cfg.cluster.log_to_driver
                ray.init(address=cfg.cluster.address, log_to_driver=to_driver is not False)
            else:  # a local instance sized to the plan (logical CPUs may exceed the cores)
                need = int(np.ceil(placement.total().get("CPU", 1))) + 1
                ray.init(
                    num_cpus=max(need, os.cpu_count() or 1),
                    include_dashboard=False,
                    log_to_driver=bool(cfg.cluster.log_to_driver),
                )
        group = placement_group(placement.bundles, strategy=placement.strategy)
        ray.get(group.ready(), timeout=600)
        return group

    def _restore_state(self, resume: bool) -> Path | None:
        """The run's state: a fresh one, or (``resume``) the latest checkpoint's, whose folder
        is returned (None when there is none to resume from)."""
        self.state = {
            "step": 0,
            "position": 0,
            "mlflow_run_id": None,
            "version": 0,
            "rng": rng_state(np.random.default_rng(self.cfg.seed)),
            "skipped_steps": 0,  # updates skipped so far: loss or gradient not finite
        }
        latest = self.checkpoints.latest() if resume else None
        if latest is not None:
            self.state = json.loads((latest / "state.json").read_text())
            log.info("resuming from %s (step %d)", latest, self.state["step"])
        return latest

    def _start_learners(
        self, placement: Placement, base: Path, sft: FolderBytes | None, latest: Path | None
    ) -> LearnerGroup:
        """The learner ranks on the policy ``base`` (+ the SFT adapter), on the checkpoint's
        weights when resuming from ``latest``."""
        learners = LearnerGroup(
            self.cfg, placement, self.placement_group, base, max(self.steps, 1), sft
        )
        if latest is not None:
            learners.load_checkpoint(latest / "learner", "ckpt")
        return learners

    def _start_fleet(self, base: Path, sft: FolderBytes | None):
        """The rollout actors, in the bundles after the learners'. The engines serve the SFT
        policy's weights (base + SFT merged, built on each rollout node) under the GRPO
        adapter."""
        from rollout.actor import RolloutFleet

        cfg = self.cfg
        return RolloutFleet(
            base,
            cfg.rollout,
            cfg.model,
            cpus_per_actor=cfg.cluster.rollout_cpus,
            placement_group=self.placement_group,
            bundle_offset=cfg.grpo.num_learners,
            base_adapter=sft,
            scratch_dir=cfg.cluster.scratch_dir,
            keep_adapters=cfg.keep_adapters,
            sync_timeout_s=cfg.cluster.weight_sync_timeout_s,
        )

    def _start_reward_pool(self):
        from reward_server.pool import RewardPool

        cfg = self.cfg
        return RewardPool(
            str(cfg.data.manifest), cfg.data, cfg.reward, cpus_per_worker=cfg.cluster.reward_cpus
        )

    def _start_tracking(self):
        """The MLflow run: the checkpoint's when resuming, else a new one with the config as
        its parameters and config.json."""
        from common.tracking import Tracker, flatten

        cfg = self.cfg
        tracker = Tracker(
            cfg.tracking.tracking_uri,
            cfg.tracking.experiment,
            cfg.tracking.run_name or f"{Path(cfg.output_dir).name}-grpo",
            self.state["mlflow_run_id"],
        )
        if self.state["mlflow_run_id"] is None:
            tracker.log_params(flatten(to_dict(cfg)))
            # the keys a config file holds (no derived field): loads back with --config
            keys = to_dict(cfg, keys_only=True)
            (self.out / "config.json").write_text(json.dumps(keys, indent=1))
            tracker.log_artifact(self.out / "config.json")
        self.state["mlflow_run_id"] = tracker.run_id
        return tracker

    def step(self) -> dict:
        """One GRPO step on the next batch of prompts: generate, score, learn, sync, log; returns
        its metrics.

        Rewards of each actor's groups are scored while the other actors still generate. With
        ``grpo.overlap`` the next batch's rollout starts (on the current weights) before this
        batch's update, so generation and learning run at the same time.
        """
        cfg = self.cfg
        step = self.state["step"] + 1
        _apply_scale_file(cfg, self.pool)
        t0 = time.perf_counter()
        groups, info = self._next_batch()  # generated and scored
        t_scored = time.perf_counter()
        if cfg.grpo.overlap and step < self.steps and self._batch_left():
            self.prefetched = self._start_rollout(cfg.grpo.batch_size)
        totals, advantages = self._advantages(groups)
        learned = self.learners.step(self._examples(groups, advantages), self._sft_batch())
        # setdefault: a checkpoint written before the count was kept resumes at 0
        self.state["skipped_steps"] = self.state.setdefault("skipped_steps", 0) + (
            learned.skipped_updates
        )
        t_learned = time.perf_counter()
        self.weights.push(step)
        t_synced = time.perf_counter()
        timing = {
            "time/learn_s": t_learned - t_scored,
            "time/weight_sync_s": t_synced - t_learned,
            "time/step_s": t_synced - t0,
        }
        metrics = self._metrics(groups, totals, advantages, learned, {**info, **timing})
        self.tracker.log_metrics(metrics, step)
        if step % cfg.tracking.evidence_every == 0 or step == 1:
            first = groups[0]
            self._log_evidence(step, first.sample, first.group.completions[0].text)
        self._record_progress(step)
        return metrics

    def _next_batch(self) -> tuple[list[ScoredGroup], dict]:
        """The groups of the next update and how they were got (timings, dynamic sampling)."""
        import torch

        from learner.grpo import zero_std_groups

        cfg = self.cfg.grpo
        t0 = time.perf_counter()
        rollout, self.prefetched = self.prefetched, None
        if rollout is None:
            rollout = self._start_rollout(cfg.batch_size)
        kept: list[ScoredGroup] = []
        dropped: list[ScoredGroup] = []
        generated = t0
        staleness = self.state["version"] - rollout.pending.version
        for round_ in range(1 + (cfg.dynamic_sampling_rounds if cfg.dynamic_sampling else 0)):
            if round_ > 0:
                rollout = self._start_rollout(cfg.batch_size - len(kept))
                if rollout is None:
                    break
            groups, generated = self._score(rollout)
            for group in groups:
                # the rule that counts advantage/zero_std_share: equal rewards, no advantage
                totals = torch.tensor([[r.total for r in group.rewards]])
                flat = cfg.dynamic_sampling and zero_std_groups(totals) == 1
                (dropped if flat else kept).append(group)
            if len(kept) >= cfg.batch_size:
                break
        drawn = len(kept) + len(dropped)
        batch = (kept + dropped)[: cfg.batch_size]  # still short: zero-advantage groups fill it
        info = {
            "time/generate_s": generated - t0,
            "time/reward_s": time.perf_counter() - generated,
            "rollout/staleness": float(staleness),
        }
        if cfg.dynamic_sampling:
            info["data/dropped_group_share"] = len(dropped) / max(drawn, 1)
            info["data/prompts_drawn"] = float(drawn)
        return batch, info

    def _start_rollout(self, count: int) -> Rollout | None:
        """Take the next ``count`` prompts (fewer at the end of the order) and start their
        groups on the rollout actors; None when the order is used up."""
        from data.prompts import build_messages
        from data.queries import training_query
        from rollout.records import RolloutPrompt

        idx = self.order[self.cursor : self.cursor + count]
        if not idx:
            return None
        self.cursor += len(idx)
        samples = [self.dataset[i] for i in idx]
        # with data.resample_queries, a phrasing drawn with the run's (checkpointed) generator
        ask = self.cfg.data.resample_queries
        prompts = [
            RolloutPrompt(
                s.id,
                build_messages(
                    np.asarray(p.slices),
                    training_query(s, ask, self.rng),
                    self.cfg.data.box_coords,
                ),
            )
            for s, p in samples
        ]
        pending = self.fleet.start(prompts, seed=int(self.rng.integers(2**31)))
        return Rollout(samples, prompts, pending)

    def _score(self, rollout: Rollout) -> tuple[list[ScoredGroup], float]:
        """Rewards of a rollout's groups: each actor's groups go to the reward pool as soon as
        they exist, and all are collected here. Also returns when the last group arrived."""
        from reward_server.scorer import ScoreRequest

        started = []
        for offset, groups in rollout.pending.as_completed():
            requests = [ScoreRequest(g.sample_id, c.text) for g in groups for c in g.completions]
            started.append((offset, groups, self.pool.start(requests)))
        generated = time.perf_counter()
        scored: dict[int, ScoredGroup] = {}
        for offset, groups, pending in started:
            rewards = pending.result()
            for j, group in enumerate(groups):
                g = len(group.completions)
                scored[offset + j] = ScoredGroup(
                    rollout.samples[offset + j],
                    rollout.prompts[offset + j],
                    group,
                    tuple(rewards[j * g : (j + 1) * g]),
                )
        return [scored[i] for i in sorted(scored)], generated

    def _batch_left(self) -> bool:
        """Whether a whole batch of prompts is left (dynamic sampling draws extra ones)."""
        left = len(self.order) - self.cursor
        return self.prefetched is not None or left >= self.cfg.grpo.batch_size

    def _advantages(self, groups: list[ScoredGroup]) -> tuple[np.ndarray, np.ndarray]:
        """Each completion's total reward R_i and its advantage A_i within its group, both
        (groups, G)."""
        import torch

        from learner.grpo import group_advantages

        cfg = self.cfg.grpo
        totals = np.array([[r.total for r in g.rewards] for g in groups])
        advantages = group_advantages(torch.tensor(totals), cfg.adv_eps, cfg.scale_rewards)
        return totals, advantages.numpy()

    @staticmethod
    def _examples(groups: list[ScoredGroup], advantages: np.ndarray) -> list:
        """The update's batch: every completion with its prompt, tokens, sampler logprobs and
        advantage (learner.grpo_learner.GRPOExample), group by group."""
        from learner.grpo_learner import GRPOExample

        return [
            GRPOExample(
                g.prompt.messages,
                c.token_ids,
                c.logprobs,
                float(advantages[i, j]),
                prompt_token_ids=g.group.prompt_token_ids,
            )
            for i, g in enumerate(groups)
            for j, c in enumerate(g.group.completions)
        ]

    def _sft_batch(self) -> list | None:
        """``grpo.sft_coef``'s cold-start targets for one update: grpo.batch_size training
        samples drawn at random with the run's (checkpointed) generator, each with its SFT target
        answer and asked as SFT asks it; None when the term is off."""
        from learner.grpo_learner import SFTExample
        from learner.sft import sft_example

        cfg = self.cfg
        if cfg.grpo.sft_coef == 0:
            return None
        top_k = cfg.data.key_slice_top_k()
        picks = self.rng.choice(len(self.usable), size=cfg.grpo.batch_size)
        return [
            SFTExample(
                *sft_example(
                    self.dataset, self.usable[int(i)], top_k, self.rng, cfg.data.resample_queries
                )
            )
            for i in picks
        ]

    def _metrics(
        self,
        groups: list[ScoredGroup],
        totals: np.ndarray,
        advantages: np.ndarray,
        learned,
        got: dict,
    ) -> dict:
        """The step's metrics: rewards, advantages, the update's (``learned``: StepMetrics),
        response lengths, then ``got`` (how the batch was got and each phase's time) and the
        throughput."""
        import torch

        from learner.grpo import zero_std_groups
        from reward_server.pool import TIMEOUT_FAILURE

        rewards = [r for g in groups for r in g.rewards]
        lengths = [len(c.token_ids) for g in groups for c in g.group.completions]
        step_s = got["time/step_s"]
        return {
            "reward/format": float(np.mean([r.format for r in rewards])),
            "reward/axial": float(np.mean([r.axial for r in rewards])),
            "reward/spatial": float(np.mean([r.spatial for r in rewards])),
            "reward/consistency": float(np.mean([r.consistency for r in rewards])),
            "reward/total": float(totals.mean()),
            "reward/group_std": float(totals.std(axis=1).mean()),
            "reward/format_failure_rate": float(np.mean([r.failure is not None for r in rewards])),
            "reward/timeouts": float(sum(r.failure == TIMEOUT_FAILURE for r in rewards)),
            "advantage/mean": float(advantages.mean()),
            "advantage/std": float(advantages.std()),
            "advantage/min": float(advantages.min()),
            "advantage/max": float(advantages.max()),
            "advantage/zero_std_share": zero_std_groups(torch.tensor(totals)) / len(groups),
            "learner/loss": learned.loss,
            "learner/kl": learned.kl,
            "learner/clip_fraction": learned.clip_fraction,
            "learner/ratio_mean": learned.ratio_mean,
            "learner/logprob_gap_mean": learned.logprob_gap_mean,
            "learner/logprob_gap_max": learned.logprob_gap_max,
            "learner/entropy": learned.entropy,
            "learner/grad_norm": learned.grad_norm,
            "learner/skipped_steps": float(self.state["skipped_steps"]),  # cumulative
            "learner/lr": learned.lr,
            **({"learner/sft_loss": learned.sft_loss} if self.cfg.grpo.sft_coef > 0 else {}),
            "rollout/response_length": float(np.mean(lengths)),
            "data/skipped_samples": float(len(self.skipped)),
            **got,
            "throughput/completions_per_s": len(lengths) / step_s,
            "throughput/tokens_per_s": sum(lengths) / step_s,
            "reward/workers": self.pool.num_workers,
        }

    def _log_evidence(self, step: int, sample_and_prepared, text: str) -> None:
        sample, prepared = sample_and_prepared
        picture = evidence_picture(
            self.out / f"evidence-step{step}.png",
            np.asarray(prepared.slices),
            np.asarray(prepared.mask),
            text,
            f"step {step}: {sample.query}",
            self.cfg.data.box_coords,
        )
        if picture is not None:
            self.tracker.log_artifact(picture, "evidence")

    def _record_progress(self, step: int) -> None:
        """The run's state after ``step``, what its checkpoint holds. A prefetched rollout's
        prompts are not yet learned from: a resumed run redoes them."""
        ahead = len(self.prefetched.prompts) if self.prefetched is not None else 0
        self.state.update(
            step=step,
            position=self.cursor - ahead,
            version=step,
            rng=rng_state(self.rng),
        )

    def checkpoint(self) -> Path:
        return self.checkpoints.save(self.state["step"], self.learners, self.state, self.frame)

    def fit(self) -> dict:
        """Steps until the run's step count, checkpointing on schedule; the last step's metrics.
        Ends with the trained policy as one adapter in ``<output_dir>/grpo/adapter``.

        Ctrl-C (SIGINT) stops the run after the step under way, with a checkpoint of it, and
        raises KeyboardInterrupt; ``--resume`` continues from there. A second Ctrl-C stops at
        once (the run then resumes from its last scheduled checkpoint)."""
        from tqdm import tqdm

        metrics: dict = {}
        with (
            stop_requests() as stop,
            tqdm(total=self.steps, initial=self.state["step"], desc="GRPO") as bar,
        ):
            while self.state["step"] < self.steps and self._batch_left():
                metrics = self.step()
                step = self.state["step"]
                due = step % self.cfg.grpo.checkpoint_every == 0 or step == self.steps
                if due or stop.is_set():
                    self.checkpoint()
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward/total']:.3f}")
                if stop.is_set():
                    log.warning("interrupted: stopped after step %d, checkpoint saved", step)
                    raise KeyboardInterrupt
        self.learners.export_final(self.out / "adapter", self.frame)
        return metrics

    def close(self) -> None:
        """End the MLflow run and free everything the run holds on the cluster, its placement
        group included (a second run in the same Ray instance can then be placed)."""
        from ray.util.placement_group import remove_placement_group

        self.tracker.end()
        self.pool.shutdown()
        self.fleet.shutdown()
        self.learners.close()
        remove_placement_group(self.placement_group)


def run(cfg: RunConfig, resume: bool = False) -> dict:
    """The GRPO run; returns the last step's metrics."""
    trainer = GRPOTrainer(cfg, resume)
    metrics = trainer.fit()
    trainer.close()  # only after success: a killed run's MLflow run stays open for --resume
    return metrics


@contextmanager
def stop_requests() -> Iterator[threading.Event]:
    """An event set by the first SIGINT inside the block (a Python-level handler only sets it,
    so the request cannot be lost in a callback that swallows KeyboardInterrupt); the handler
    then steps aside, and a second SIGINT raises KeyboardInterrupt as usual. Outside the main
    thread no handler can be installed, and the event is never set."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:  # installed outside Python: hand back Python's default
        previous = signal.default_int_handler

    def request(signum, frame):
        stop.set()
        signal.signal(signal.SIGINT, previous)
        log.warning("interrupt: stopping after this step (Ctrl-C again to stop now)")

    signal.signal(signal.SIGINT, request)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def _apply_scale_file(cfg: RunConfig, pool) -> None:
    if not cfg.cluster.scale_file:
        return
    path = Path(cfg.cluster.scale_file)
    try:
        wanted = int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return
    if wanted != pool.num_workers and wanted >= 1:
        log.info("scaling reward workers %d -> %d (%s)", pool.num_workers, wanted, path)
        pool.scale(wanted)


def evidence_picture(
    path: Path,
    slices: np.ndarray,
    mask: np.ndarray,
    text: str,
    title: str,
    box_coords: str = "pixels",
) -> Path | None:
    """The key slice with predicted (yellow) and true (green) boxes, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from data.answer import ParsedAnswer, parse_answer
    from data.targets import boxes_on_slice

    parsed = parse_answer(text, slices.shape[0], slices.shape[-1], box_coords)
    if not isinstance(parsed, ParsedAnswer):
        return None
    k = parsed.anchor.key_slice
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(slices[k - 1], cmap="gray")
    for boxes, color in ((boxes_on_slice(mask[k - 1]), "lime"), (parsed.anchor.boxes, "yellow")):
        for x1, y1, x2, y2 in boxes:
            ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color=color))
    ax.set_title(f"{title}\nkey slice {k} (true boxes green, predicted yellow)", fontsize=7)
    ax.axis("off")
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path
