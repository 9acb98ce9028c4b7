"""Pushing each new policy version from the learner to every rollout actor."""

from __future__ import annotations

from cluster.learner_group import LearnerGroup
from common.config import RunConfig
from rollout.records import WeightSyncError


class WeightSync:
    """How each new policy version reaches the rollout engines, with no disk shared between
    nodes: the adapter (``grpo.export: adapter``) as tensors through Ray's object store, each
    rollout actor fetching them from learner rank 0's node and handing them to its engine in
    memory; merged weights either broadcast by
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
