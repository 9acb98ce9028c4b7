"""The GRPO learner on Ray: one actor per DeepSpeed rank, and the group that steps them together."""

from __future__ import annotations

import shutil
from pathlib import Path

from cluster.placement import Placement
from common.config import RunConfig
from common.runtime import require_cuda, set_default_environment
from rollout.records import FolderBytes, WeightUpdate


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

        from learner.engine import setup_rank
        from learner.grpo_learner import GRPOLearner

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
            from learner.adapters import lora_state

            lora_state(self.learner.engine)
        return None

    def _take(self, folder: Path) -> FolderBytes:
        """A folder this rank wrote, as bytes; the folder is gone afterwards, so no other node
        could ever be handed a path to it."""
        files = FolderBytes.read(folder)
        shutil.rmtree(folder)
        return files

    def export(self, version: int) -> WeightUpdate | None:
        """Rank 0: the weights of ``version`` for the object store (``grpo.export``): the
        adapter's tensors and config, in memory, or the merged checkpoint's bytes."""

        def make() -> WeightUpdate:
            if self.learner.cfg.export == "adapter":
                from learner.adapters import adapter_tensors

                return WeightUpdate(version, adapter_tensors=adapter_tensors(self.learner.engine))
            update = self.learner.export(self.scratch / "export", version)
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
        """An object ref to the weights of ``version`` (an adapter's tensors, or a merged
        checkpoint's bytes) in rank 0's object store: each rollout actor fetches them from
        there."""
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
