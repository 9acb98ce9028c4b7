"""The Ray layer of rollout: engines in actors, data-parallel over prompts, weights broadcast.

Each actor holds one engine (one GPU each on a cluster: ``rollout.gpus_per_actor = 1``). A batch
of prompts is dealt to the actors in contiguous shards and the groups come back in prompt order.
An actor that dies is replaced by a fresh one, brought to the current weights, and its shard is
generated again.
"""

from __future__ import annotations

import logging
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
        from cluster.runtime import set_default_environment

        set_default_environment()
        self.engine = build_engine(model_path, cfg, model_cfg)

    def generate(
        self, prompts: list[RolloutPrompt], greedy: bool = False, seed: int | None = None
    ) -> list[Group]:
        return self.engine.generate(prompts, greedy=greedy, seed=seed)

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

    def generate(
        self,
        prompts: list[RolloutPrompt],
        greedy: bool = False,
        seed: int | None = None,
        retries: int = 2,
    ) -> list[Group]:
        """Groups for all prompts, in order; a dead actor's shard is redone on its replacement."""
        n = len(self.actors)
        size = -(-len(prompts) // n)
        shards = [prompts[i * size : (i + 1) * size] for i in range(n)]
        refs = {
            i: self.actors[i].generate.remote(s, greedy, seed) for i, s in enumerate(shards) if s
        }
        results: dict[int, list[Group]] = {}
        attempts = dict.fromkeys(refs, 0)
        while refs:
            for i in list(refs):
                try:
                    results[i] = ray.get(refs.pop(i))
                except RayActorError as err:
                    attempts[i] += 1
                    if attempts[i] > retries:
                        raise
                    log.warning(
                        "rollout actor %d died (%s); replacing it and redoing its %d prompts",
                        i,
                        type(err).__name__,
                        len(shards[i]),
                    )
                    self.actors[i] = self._spawn(i)
                    refs[i] = self.actors[i].generate.remote(shards[i], greedy, seed)
        return [g for i in sorted(results) for g in results[i]]

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
