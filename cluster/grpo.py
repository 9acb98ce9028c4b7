"""The GRPO run on Ray: what ``ray job submit -- python -m cluster.grpo`` executes.

    python -m cluster.grpo --config configs/<run>.yaml [key=value ...] [--resume] [--dry-run]

Each step: prompts -> G completions each (vLLM rollout actors) -> the four rewards (the reward
pool) -> group advantages -> a DeepSpeed update (the learner group: ``grpo.num_learners``
data-parallel ranks) -> new weights pushed to the rollout actors. Every step's metrics go to
MLflow; every ``checkpoint_every`` steps a checkpoint is written atomically under
``<output_dir>/grpo/checkpoints``; ``--resume`` continues from the latest one in the same MLflow
run.

No disk is shared between nodes: the actors write only to their node's scratch folder
(``cluster.scratch_dir``), weights reach the rollout actors through Ray's object store or the
weight group (:class:`WeightSync`), and checkpoints (every rank's DeepSpeed state) and the final
adapter come back to the driver as bytes and are written under its ``output_dir``. Every node
needs the base checkpoint (``model.path``) and the data; only the driver needs ``output_dir``
and the SFT adapter.

Scaling reward workers while the run goes on: write the wanted count into the file named by
``cluster.scale_file`` (``echo 3 > runs/x/reward_workers``); the driver applies it before the
next step. Or call Serve's scaling endpoint on the Ray dashboard:
``curl -X POST http://127.0.0.1:8265/api/v1/applications/reward_server/deployments/
RewardWorker/scale -H 'Content-Type: application/json' -d '{"target_num_replicas": 3}'``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cluster.placement import Placement, assign, describe, describe_assignment, parse_cluster, plan
from common.config import ConfigError, RunConfig, load_run_config, to_dict
from common.runtime import prune, require_cuda, set_default_environment
from rollout.records import FolderBytes, WeightSyncError, WeightUpdate

log = logging.getLogger("cluster.grpo")


class LearnerWorker:
    """One rank of the GRPO learner inside a Ray actor (one GPU on a cluster). What it writes
    goes to its own node-local scratch folder and leaves it as bytes: pushed weights, its part
    of each checkpoint, the final adapter."""

    def __init__(self, rank: int, world: int, gpus: float = 0.0, scratch_dir: str | None = None):
        set_default_environment()
        require_cuda("learner", gpus)
        from rollout.actor import node_scratch

        self.rank, self.world = rank, world
        self.scratch = node_scratch(f"learner-rank{rank}", scratch_dir)
        self.learner = None
        self._store = None  # the weight group's rendezvous store (rank 0)
        self._weight_group = None
        self._merged: dict | None = None  # full weights prepared for the next broadcast

    def address(self) -> tuple[str, int]:
        """Where rank 0 waits for the other ranks (torch.distributed's master): this node."""
        from common.runtime import node_ip
        from common.services import free_port

        host = node_ip()
        return host, free_port(host)

    def setup(
        self,
        master: tuple[str, int],
        model_path: str,
        cfg,
        group_size: int,
        total_steps: int,
        sft_adapter: FolderBytes | None,
        max_tokens: int | None = None,
        temperature: float = 1.0,
        seed: int = 0,
    ) -> dict:
        """The rank's DeepSpeed engine (every rank at once: initialisation is collective)."""
        import torch

        from learner.grpo_learner import GRPOLearner
        from learner.policy import setup_rank

        setup_rank(self.rank, self.world, *master)
        torch.manual_seed(seed)  # the same fresh adapter whatever the number of ranks
        sft = sft_adapter.write(self.scratch / "sft-adapter") if sft_adapter is not None else None
        self.learner = GRPOLearner(
            Path(model_path), cfg, group_size, total_steps, sft, max_tokens, temperature
        )
        if cfg.export == "merged" and self.rank == 0:  # the weights merged pushes start from
            self.learner.write_policy_base(self.scratch / "policy-base")
        return self.where()

    def where(self) -> dict:
        from rollout.actor import node_id

        return {"node": node_id(), "scratch": str(self.scratch)}

    def step(self, batch, batch_tokens: int, sft_batch=None):
        return self.learner.step(batch, batch_tokens, sft_batch)

    def _on_rank0(self, make):
        """``make()`` on rank 0, None elsewhere; under ZeRO-3 the other ranks take part in
        gathering the adapter (``make`` gathers it exactly once)."""
        if self.rank == 0:
            return make()
        if self.learner.engine.zero_optimization_stage() == 3:
            from learner.policy import lora_state

            lora_state(self.learner.engine)
        return None

    def _take(self, folder: Path) -> FolderBytes:
        """A folder this rank wrote, as bytes; the folder is gone afterwards, so no other node
        could ever be handed a path to it."""
        files = FolderBytes.read(folder)
        shutil.rmtree(folder)
        return files

    def export(self, version: int) -> WeightUpdate | None:
        """Rank 0: the weights of ``version`` as bytes (``grpo.export``: the adapter, or the
        merged checkpoint), for the object store."""

        def make() -> WeightUpdate:
            update = self.learner.export(self.scratch / "export", version)
            if update.adapter_dir is not None:
                return WeightUpdate(version, adapter=self._take(update.adapter_dir))
            return WeightUpdate(version, weights=self._take(update.weights_dir))

        return self._on_rank0(make)

    def open_weight_group(self, world: int, timeout_s: float) -> tuple[str, int]:
        from rollout.vllm_engine import WeightGroup

        self._store, host, port = WeightGroup.open(world, timeout_s)
        return host, port

    def join_weight_group(self, host: str, port: int, world: int, timeout_s: float) -> int:
        from rollout.vllm_engine import WeightGroup

        self._weight_group = WeightGroup(host, port, 0, world, timeout_s, store=self._store)
        return 0

    def prepare_broadcast(self, version: int, bucket_bytes: int) -> WeightUpdate | None:
        """Rank 0: the merged weights of ``version``, kept here, and the plan of their
        broadcast (names, shapes, buckets), which the engines need before it starts."""
        from rollout.vllm_engine import plan_buckets

        def make() -> WeightUpdate:
            self._merged = self.learner.merged_weights()
            return WeightUpdate(version, broadcast=plan_buckets(self._merged.items(), bucket_bytes))

        return self._on_rank0(make)

    def send_broadcast(self, update: WeightUpdate) -> int:
        merged, self._merged = self._merged, None
        self._weight_group.send(merged.items(), update.broadcast)
        return update.version

    def export_final(self, frame) -> FolderBytes | None:
        return self._on_rank0(
            lambda: self._take(self.learner.export_final(self.scratch / "final", frame))
        )

    def save_checkpoint(self, tag: str, state: dict) -> FolderBytes:
        """This rank's files of a checkpoint (DeepSpeed writes each rank's ZeRO shard), as
        bytes; nothing of it stays on this node."""
        folder = self.scratch / "checkpoint"
        shutil.rmtree(folder, ignore_errors=True)
        self.learner.save_checkpoint(folder, tag, state)
        return self._take(folder)

    def load_checkpoint(self, files: FolderBytes, tag: str) -> dict:
        folder = files.write(self.scratch / "checkpoint")
        state = self.learner.load_checkpoint(folder, tag)
        shutil.rmtree(folder)
        return state

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)


class LearnerGroup:
    """The learner as ``grpo.num_learners`` DeepSpeed ranks, Ray actors in bundles 0..N-1 of
    the run's placement group. Each step every rank learns on an equal share of the batch's
    groups and DeepSpeed all-reduces their gradients (see ``learner.grpo_learner``); pushes,
    checkpoints and the final adapter are collected from the ranks here."""

    def __init__(
        self,
        cfg: RunConfig,
        placement: Placement,
        placement_group,
        model_path: Path,
        total_steps: int,
        sft_adapter: FolderBytes | None,
    ):
        import ray

        n = cfg.grpo.num_learners
        gpus = placement.learner.get("GPU", 0)
        self.workers = []
        for rank in range(n):
            options = {"num_cpus": placement.learner["CPU"], "num_gpus": gpus}
            if placement_group is not None:
                from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group, rank
                )
            self.workers.append(
                ray.remote(LearnerWorker)
                .options(**options)
                .remote(rank, n, gpus, cfg.cluster.scratch_dir)
            )
        self.rank0 = self.workers[0]
        master = ray.get(self.rank0.address.remote())
        self.places = self._all(
            "setup",
            master,
            str(model_path),
            cfg.grpo,
            cfg.rollout.group_size,
            total_steps,
            ray.put(sft_adapter),
            cfg.rollout.max_tokens,
            cfg.rollout.temperature,
            cfg.seed,
        )

    def _all(self, method: str, *args) -> list:
        import ray

        return ray.get([getattr(w, method).remote(*args) for w in self.workers])

    def step(self, batch: list, sft_batch: list | None = None):
        """One update on the whole batch: each rank its share (of the groups, and of the SFT
        targets of ``grpo.sft_coef``), the metrics combined."""
        import ray

        from learner.grpo_learner import combine_metrics, split_groups

        tokens = sum(len(ex.completion_ids) for ex in batch)
        n = len(self.workers)
        shares = split_groups(batch, n)
        per = len(sft_batch) // n if sft_batch else 0
        sft_shares = [sft_batch[i * per : (i + 1) * per] if sft_batch else None for i in range(n)]
        parts = ray.get(
            [w.step.remote(s, tokens, t) for w, s, t in zip(self.workers, shares, sft_shares)]
        )
        return combine_metrics(parts)

    def export(self, version: int):
        """An object ref to the weights of ``version`` as bytes, in rank 0's object store:
        each rollout actor fetches them from there."""
        import ray

        refs = [w.export.remote(version) for w in self.workers]
        ray.get(refs[1:])  # the other ranks only help gather the adapter under ZeRO-3
        return refs[0]

    def prepare_broadcast(self, version: int, bucket_bytes: int) -> WeightUpdate:
        import ray

        return ray.get([w.prepare_broadcast.remote(version, bucket_bytes) for w in self.workers])[0]

    def save_checkpoint(self, folder: Path, tag: str, state: dict) -> Path:
        """Every rank's part of a checkpoint, written into ``folder`` on this (the driver's)
        node."""
        return FolderBytes.union(self._all("save_checkpoint", tag, state)).write(folder)

    def load_checkpoint(self, folder: Path, tag: str) -> dict:
        """Each rank gets the checkpoint's files (its own ZeRO shard among them) and loads it."""
        import ray

        return self._all("load_checkpoint", ray.put(FolderBytes.read(folder)), tag)[0]

    def export_final(self, out_dir: Path, frame) -> Path:
        """The final adapter, with ``frame`` (learner.training_frame) as its medvol.json."""
        return self._all("export_final", frame)[0].write(out_dir)

    def close(self) -> None:
        from rollout.actor import close_actors

        close_actors(self.workers)


class WeightSync:
    """How each new policy version reaches the rollout engines, with no disk shared between
    nodes: the adapter (``grpo.export: adapter``) as bytes through Ray's object store, each
    rollout actor fetching it from learner rank 0's node; merged weights either broadcast by
    learner rank 0 over the weight group (``cluster.merged_sync: collective``: NCCL on GPUs,
    gloo on CPU, in buckets) or as a checkpoint folder's bytes (``object_store``). A push that
    does not finish within ``cluster.weight_sync_timeout_s`` fails the step with
    :class:`WeightSyncError`.

    The weight group is formed before the first broadcast and again after a rollout actor was
    replaced; a replacement itself catches up on the current weights through the object store.
    """

    def __init__(self, learners: LearnerGroup, fleet, cfg: RunConfig):
        self.learners, self.fleet = learners, fleet
        self.timeout_s = cfg.cluster.weight_sync_timeout_s
        self.bucket_bytes = int(cfg.cluster.weight_bucket_mb * 2**20)
        self.collective = cfg.grpo.export == "merged" and cfg.cluster.merged_sync == "collective"
        self.formed_at: int | None = None  # fleet.replacements when the group was formed
        if self.collective:
            fleet.catch_up = lambda: learners.export(fleet.version)

    def push(self, version: int) -> None:
        if not self.collective:
            self.fleet.update_weights(self.learners.export(version), version)
            return
        if self.formed_at != self.fleet.replacements:
            self._form_group()
        update = self.learners.prepare_broadcast(version, self.bucket_bytes)
        sending = self.learners.rank0.send_broadcast.remote(update)
        self.fleet.update_weights(update, alongside=[sending])

    def _form_group(self) -> None:
        import ray

        world = 1 + len(self.fleet.actors)
        host, port = ray.get(self.learners.rank0.open_weight_group.remote(world, self.timeout_s))
        joins = [
            self.learners.rank0.join_weight_group.remote(host, port, world, self.timeout_s),
            *self.fleet.join_weight_group(host, port, world, self.timeout_s),
        ]
        _, late = ray.wait(joins, num_returns=len(joins), timeout=self.timeout_s + 30)
        if late:
            raise WeightSyncError(
                f"the weight group ({world} members at {host}:{port}) did not form within "
                f"{self.timeout_s:g} s (cluster.weight_sync_timeout_s)"
            )
        ray.get(joins)
        self.formed_at = self.fleet.replacements


def prompt_order(n: int, epochs: int, seed: int) -> list[int]:
    """Sample indices for every epoch, shuffled per epoch with the run's seed."""
    order = []
    for epoch in range(epochs):
        idx = list(range(n))
        random.Random(seed * 7919 + epoch).shuffle(idx)
        order += idx
    return order


def evidence_picture(
    path: Path, slices: np.ndarray, mask: np.ndarray, text: str, title: str
) -> Path | None:
    """The key slice with predicted (yellow) and true (green) boxes, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from data.answer import ParsedAnswer, parse_answer
    from data.targets import boxes_on_slice

    parsed = parse_answer(text, slices.shape[0], slices.shape[-1])
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


class Checkpoints:
    """Atomic run checkpoints: ``step-N/`` folders written as ``.step-N.partial`` then renamed,
    and a ``latest`` file replaced atomically once the folder is complete."""

    def __init__(self, root: Path, keep: int = 3):
        self.root = root
        self.keep = keep
        root.mkdir(parents=True, exist_ok=True)

    def latest(self) -> Path | None:
        marker = self.root / "latest"
        if not marker.exists():
            return None
        folder = self.root / marker.read_text().strip()
        return folder if (folder / "state.json").exists() else None

    def save(self, step: int, learners: LearnerGroup, state: dict, frame=None) -> Path:
        """``frame`` (learner.training_frame), if given, goes in as the step's medvol.json."""
        name = f"step-{step}"
        tmp = self.root / f".{name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        learners.save_checkpoint(tmp / "learner", "ckpt", state)
        (tmp / "state.json").write_text(json.dumps(state))
        if frame is not None:
            frame.write(tmp)
        final = self.root / name
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        marker = self.root / ".latest.partial"
        marker.write_text(name)
        marker.replace(self.root / "latest")
        prune(self.root, "step-", self.keep)
        return final


def rng_state(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state


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
        import ray
        from ray.util.placement_group import placement_group

        from common.tracking import Tracker, flatten
        from data.dataset import VolumeDataset, anchorable
        from learner.sft import model_path
        from learner.training_frame import TrainingFrame
        from reward_server.pool import RewardPool
        from rollout.actor import RolloutFleet

        self.cfg = cfg
        sft_path = sft_start(cfg)
        self.out = out = Path(cfg.output_dir) / "grpo"
        out.mkdir(parents=True, exist_ok=True)
        placement = plan(cfg)
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
        for limit in (cfg.steps, cfg.grpo.max_steps):
            if limit is not None:
                steps = min(steps, limit)
        self.steps = steps

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
        self.placement_group = group = placement_group(
            placement.bundles, strategy=placement.strategy
        )
        ray.get(group.ready(), timeout=600)

        self.checkpoints = Checkpoints(out / "checkpoints", cfg.keep_checkpoints)
        self.state = {
            "step": 0,
            "position": 0,
            "mlflow_run_id": None,
            "version": 0,
            "rng": rng_state(np.random.default_rng(cfg.seed)),
        }
        latest = self.checkpoints.latest() if resume else None
        if latest is not None:
            self.state = json.loads((latest / "state.json").read_text())
            log.info("resuming from %s (step %d)", latest, self.state["step"])
        # The SFT adapter is read here, on the driver's node, and travels as bytes.
        sft = FolderBytes.read(sft_path) if sft_path is not None else None
        base = model_path(cfg)
        # The frame this run trains in: medvol.json of its checkpoints and final adapter.
        self.frame = TrainingFrame.of_run(cfg.data, base)
        self.learners = LearnerGroup(cfg, placement, group, base, max(steps, 1), sft)
        if latest is not None:
            self.learners.load_checkpoint(latest / "learner", "ckpt")
        # The engines serve the SFT policy's weights (base + SFT merged, built on each rollout
        # node) under the GRPO adapter.
        self.fleet = RolloutFleet(
            base,
            cfg.rollout,
            cfg.model,
            cpus_per_actor=cfg.cluster.rollout_cpus,
            placement_group=group,
            bundle_offset=cfg.grpo.num_learners,
            base_adapter=sft,
            scratch_dir=cfg.cluster.scratch_dir,
            keep_adapters=cfg.keep_adapters,
            sync_timeout_s=cfg.cluster.weight_sync_timeout_s,
        )
        self.weights = WeightSync(self.learners, self.fleet, cfg)
        if latest is not None:
            self.weights.push(self.state["version"])
        self.pool = RewardPool(
            str(cfg.data.manifest), cfg.data, cfg.reward, cpus_per_worker=cfg.cluster.reward_cpus
        )
        self.tracker = Tracker(
            cfg.tracking.tracking_uri,
            cfg.tracking.experiment,
            cfg.tracking.run_name or f"{Path(cfg.output_dir).name}-grpo",
            self.state["mlflow_run_id"],
        )
        if self.state["mlflow_run_id"] is None:
            self.tracker.log_params(flatten(to_dict(cfg)))
            (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
            self.tracker.log_artifact(out / "config.json")
        self.state["mlflow_run_id"] = self.tracker.run_id
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = self.state["rng"]
        self.cursor = self.state["position"]  # next prompt of the order to roll out
        self.prefetched: Rollout | None = None  # the next batch's rollout, under grpo.overlap

    def _batch_left(self) -> bool:
        """Whether a whole batch of prompts is left (dynamic sampling draws extra ones)."""
        left = len(self.order) - self.cursor
        return self.prefetched is not None or left >= self.cfg.grpo.batch_size

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
                s.id, build_messages(np.asarray(p.slices), training_query(s, ask, self.rng))
            )
            for s, p in samples
        ]
        pending = self.fleet.start(prompts, seed=int(self.rng.integers(2**31)))
        return Rollout(samples, prompts, pending)

    def _sft_batch(self) -> list | None:
        """``grpo.sft_coef``'s cold-start targets for one update: grpo.batch_size training
        samples drawn at random with the run's (checkpointed) generator, each with its SFT target
        answer and asked as SFT asks it; None when the term is off."""
        from learner.grpo_learner import SFTExample
        from learner.sft import sft_example

        cfg = self.cfg
        if cfg.grpo.sft_coef == 0:
            return None
        top_k = cfg.data.key_slice_top_k(cfg.sft.top_k)
        picks = self.rng.choice(len(self.usable), size=cfg.grpo.batch_size)
        return [
            SFTExample(
                *sft_example(
                    self.dataset, self.usable[int(i)], top_k, self.rng, cfg.data.resample_queries
                )
            )
            for i in picks
        ]

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

    def _next_batch(self) -> tuple[list[ScoredGroup], dict]:
        """The groups of the next update and how they were got (timings, dynamic sampling)."""
        cfg = self.cfg.grpo
        t0 = time.perf_counter()
        rollout, self.prefetched = self.prefetched, None
        if rollout is None:
            rollout = self._start_rollout(cfg.batch_size)
        kept: list[ScoredGroup] = []
        dropped: list[ScoredGroup] = []
        generated = t0
        staleness = self.state["version"] - rollout.pending.version
        import torch

        from learner.grpo import zero_std_groups

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

    def step(self) -> dict:
        """One GRPO step on the next batch of prompts; returns its metrics (also logged).

        Rewards of each actor's groups are scored while the other actors still generate. With
        ``grpo.overlap`` the next batch's rollout starts (on the current weights) before this
        batch's update, so generation and learning run at the same time.
        """
        import torch

        from learner.grpo import group_advantages, zero_std_groups
        from learner.grpo_learner import GRPOExample
        from reward_server.pool import TIMEOUT_FAILURE

        cfg, state = self.cfg, self.state
        step = state["step"] + 1
        _apply_scale_file(cfg, self.pool)
        t0 = time.perf_counter()
        batch_groups, info = self._next_batch()
        t2 = time.perf_counter()
        if cfg.grpo.overlap and step < self.steps and self._batch_left():
            self.prefetched = self._start_rollout(cfg.grpo.batch_size)
        rewards = [r for g in batch_groups for r in g.rewards]
        totals = np.array([[r.total for r in g.rewards] for g in batch_groups])
        adv = group_advantages(
            torch.tensor(totals), cfg.grpo.adv_eps, cfg.grpo.scale_rewards
        ).numpy()
        batch = [
            GRPOExample(g.prompt.messages, c.token_ids, c.logprobs, float(adv[i, j]))
            for i, g in enumerate(batch_groups)
            for j, c in enumerate(g.group.completions)
        ]
        learned = self.learners.step(batch, self._sft_batch())
        t3 = time.perf_counter()
        self.weights.push(step)
        t4 = time.perf_counter()
        lengths = [len(c.token_ids) for g in batch_groups for c in g.group.completions]
        metrics = {
            "reward/format": float(np.mean([r.format for r in rewards])),
            "reward/axial": float(np.mean([r.axial for r in rewards])),
            "reward/spatial": float(np.mean([r.spatial for r in rewards])),
            "reward/consistency": float(np.mean([r.consistency for r in rewards])),
            "reward/total": float(totals.mean()),
            "reward/group_std": float(totals.std(axis=1).mean()),
            "reward/format_failure_rate": float(np.mean([r.failure is not None for r in rewards])),
            "reward/timeouts": float(sum(r.failure == TIMEOUT_FAILURE for r in rewards)),
            "advantage/mean": float(adv.mean()),
            "advantage/std": float(adv.std()),
            "advantage/min": float(adv.min()),
            "advantage/max": float(adv.max()),
            "advantage/zero_std_share": zero_std_groups(torch.tensor(totals)) / len(batch_groups),
            "learner/loss": learned.loss,
            "learner/kl": learned.kl,
            "learner/clip_fraction": learned.clip_fraction,
            "learner/ratio_mean": learned.ratio_mean,
            "learner/logprob_gap_mean": learned.logprob_gap_mean,
            "learner/logprob_gap_max": learned.logprob_gap_max,
            "learner/entropy": learned.entropy,
            "learner/grad_norm": learned.grad_norm,
            "learner/lr": learned.lr,
            **({"learner/sft_loss": learned.sft_loss} if cfg.grpo.sft_coef > 0 else {}),
            "rollout/response_length": float(np.mean(lengths)),
            "data/skipped_samples": float(len(self.skipped)),
            **info,
            "time/learn_s": t3 - t2,
            "time/weight_sync_s": t4 - t3,
            "time/step_s": t4 - t0,
            "throughput/completions_per_s": len(lengths) / (t4 - t0),
            "throughput/tokens_per_s": sum(lengths) / (t4 - t0),
            "reward/workers": self.pool.num_workers,
        }
        self.tracker.log_metrics(metrics, step)
        if step % cfg.tracking.evidence_every == 0 or step == 1:
            first = batch_groups[0]
            self._log_evidence(step, first.sample, first.group.completions[0].text)
        # A prefetched rollout's prompts are not yet learned from: a resumed run redoes them.
        ahead = len(self.prefetched.prompts) if self.prefetched is not None else 0
        state.update(
            step=step,
            position=self.cursor - ahead,
            version=step,
            rng=rng_state(self.rng),
        )
        return metrics

    def _log_evidence(self, step: int, sample_and_prepared, text: str) -> None:
        sample, prepared = sample_and_prepared
        picture = evidence_picture(
            self.out / f"evidence-step{step}.png",
            np.asarray(prepared.slices),
            np.asarray(prepared.mask),
            text,
            f"step {step}: {sample.query}",
        )
        if picture is not None:
            self.tracker.log_artifact(picture, "evidence")

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
                due = step % self.cfg.checkpoint_every == 0 or step == self.steps
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


def run(cfg: RunConfig, resume: bool = False) -> dict:
    """The GRPO run; returns the last step's metrics."""
    trainer = GRPOTrainer(cfg, resume)
    metrics = trainer.fit()
    trainer.close()  # only after success: a killed run's MLflow run stays open for --resume
    return metrics


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


def main(argv: list[str] | None = None) -> int:
    from common.cli import ArgumentParser, UsageError, existing_file, log_to_file

    set_default_environment()
    parser = ArgumentParser(prog="python -m cluster.grpo", description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=existing_file, help="run config YAML (configs/*.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the config, print the placement, start nothing",
    )
    parser.add_argument(
        "--cluster",
        metavar="GPUS[:CPUS],...",
        help="with --dry-run: a cluster to place the run on, GPUs (and CPUs) per node, e.g. "
        "8 (one node of 8 GPUs) or 4,4 (two nodes of 4); refuses a plan it cannot hold",
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. grpo.lr=1e-5")
    args = parser.parse_args(argv)
    cfg = load_run_config(args.config, args.overrides)
    if cfg.data.manifest is None:
        raise UsageError("data.manifest: not set (in the config or as data.manifest=PATH)")
    placement = plan(cfg)
    if args.cluster and not args.dry_run:
        raise UsageError("--cluster: only with --dry-run")
    if args.dry_run:
        print(describe(placement))
        if args.cluster:
            nodes = parse_cluster(args.cluster)
            print(describe_assignment(assign(placement, nodes), nodes))
        print(
            f"model: {cfg.model.path or 'tiny Qwen3-VL (' + cfg.model.tiny_size + ')'}; "
            f"rollout: {cfg.rollout.engine} x{cfg.rollout.num_actors}, G={cfg.rollout.group_size}"
            f"; reward: {cfg.reward.propagator} x{cfg.reward.num_workers}"
        )
        return 0
    if not Path(cfg.data.manifest).is_file():
        raise UsageError(f"data.manifest: {cfg.data.manifest}: no such file")
    sft_start(cfg)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    log_to_file(Path(cfg.output_dir) / "grpo" / "grpo.log")
    metrics = run(cfg, resume=args.resume)
    print(json.dumps({k: round(v, 4) for k, v in metrics.items()}))
    return 0


if __name__ == "__main__":
    from common.cli import run_cli

    sys.exit(run_cli(main))
