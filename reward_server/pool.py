"""The reward pool on Ray: MedSAM2 reward workers as a Ray Serve deployment, scaled on their own.

Why Ray Serve rather than an actor pool: Serve already does what the pool needs and a hand-made
scheduler would re-implement — it routes each request to a live replica with room for it,
replaces a replica that dies, and changes the replica count of a running deployment in
place (new replicas start, in-flight requests finish). What Serve does not do is resend a
request whose replica died under it; :class:`RewardPool` does that, resending only requests that
failed for a system reason (dead or unreachable worker), never ones whose scoring itself raised.
No HTTP proxy is started: requests go through deployment handles only.

The completions of one sample (a group) travel as one Serve request, so they meet on one worker
and share its cached image features and one propagation (``RewardScorer.score_group``); routed
one by one they would land on different workers, each encoding the same volume. A worker takes
one group at a time and scores it with as many torch threads as CPUs it was given, so workers
on one machine do not fight over cores; waiting groups go to the first worker that frees.

:meth:`RewardPool.start` submits and returns at once; ``result()`` collects later (the GRPO
driver scores a group while others are still generating). A request not answered within
``reward.request_timeout_s`` of its start scores 0 with ``failure="reward timeout"``, is counted
(``RewardPool.timed_out``), and the run goes on; a request still waiting for a worker is
cancelled, one already running finishes there and its answer is dropped.

Requests carry a sample id and the completion text. Volumes reach the workers by reference: each
worker opens the same manifest with the shared on-disk cache of prepared samples, so a volume
is preprocessed once per machine and memory-mapped by every worker, never sent with a request.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace

import ray
from ray import serve
from ray.exceptions import RayError, RayTaskError

from common.config import DataConfig, RewardConfig
from reward_server.rewards import RewardBreakdown
from reward_server.scorer import RewardScorer, ScoreRequest, group_by_sample

log = logging.getLogger(__name__)

APP_NAME = "reward_server"
TIMEOUT_FAILURE = "reward timeout"
# What a request not answered in time scores: 0 on every term, and why.
TIMED_OUT = RewardBreakdown(0.0, 0.0, 0.0, 0.0, 0.0, failure=TIMEOUT_FAILURE)


# One group at a time per worker: the others wait at the router and go to whichever worker
# frees first, instead of being spread at submission by queue lengths that are already stale
# (measured: 4 groups on one worker and 2 on the other).
@serve.deployment(max_ongoing_requests=1, ray_actor_options={"num_cpus": 1})
class RewardWorker:
    """One frozen propagator and the reward terms; one request is the completions of a group."""

    def __init__(
        self, manifest: str, data_cfg: DataConfig, reward_cfg: RewardConfig, threads: int = 1
    ):
        from common.runtime import require_cuda, set_default_environment
        from data.dataset import VolumeDataset

        set_default_environment()
        require_cuda("reward worker", reward_cfg.gpus_per_worker)
        import torch

        torch.set_num_threads(max(1, threads))
        device = "cuda" if reward_cfg.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
        self.dataset = VolumeDataset(manifest, data_cfg, check_labels=False)
        self.scorer = RewardScorer(reward_cfg, device=device)
        self.scored = 0

    async def score(self, requests: list[ScoreRequest]) -> list[RewardBreakdown]:
        # A coroutine that never yields: Serve runs it on the replica's event loop, so groups
        # never overlap on a worker even if more were let in (a plain method would go to a
        # thread pool).
        out = self.scorer.score_requests(requests, lambda i: self.dataset.by_id(i)[1])
        self.scored += len(requests)
        return out

    def info(self) -> dict:
        return {
            "pid": os.getpid(),
            "scored": self.scored,
            "propagator": self.scorer.propagator.name,
        }


class PendingRewards:
    """Rewards being scored for the requests given to :meth:`RewardPool.start`."""

    def __init__(self, pool: RewardPool, requests: list[ScoreRequest]):
        self._pool = pool
        self._requests = list(requests)
        self._groups = list(group_by_sample(self._requests).values())
        # One deadline for every request: they all started now, wherever they queue.
        self.deadline = time.monotonic() + pool.reward_cfg.request_timeout_s
        self._calls = [pool._submit(self._group(g)) for g in range(len(self._groups))]
        self._results: list[RewardBreakdown] | None = None
        self.timed_out = 0  # requests of this batch scored 0 for want of an answer in time

    def _group(self, g: int) -> list[ScoreRequest]:
        return [self._requests[i] for i in self._groups[g]]

    def result(self, progress: bool = False) -> list[RewardBreakdown]:
        """The rewards in request order; waits at most until the deadline.

        A group whose worker died (or was unreachable) is resent, up to ``request_retries``
        times; an error raised by the scoring itself is raised here, naming the sample.
        """
        if self._results is None:
            from tqdm import tqdm

            results: list[RewardBreakdown | None] = [None] * len(self._requests)
            with tqdm(total=len(self._requests), desc="rewards", disable=not progress) as bar:
                for g, indices in enumerate(self._groups):
                    for i, reward in zip(indices, self._collect(g)):
                        results[i] = reward
                    bar.update(len(indices))
            self._results = results  # type: ignore[assignment]
        return self._results  # type: ignore[return-value]

    def _collect(self, g: int) -> list[RewardBreakdown]:
        sample_id = self._requests[self._groups[g][0]].sample_id
        call, attempts = self._calls[g], 0
        while True:
            try:
                return call.result(timeout_s=max(0.0, self.deadline - time.monotonic()))
            except RayTaskError as err:
                raise RuntimeError(f"scoring sample {sample_id!r} failed: {err}") from err
            except TimeoutError:
                call.cancel()  # a group still waiting for a worker is never run
                return self._time_out(g)
            except (RayError, RuntimeError) as err:
                if time.monotonic() >= self.deadline:
                    return self._time_out(g)
                attempts += 1
                if attempts > self._pool.reward_cfg.request_retries:
                    raise RuntimeError(
                        f"sample {sample_id!r}: no reward worker answered after "
                        f"{attempts} attempts ({type(err).__name__}: {err})"
                    ) from err
                log.warning("reward worker lost (%s); resending %s", type(err).__name__, sample_id)
                time.sleep(min(0.5 * attempts, max(0.0, self.deadline - time.monotonic())))
                call = self._pool._submit(self._group(g))

    def _time_out(self, g: int) -> list[RewardBreakdown]:
        group = self._group(g)
        log.warning(
            "reward timeout: %d completion(s) of %s not scored within %.0f s; they score 0",
            len(group),
            group[0].sample_id,
            self._pool.reward_cfg.request_timeout_s,
        )
        self.timed_out += len(group)
        self._pool.timed_out += len(group)
        return [TIMED_OUT] * len(group)


class RewardPool:
    """Driver-side handle on the reward workers: score, scale, and survive dead workers."""

    def __init__(
        self,
        manifest: str,
        data_cfg: DataConfig,
        reward_cfg: RewardConfig,
        cpus_per_worker: float = 1.0,
        name: str = APP_NAME,
    ):
        if not ray.is_initialized():
            raise RuntimeError("RewardPool needs Ray: call ray.init(...) first")
        self.manifest = str(manifest)
        self.data_cfg = data_cfg
        self.reward_cfg = reward_cfg
        # Workers are built from this exact config whatever the replica count, so that scaling
        # changes only num_replicas and Serve keeps the running replicas (no restart).
        self._worker_cfg = replace(reward_cfg, num_workers=1)
        self.cpus_per_worker = cpus_per_worker
        self.name = name
        self.timed_out = 0  # requests scored 0 because no answer came in time, since start
        serve.start(proxy_location="Disabled", http_options={"host": "127.0.0.1"})
        self._deploy(reward_cfg.num_workers)

    @property
    def num_workers(self) -> int:
        return self.reward_cfg.num_workers

    def _deploy(self, num_workers: int) -> None:
        options = {"num_cpus": self.cpus_per_worker}
        if self.reward_cfg.gpus_per_worker > 0:
            options["num_gpus"] = self.reward_cfg.gpus_per_worker
        # Torch threads = CPUs given: workers sharing a machine then do not oversubscribe it.
        threads = max(1, int(self.cpus_per_worker))
        app = RewardWorker.options(num_replicas=num_workers, ray_actor_options=options).bind(
            self.manifest, self.data_cfg, self._worker_cfg, threads
        )
        # External scaling lets the replica count change later without redeploying, so running
        # replicas (and their cached features) are kept.
        self.handle = serve.run(
            app, name=self.name, route_prefix=None, external_scaler_enabled=True
        )

    def scale(self, num_workers: int) -> None:
        """Run ``num_workers`` replicas. Running replicas are kept; only the difference is
        started or stopped (replicas being stopped finish their requests first).

        Outside the driver, the same is one HTTP call to the Ray dashboard:
        ``POST /api/v1/applications/reward_server/deployments/RewardWorker/scale`` with
        ``{"target_num_replicas": N}``.
        """
        if num_workers < 1:
            raise ValueError(f"reward workers must be >= 1, got {num_workers}")
        from ray.serve._private.common import DeploymentID
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        ray.get(
            controller.update_deployment_replicas.remote(
                DeploymentID(name="RewardWorker", app_name=self.name), num_workers
            )
        )
        self.reward_cfg = replace(self.reward_cfg, num_workers=num_workers)
        deadline = time.monotonic() + 300
        while len(self.workers()) != num_workers and time.monotonic() < deadline:
            time.sleep(0.2)
        log.info("reward pool: %d worker(s)", num_workers)

    def _submit(self, group: list[ScoreRequest]):
        return self.handle.score.remote(group)

    def start(self, requests: list[ScoreRequest]) -> PendingRewards:
        """Submit requests and return at once; ``.result()`` gives their rewards in request
        order. Each sample's requests go to one worker together (see module doc)."""
        return PendingRewards(self, requests)

    def score(self, requests: list[ScoreRequest], progress: bool = False) -> list[RewardBreakdown]:
        """Score requests concurrently across workers; results in request order."""
        return self.start(requests).result(progress=progress)

    def workers(self) -> list[str]:
        """Actor names of the live replicas (for operators and tests)."""
        status = serve.status().applications.get(self.name)
        if status is None:
            return []
        return [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if "SERVE_REPLICA" in a["name"] and self.name in a["name"]
        ]

    def shutdown(self) -> None:
        serve.delete(self.name)
