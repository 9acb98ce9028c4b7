"""Where the parts of a GRPO run go: one placement group for the learner ranks and rollout
actors, reward workers as Ray Serve replicas with their own resources.

GPU requests follow Ray's rule for a unit-instance resource such as ``GPU`` (Ray 2.60): a
request below 1 is a share of one GPU, and shares are packed on a GPU until it is full (four
``reward.gpus_per_worker: 0.25`` workers on one GPU); a request of 1 or more takes that many
whole, unshared GPUs, so it must be a whole number (1.5 is refused); Ray keeps quantities to
0.0001 (``RESOURCE_UNIT_SCALING``), and so does the arithmetic here, in units of 1/10000 GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.config import RunConfig

GPU_UNITS = 10_000  # Ray's fixed-point scale for resource quantities (0.0001 GPU)


@dataclass(frozen=True)
class Placement:
    learners: list[dict[str, float]]  # one bundle per learner rank (grpo.num_learners)
    rollout: list[dict[str, float]]  # one bundle per rollout actor
    reward: list[dict[str, float]]  # one entry per reward worker (Serve replica)
    strategy: str

    @property
    def learner(self) -> dict[str, float]:
        """Resources of one learner rank."""
        return self.learners[0]

    @property
    def bundles(self) -> list[dict[str, float]]:
        """Placement-group bundles: the learner ranks first, then the rollout actors."""
        return [*self.learners, *self.rollout]

    def learner_role(self, rank: int) -> str:
        return "learner" if len(self.learners) == 1 else f"learner rank {rank}"

    def total(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for bundle in [*self.bundles, *self.reward]:
            for key, value in bundle.items():
                out[key] = out.get(key, 0.0) + value
        return out


def _bundle(cpus: float, gpus: float, extra: dict[str, float] | None = None) -> dict[str, float]:
    return {"CPU": cpus, **({"GPU": gpus} if gpus > 0 else {}), **(extra or {})}


def check_gpus(field: str, gpus: float) -> None:
    """Refuse a GPU request Ray cannot place (module docstring), naming the field and value."""
    if gpus < 0:
        raise ValueError(f"{field} must be >= 0, got {gpus:g}")
    if gpus > 1 and gpus != int(gpus):
        raise ValueError(
            f"{field} {gpus:g}: Ray gives a share of one GPU (below 1) or whole GPUs (1 or "
            "more), so a request above 1 must be a whole number (e.g. 1 or 2)"
        )
    if 0 < gpus * GPU_UNITS < 1:
        raise ValueError(f"{field} {gpus:g}: Ray's smallest GPU share is 0.0001")


def plan(cfg: RunConfig) -> Placement:
    """The placement a config asks for; raises ValueError naming the field when it cannot work."""
    c = cfg.cluster
    check_gpus("cluster.learner_gpus", c.learner_gpus)
    check_gpus("rollout.gpus_per_actor", cfg.rollout.gpus_per_actor)
    check_gpus("reward.gpus_per_worker", cfg.reward.gpus_per_worker)
    if cfg.rollout.num_actors < 1:
        raise ValueError(f"rollout.num_actors must be >= 1, got {cfg.rollout.num_actors}")
    if cfg.reward.num_workers < 1:
        raise ValueError(f"reward.num_workers must be >= 1, got {cfg.reward.num_workers}")
    if c.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
        raise ValueError(
            f"cluster.placement_strategy {c.placement_strategy!r} is not a Ray placement strategy"
        )
    return Placement(
        learners=[
            _bundle(c.learner_cpus, c.learner_gpus, c.learner_resources)
            for _ in range(cfg.grpo.num_learners)
        ],
        rollout=[
            _bundle(c.rollout_cpus, cfg.rollout.gpus_per_actor, c.rollout_resources)
            for _ in range(cfg.rollout.num_actors)
        ],
        reward=[
            _bundle(c.reward_cpus, cfg.reward.gpus_per_worker)
            for _ in range(cfg.reward.num_workers)
        ],
        strategy=c.placement_strategy,
    )


def describe(p: Placement) -> str:
    lines = [f"placement group ({p.strategy}):"]
    for i, bundle in enumerate(p.learners):
        lines.append(f"  bundle {i}  {p.learner_role(i):14s} {bundle}")
    for i, bundle in enumerate(p.rollout, start=len(p.learners)):
        lines.append(f"  bundle {i}  rollout actor  {bundle}")
    for i, bundle in enumerate(p.reward):
        lines.append(f"  serve     reward worker {i} {bundle}")
    lines.append(f"  total     {p.total()}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Node:
    """One machine of a cluster description: its GPUs and CPUs."""

    gpus: int
    cpus: float


def parse_cluster(text: str) -> list[Node]:
    """A cluster description: GPUs per node, comma separated, each optionally ``:CPUs``
    (``8`` is one node of 8 GPUs; ``4,4`` two nodes of 4; ``4:32,4:32`` with 32 CPUs each;
    CPUs default to 8 per GPU, at least 8)."""
    nodes = []
    for i, part in enumerate(text.split(",")):
        gpus, _, cpus = part.strip().partition(":")
        try:
            n_gpus = int(gpus)
            n_cpus = float(cpus) if cpus else float(max(8, 8 * n_gpus))
        except ValueError:
            raise ValueError(
                f"--cluster: node {i} {part!r} is not GPUS or GPUS:CPUS (e.g. 8 or 4:32)"
            ) from None
        if n_gpus < 0 or n_cpus <= 0:
            raise ValueError(f"--cluster: node {i} {part!r}: GPUs must be >= 0 and CPUs > 0")
        nodes.append(Node(n_gpus, n_cpus))
    return nodes


@dataclass(frozen=True)
class Assignment:
    role: str  # "learner", "rollout actor 0", "reward worker 1"
    node: int
    gpus: tuple[int, ...]  # GPU indices on that node
    cpus: float
    gpu_share: float = 1.0  # the share of each listed GPU the role holds (< 1: a shared GPU)


def assign(p: Placement, nodes: list[Node]) -> list[Assignment]:
    """Which role gets which GPUs on which node, the way Ray would place them: the placement
    group's bundles (learner, then rollout actors) by its strategy, then the reward workers
    (Serve replicas) first-fit on what is left. A request of 1 or more GPUs takes that many
    untouched GPUs; a share below 1 goes on the first GPU of the node with that much left, so
    shares pack a GPU before the next is used (module docstring). Raises ValueError when the
    cluster cannot hold the plan, naming the role and what it lacks."""
    # Free share of every GPU, in 1/GPU_UNITS of a GPU.
    free = [[GPU_UNITS] * n.gpus for n in nodes]
    free_cpus = [n.cpus for n in nodes]
    out: list[Assignment] = []

    def pick(left: list[int], gpus: float) -> list[int] | None:
        """The GPUs a request would get from a node's free shares ``left``, or None."""
        if gpus >= 1:
            whole = [g for g, units in enumerate(left) if units == GPU_UNITS]
            return whole[: int(gpus)] if len(whole) >= gpus else None
        if gpus <= 0:
            return []
        share = round(gpus * GPU_UNITS)
        return next(([g] for g, units in enumerate(left) if units >= share), None)

    def hold(left: list[int], picked: list[int], gpus: float) -> None:
        for g in picked:
            left[g] -= GPU_UNITS if gpus >= 1 else round(gpus * GPU_UNITS)

    def fits(node: int, needs: list[dict[str, float]]) -> bool:
        """Whether all ``needs`` fit on ``node`` together."""
        left, cpus = list(free[node]), free_cpus[node]
        for need in needs:
            picked = pick(left, need.get("GPU", 0))
            cpus -= need.get("CPU", 0)
            if picked is None or cpus < 0:
                return False
            hold(left, picked, need.get("GPU", 0))
        return True

    def take(role: str, node: int, need: dict[str, float]) -> None:
        gpus = need.get("GPU", 0)
        picked = pick(free[node], gpus)
        assert picked is not None, f"{role} was placed on node {node} without room"
        hold(free[node], picked, gpus)
        free_cpus[node] -= need.get("CPU", 0)
        out.append(Assignment(role, node, tuple(picked), need.get("CPU", 0), min(gpus, 1.0)))

    def refuse(role: str, need: dict[str, float], why: str = "") -> ValueError:
        def gpus_free(left: list[int]) -> str:
            whole = sum(1 for f in left if f == GPU_UNITS)
            shared = [
                f"{f / GPU_UNITS:g} of GPU {g}" for g, f in enumerate(left) if 0 < f < GPU_UNITS
            ]
            return f"{whole} GPUs" + "".join(f" + {s}" for s in shared)

        have = ", ".join(
            f"node {i}: {gpus_free(left)}, {c:g} CPUs free"
            for i, (left, c) in enumerate(zip(free, free_cpus))
        )
        return ValueError(f"{role} needs {need}{why}; the cluster has {have}")

    roles = [(p.learner_role(i), b) for i, b in enumerate(p.learners)]
    roles += [(f"rollout actor {i}", b) for i, b in enumerate(p.rollout)]
    if p.strategy.startswith("STRICT_PACK"):
        needs = [need for _, need in roles]
        home = next((i for i in range(len(nodes)) if fits(i, needs)), None)
        if home is None:
            total = {k: sum(b.get(k, 0) for b in needs) for k in ("GPU", "CPU")}
            raise refuse("the placement group (STRICT_PACK)", total, " on one node")
        for role, need in roles:
            take(role, home, need)
    else:
        spread = p.strategy in ("SPREAD", "STRICT_SPREAD")
        used: set[int] = set()
        for k, (role, need) in enumerate(roles):
            order = list(range(len(nodes)))
            if spread:  # rotate, so bundles go to different nodes where they can
                order = order[k % len(nodes) :] + order[: k % len(nodes)]
                if p.strategy == "STRICT_SPREAD":
                    order = [i for i in order if i not in used]
            node = next((i for i in order if fits(i, [need])), None)
            if node is None:
                raise refuse(role, need)
            used.add(node)
            take(role, node, need)
    for i, need in enumerate(p.reward):
        role = f"reward worker {i}"
        node = next((n for n in range(len(nodes)) if fits(n, [need])), None)
        if node is None:
            raise refuse(role, need)
        take(role, node, need)
    return out


def describe_assignment(assignments: list[Assignment], nodes: list[Node]) -> str:
    lines = [
        "cluster: "
        + ", ".join(f"node {i} ({n.gpus} GPUs, {n.cpus:g} CPUs)" for i, n in enumerate(nodes))
    ]
    for a in assignments:
        gpus = f"GPU {','.join(map(str, a.gpus))}" if a.gpus else "no GPU"
        if a.gpus and a.gpu_share < 1:
            gpus += f" ({a.gpu_share:g})"
        lines.append(f"  {a.role:18s} node {a.node}  {gpus:10s}  {a.cpus:g} CPUs")
    for i, n in enumerate(nodes):
        taken = {g for a in assignments if a.node == i for g in a.gpus}
        idle = [g for g in range(n.gpus) if g not in taken]
        if idle:
            lines.append(f"  idle               node {i}  GPU {','.join(map(str, idle))}")
    return "\n".join(lines)
