"""The Ray layer of rollout: engines in actors, data-parallel over prompts, weights broadcast.

Each actor holds one engine (one GPU each on a cluster: ``rollout.gpus_per_actor = 1``). A batch
of prompts is dealt to the actors in contiguous shards and the groups come back in prompt order.
When there are fewer prompts than actors (the paper's batch is one prompt), the G samples of
each prompt are split across actors instead, each part with its own seed, and put back together
as one group, so no actor idles. An actor that dies is replaced by a fresh one, brought to the
current weights, and its shard is generated again.

Nothing here needs a disk shared with the learner: a pushed adapter arrives as tensors through
Ray's object store and goes into the engine from memory; merged weights arrive as bytes (or
over the weight group, ``rollout.vllm_engine.WeightGroup``). Each actor writes what its engine
loads from a folder into its own node-local scratch folder (:func:`node_scratch`): adapters or
weights pushed as a folder's bytes, and the policy base (the base checkpoint with the SFT
adapter merged in), built once per node from the base checkpoint and the SFT adapter's bytes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.exceptions import RayActorError

from common.config import ModelConfig, RolloutConfig
from rollout.records import FolderBytes, Group, RolloutPrompt, WeightSyncError, WeightUpdate

log = logging.getLogger(__name__)

SCRATCH_ENV = "MEDVOL_SCRATCH"  # a node's own scratch root, set in that node's environment


def scratch_root(configured: str | Path | None = None) -> Path:
    """The root of this node's scratch folders: ``$MEDVOL_SCRATCH`` where the node sets it,
    else ``cluster.scratch_dir``, else the system's temporary folder."""
    root = os.environ.get(SCRATCH_ENV) or configured
    return Path(root) if root else Path(tempfile.gettempdir()) / "medvol-r1-scratch"


def node_id() -> str:
    """This process's Ray node ("local" without Ray)."""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


def node_folder(configured: str | Path | None = None) -> Path:
    """This Ray node's folder under the scratch root (one per node, even for two Ray nodes on
    one machine)."""
    folder = scratch_root(configured) / f"node-{node_id()[:12]}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def node_scratch(role: str, configured: str | Path | None = None) -> Path:
    """A fresh scratch folder of one process on this node (``<role>-<pid>``)."""
    folder = node_folder(configured) / f"{role}-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def close_actors(actors: list, timeout_s: float = 60.0) -> None:
    """Let each actor clean up (its ``close()``: its scratch folder), then kill them all; an
    actor that is dead or does not answer within ``timeout_s`` is killed all the same."""
    try:
        ray.get([a.close.remote() for a in actors], timeout=timeout_s)
    except (RayActorError, ray.exceptions.GetTimeoutError):
        pass
    for actor in actors:
        ray.kill(actor)


def policy_base(model_path: str | Path, adapter: FolderBytes, node: Path) -> Path:
    """The base checkpoint with ``adapter`` merged in, built once on this node (the actors of a
    node share it; a lock keeps two from building it at once) in ``node``."""
    from common.runtime import file_lock
    from rollout.hf_engine import merge_adapter

    digest = hashlib.sha256(str(Path(model_path).resolve()).encode())
    for name in sorted(adapter.files):
        digest.update(name.encode() + b"\0" + adapter.files[name])
    key = digest.hexdigest()[:16]
    out = node / f"policy-base-{key}"
    with file_lock(node / f"policy-base-{key}.lock"):
        if not (out / "config.json").exists():
            source = adapter.write(node / f"sft-adapter-{key}")
            merge_adapter(Path(model_path), source, out)
            shutil.rmtree(source, ignore_errors=True)
    return out


def build_engine(model_path: str | Path, cfg: RolloutConfig, model_cfg: ModelConfig | None = None):
    """The engine a config names: vLLM, or transformers where vLLM is not wanted."""
    if cfg.engine == "vllm":
        from rollout.vllm_engine import VLLMEngine

        return VLLMEngine(model_path, cfg, model_cfg)
    from rollout.hf_engine import TransformersEngine

    return TransformersEngine(model_path, cfg, model_cfg)


class RolloutWorker:
    """One engine inside a Ray actor, with its node-local scratch folder.

    ``base_adapter``: the SFT adapter's bytes; the engine then serves ``model_path`` with it
    merged in (the policy base). Pushed adapters are kept in the scratch folder, the newest
    ``keep_adapters`` of them; pushed full weights only until loaded.
    """

    def __init__(
        self,
        model_path: str,
        cfg: RolloutConfig,
        model_cfg: ModelConfig,
        base_adapter: FolderBytes | None = None,
        scratch_dir: str | None = None,
        keep_adapters: int = 2,
    ):
        from common.runtime import require_cuda, set_default_environment

        set_default_environment()
        require_cuda("rollout actor", cfg.gpus_per_actor)
        self.scratch = node_scratch("rollout", scratch_dir)
        self.keep_adapters = keep_adapters
        if base_adapter is not None:
            model_path = str(policy_base(model_path, base_adapter, self.scratch.parent))
        self.served = [str(model_path)]  # every folder the engine has loaded, in order
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
        """Load ``update``: a folder's bytes are written to this actor's scratch folder first;
        an adapter's tensors go to the engine as they are."""
        from common.runtime import prune

        if update.adapter is not None:
            folder = update.adapter.write(self.scratch / f"adapter-v{update.version}")
            update = WeightUpdate(update.version, adapter_dir=folder)
        elif update.weights is not None:
            folder = update.weights.write(self.scratch / f"merged-v{update.version}")
            update = WeightUpdate(update.version, weights_dir=folder)
        self.engine.update_weights(update)
        for folder in (update.adapter_dir, update.weights_dir):
            if folder is not None:
                self.served.append(str(folder))
        # The engine holds what it loaded in memory: older adapters and loaded weights can go.
        prune(self.scratch, "adapter-v", self.keep_adapters)
        prune(self.scratch, "merged-v", 0)
        return self.engine.version

    def join_weight_group(self, host: str, port: int, rank: int, world: int, timeout_s: float):
        self.engine.join_weight_group(host, port, rank, world, timeout_s)
        return rank

    def version(self) -> int:
        return self.engine.version

    def where(self) -> dict:
        """This actor's node, scratch folder and every folder its engine loaded (diagnostics)."""
        return {"node": node_id(), "scratch": str(self.scratch), "served": list(self.served)}

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)


class RolloutFleet:
    """N rollout actors behind one ``generate`` and one ``update_weights``.

    ``catch_up``: for pushes over the weight group, which cannot be replayed to a replacement
    actor, a function returning the current weights as an update that can (bytes). Each
    replacement increments ``replacements``, so the owner of a weight group knows to form it
    again.
    """

    def __init__(
        self,
        model_path: str | Path,
        cfg: RolloutConfig,
        model_cfg: ModelConfig,
        cpus_per_actor: float = 1.0,
        placement_group=None,
        bundle_offset: int = 0,
        base_adapter: FolderBytes | None = None,
        scratch_dir: str | None = None,
        keep_adapters: int = 2,
        sync_timeout_s: float = 600.0,
        catch_up=None,
    ):
        self.model_path = str(model_path)
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.cpus_per_actor = cpus_per_actor
        self.placement_group = placement_group
        self.bundle_offset = bundle_offset
        # One copy in the object store however many actors (and replacements) read it.
        self.base_adapter = ray.put(base_adapter) if base_adapter is not None else None
        self.scratch_dir = scratch_dir
        self.keep_adapters = keep_adapters
        self.sync_timeout_s = sync_timeout_s
        self.catch_up = catch_up
        self.last_update = None  # a WeightUpdate or an object ref to one
        self.version = 0
        self.replacements = 0
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
            .remote(
                self.model_path,
                self.cfg,
                self.model_cfg,
                self.base_adapter,
                self.scratch_dir,
                self.keep_adapters,
            )
        )
        update = self.last_update
        if isinstance(update, WeightUpdate) and update.broadcast is not None:
            if self.catch_up is None:
                raise WeightSyncError(
                    f"rollout actor {index} was replaced and weight version {self.version} "
                    "came over the weight group: nothing can bring the replacement to it"
                )
            update = self.catch_up()
        if update is not None:
            ray.get(actor.update_weights.remote(update), timeout=self.sync_timeout_s)
        return actor

    def _replace(self, index: int) -> None:
        self.actors[index] = self._spawn(index)
        self.replacements += 1

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

    def update_weights(self, update, version: int | None = None, alongside=()) -> None:
        """Push new weights to every actor at once and wait for all of them, at most
        ``sync_timeout_s`` (then :class:`WeightSyncError`); a dead actor is replaced with them.

        ``update``: a WeightUpdate, or an object ref to one (then ``version`` says its version):
        each actor fetches it from the object store of the node that made it. ``alongside``:
        object refs that must finish with the push (learner rank 0 sending a broadcast).
        """
        if version is None:
            version = update.version
        refs = {actor.update_weights.remote(update): i for i, actor in enumerate(self.actors)}
        waiting = [*refs, *alongside]
        done, late = ray.wait(waiting, num_returns=len(waiting), timeout=self.sync_timeout_s)
        if late:
            actors = sorted(refs[r] for r in late if r in refs)
            who = f"rollout actors {actors}" if actors else "learner rank 0"
            raise WeightSyncError(
                f"weight version {version}: {who} did not finish the push within "
                f"{self.sync_timeout_s:g} s (cluster.weight_sync_timeout_s)"
            )
        ray.get(list(alongside))
        self.last_update, self.version = update, version
        for ref, i in refs.items():
            try:
                ray.get(ref)
            except RayActorError:
                log.warning("rollout actor %d died during a weight update; replacing it", i)
                self._replace(i)

    def join_weight_group(self, host: str, port: int, world: int, timeout_s: float) -> list:
        """Start every actor joining the weight group at ``host:port`` (actor i as rank i + 1);
        returns the object refs to wait on together with rank 0's own join."""
        return [
            actor.join_weight_group.remote(host, port, i + 1, world, timeout_s)
            for i, actor in enumerate(self.actors)
        ]

    def shutdown(self) -> None:
        """Remove every actor's scratch folder, then the actors."""
        close_actors(self.actors)
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
        self.version = fleet.version
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
                self.fleet._replace(actor)
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
