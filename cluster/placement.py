"""Where the parts of a GRPO run go: one placement group for the learner and rollout actors,
reward workers as Ray Serve replicas with their own resources."""

from __future__ import annotations

from dataclasses import dataclass

from cluster.config import RunConfig


@dataclass(frozen=True)
class Placement:
    learner: dict[str, float]  # resources of the learner actor
    rollout: list[dict[str, float]]  # one bundle per rollout actor
    reward: list[dict[str, float]]  # one entry per reward worker (Serve replica)
    strategy: str

    @property
    def bundles(self) -> list[dict[str, float]]:
        """Placement-group bundles: the learner first, then the rollout actors."""
        return [self.learner, *self.rollout]

    def total(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for bundle in [*self.bundles, *self.reward]:
            for key, value in bundle.items():
                out[key] = out.get(key, 0.0) + value
        return out


def _bundle(cpus: float, gpus: float) -> dict[str, float]:
    return {"CPU": cpus, **({"GPU": gpus} if gpus > 0 else {})}


def plan(cfg: RunConfig) -> Placement:
    """The placement a config asks for; raises ValueError naming the field when it cannot work."""
    c = cfg.cluster
    if cfg.rollout.num_actors < 1:
        raise ValueError(f"rollout.num_actors must be >= 1, got {cfg.rollout.num_actors}")
    if cfg.reward.num_workers < 1:
        raise ValueError(f"reward.num_workers must be >= 1, got {cfg.reward.num_workers}")
    if c.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
        raise ValueError(
            f"cluster.placement_strategy {c.placement_strategy!r} is not a Ray placement strategy"
        )
    return Placement(
        learner=_bundle(c.learner_cpus, c.learner_gpus),
        rollout=[
            _bundle(c.rollout_cpus, cfg.rollout.gpus_per_actor)
            for _ in range(cfg.rollout.num_actors)
        ],
        reward=[
            _bundle(c.reward_cpus, cfg.reward.gpus_per_worker)
            for _ in range(cfg.reward.num_workers)
        ],
        strategy=c.placement_strategy,
    )


def describe(p: Placement) -> str:
    lines = [f"placement group ({p.strategy}):", f"  bundle 0  learner        {p.learner}"]
    for i, bundle in enumerate(p.rollout, start=1):
        lines.append(f"  bundle {i}  rollout actor  {bundle}")
    for i, bundle in enumerate(p.reward):
        lines.append(f"  serve     reward worker {i} {bundle}")
    lines.append(f"  total     {p.total()}")
    return "\n".join(lines)
