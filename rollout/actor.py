"""The Ray layer of rollout: engines in actors, data-parallel over prompts, weights broadcast.

Each actor holds one engine (one GPU each on a cluster: ``rollout.gpus_per_actor = 1``). A batch
of prompts is dealt to the actors in contiguous shards and the groups come back in prompt order.
When there are fewer prompts than actors (the paper's batch is one prompt), the G samples of
each prompt are split across actors instead, each part with its own seed, and put back together
as one group, so no actor idles. An actor that dies is replaced by a fresh one, brought to the
current weights, and its shard is generated again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.exceptions import RayActorError

from rollout.config import ModelConfig, RolloutConfig
from rollout.records import Group, RolloutPrompt, WeightUpdate

log = logging.getLogger(__name__)


def build_engine(model_path: str | Path, cfg: RolloutConfig, model_cfg: ModelConfig | None = None):
    """The engine a config names: vLLM, or transformers where vLLM is not wanted."""
    if cfg.engine == "vllm":
        from rollout.vllm_engine import VLLMEngine

        return VLLMEngine(model_path, cfg, model_cfg)
    from rollout.hf_engine import TransformersEngine

    return TransformersEngine(model_path, cfg, model_cfg)


class RolloutWorker:
    """One engine inside a Ray actor."""

    def __init__(self, model_path: str, cfg: RolloutConfig, model_cfg: ModelConfig):
        from cluster.runtime import require_cuda, set_default_environment

        set_default_environment()
        require_cuda("rollout actor", cfg.gpus_per_actor)
        self.engine = build_engine(model_path, cfg, model_cfg)

    def generate(
        self,
        prompts: list[RolloutPrompt],
        greedy: bool = False,
        seed: int | None = None,
        group_size: int | None = None,
    ) -> list[Group]:
        return self.engine.generate(prompts, greedy=greedy, seed=seed, group_size=group_size)

    def update_weights(self, update: WeightUpdate) -> int:
        self.engine.update_weights(update)
        return self.engine.version

    def version(self) -> int:
        return self.engine.version


class RolloutFleet:
    """N rollout actors behind one ``generate`` and one ``update_weights``."""

    def __init__(
        self,
        model_path: str | Path,
        cfg: RolloutConfig,
        model_cfg: ModelConfig,
        cpus_per_actor: float = 1.0,
        placement_group=None,
        bundle_offset: int = 0,
    ):
        self.model_path = str(model_path)
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.cpus_per_actor = cpus_per_actor
        self.placement_group = placement_group
        self.bundle_offset = bundle_offset
        self.last_update: WeightUpdate | None = None
        self.actors = [self._spawn(i) for i in range(cfg.num_actors)]
        ray.get([a.version.remote() for a in self.actors])  # wait until every engine is up

    def _spawn(self, index: int):
        options = {"num_cpus": self.cpus_per_actor, "num_gpus": self.cfg.gpus_per_actor}
        if self.placement_group is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self.placement_group, placement_group_bundle_index=self.bundle_offset + index
            )
        actor = (
            ray.remote(RolloutWorker)
            .options(**options)
            .remote(self.model_path, self.cfg, self.model_cfg)
        )
        if self.last_update is not None:
            ray.get(actor.update_weights.remote(self.last_update))
        return actor

    def start(
        self,
        prompts: list[RolloutPrompt],
        greedy: bool = False,
        seed: int | None = None,
        retries: int = 2,
    ) -> PendingGroups:
        """Start generating groups for ``prompts`` on every actor; returns at once.

        The prompts are dealt in contiguous shards; with fewer prompts than actors, each
        prompt's G samples are split into parts instead (see the module docstring).
        """
        n = len(self.actors)
        group = self.cfg.group_size
        if not greedy and 0 < len(prompts) < n and group > 1:
            parts = min(n // len(prompts), group)
            shards = [
                Shard(i, [prompt], size, part, None if seed is None else seed + 7919 * part)
                for i, prompt in enumerate(prompts)
                for part, size in enumerate(split_evenly(group, parts))
            ]
        else:
            size = -(-len(prompts) // n) if prompts else 0
            shards = [
                Shard(i * size, prompts[i * size : (i + 1) * size], None, 0, seed)
                for i in range(n)
                if prompts[i * size : (i + 1) * size]
            ]
        return PendingGroups(self, shards, greedy, retries)

    def generate(
        self,
        prompts: list[RolloutPrompt],
        greedy: bool = False,
        seed: int | None = None,
        retries: int = 2,
    ) -> list[Group]:
        """Groups for all prompts, in order; a dead actor's shard is redone on its replacement."""
        return self.start(prompts, greedy, seed, retries).result()

    def update_weights(self, update: WeightUpdate) -> None:
        """Push new weights to every actor (a dead actor is replaced with them)."""
        self.last_update = update
        for i, actor in enumerate(self.actors):
            try:
                ray.get(actor.update_weights.remote(update))
            except RayActorError:
                log.warning("rollout actor %d died during a weight update; replacing it", i)
                self.actors[i] = self._spawn(i)

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` as ``parts`` sizes differing by at most one: split_evenly(4, 3) = [2, 1, 1]."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


@dataclass(frozen=True)
class Shard:
    """One actor's share of a rollout: prompts from ``offset`` on, or ``part`` of one prompt's
    samples (``group_size`` of them, with its own seed)."""

    offset: int
    prompts: list[RolloutPrompt]
    group_size: int | None  # None: rollout.group_size
    part: int
    seed: int | None


class PendingGroups:
    """Groups being generated by a fleet: each actor's shard can be taken as soon as it is done
    (:meth:`as_completed`; a prompt split into parts comes out once all its parts are in), or
    all of them in prompt order (:meth:`result`). A shard whose actor dies is generated again on
    a replacement, up to ``retries`` times."""

    def __init__(self, fleet: RolloutFleet, shards: list[Shard], greedy: bool, retries: int):
        self.fleet = fleet
        self.greedy = greedy
        self.retries = retries
        self.version = fleet.last_update.version if fleet.last_update is not None else 0
        self._shards = dict(enumerate(shards))
        n = len(fleet.actors)
        self._actor_of = {index: index % n for index in self._shards}
        self._attempts = dict.fromkeys(self._shards, 0)
        self._parts_of: dict[int, int] = {}
        for shard in shards:
            self._parts_of[shard.offset] = self._parts_of.get(shard.offset, 0) + 1
        self._refs = {self._submit(index): index for index in self._shards}

    def _submit(self, index: int):
        shard = self._shards[index]
        actor = self.fleet.actors[self._actor_of[index]]
        return actor.generate.remote(shard.prompts, self.greedy, shard.seed, shard.group_size)

    def as_completed(self) -> Iterator[tuple[int, list[Group]]]:
        """(index of the first prompt, its groups) for each shard, as each finishes."""
        waiting: dict[int, dict[int, Group]] = {}  # parts of split prompts, by offset and part
        while self._refs:
            (ref,), _ = ray.wait(list(self._refs), num_returns=1)
            index = self._refs.pop(ref)
            shard = self._shards[index]
            try:
                groups = ray.get(ref)
            except RayActorError as err:
                self._attempts[index] += 1
                if self._attempts[index] > self.retries:
                    raise
                actor = self._actor_of[index]
                log.warning(
                    "rollout actor %d died (%s); replacing it and redoing its %d prompts",
                    actor,
                    type(err).__name__,
                    len(shard.prompts),
                )
                self.fleet.actors[actor] = self.fleet._spawn(actor)
                self._refs[self._submit(index)] = index
                continue
            if self._parts_of[shard.offset] == 1:
                yield shard.offset, groups
                continue
            parts = waiting.setdefault(shard.offset, {})
            parts[shard.part] = groups[0]
            if len(parts) == self._parts_of[shard.offset]:
                first = parts[0]
                completions = tuple(c for p in sorted(parts) for c in parts[p].completions)
                yield (
                    shard.offset,
                    [Group(first.sample_id, first.prompt_token_ids, completions, first.version)],
                )
                del waiting[shard.offset]

    def result(self) -> list[Group]:
        """Every group, in prompt order."""
        done = dict(self.as_completed())
        return [g for offset in sorted(done) for g in done[offset]]
