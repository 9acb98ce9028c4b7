"""The reward pool on Ray: MedSAM2 reward workers as a Ray Serve deployment, scaled on their own.

Why Ray Serve rather than an actor pool: Serve already does what the pool needs and a hand-made
scheduler would re-implement — it routes each request to a live replica, batches requests per
replica (``@serve.batch``, so the G completions of a prompt meet on one worker and share its
cached image features), replaces a replica that dies, and changes the replica count of a running
deployment in place (new replicas start, in-flight requests finish). What Serve does not do is
resend a request whose replica died under it; :class:`RewardPool` does that, resending only
requests that failed for a system reason (dead or unreachable worker), never ones whose scoring
itself raised. No HTTP proxy is started: requests go through deployment handles only.

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

from data.config import DataConfig
from reward_server.config import RewardConfig
from reward_server.rewards import RewardBreakdown
from reward_server.scorer import RewardScorer, ScoreRequest

log = logging.getLogger(__name__)

APP_NAME = "reward_server"


@serve.deployment(max_ongoing_requests=32, ray_actor_options={"num_cpus": 1})
class RewardWorker:
    """One frozen propagator and the reward terms, behind Serve's batching."""

    def __init__(
        self, manifest: str, data_cfg: DataConfig, reward_cfg: RewardConfig, threads: int = 1
    ):
        from cluster.runtime import set_default_environment
        from data.dataset import VolumeDataset

        set_default_environment()
        import torch

        torch.set_num_threads(max(1, threads))
        device = "cuda" if reward_cfg.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
        self.dataset = VolumeDataset(manifest, data_cfg, check_labels=False)
        self.scorer = RewardScorer(reward_cfg, device=device)
        self.score.set_max_batch_size(reward_cfg.max_batch_size)
        self.score.set_batch_wait_timeout_s(reward_cfg.batch_wait_s)
        self.scored = 0

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def score(self, requests: list[ScoreRequest]) -> list[RewardBreakdown]:
        out = self.scorer.score_requests(requests, lambda i: self.dataset.by_id(i)[1])
        self.scored += len(requests)
        return out

    def info(self) -> dict:
        return {
            "pid": os.getpid(),
            "scored": self.scored,
            "propagator": self.scorer.propagator.name,
        }


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
        serve.start(proxy_location="Disabled", http_options={"host": "127.0.0.1"})
        self._deploy(reward_cfg.num_workers)

    @property
    def num_workers(self) -> int:
        return self.reward_cfg.num_workers

    def _deploy(self, num_workers: int) -> None:
        options = {"num_cpus": self.cpus_per_worker}
        if self.reward_cfg.gpus_per_worker > 0:
            options["num_gpus"] = self.reward_cfg.gpus_per_worker
        app = RewardWorker.options(num_replicas=num_workers, ray_actor_options=options).bind(
            self.manifest, self.data_cfg, self._worker_cfg, max(1, int(self.cpus_per_worker))
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

    def submit(self, request: ScoreRequest):
        return self.handle.score.remote(request)

    def score(
        self, requests: list[ScoreRequest], progress: bool = False, timeout_s: float = 600.0
    ) -> list[RewardBreakdown]:
        """Score requests concurrently across workers; results in request order.

        A request whose worker died (or was unreachable) is resent, up to ``request_retries``
        times; an error raised by the scoring itself is raised here, naming the sample.
        """
        from tqdm import tqdm

        pending = {i: self.submit(r) for i, r in enumerate(requests)}
        attempts = dict.fromkeys(pending, 0)
        results: list[RewardBreakdown | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="rewards", disable=not progress)
        deadline = time.monotonic() + timeout_s
        while pending:
            for i in list(pending):
                try:
                    results[i] = pending.pop(i).result(
                        timeout_s=max(1.0, deadline - time.monotonic())
                    )
                    bar.update(1)
                except RayTaskError as err:
                    raise RuntimeError(
                        f"scoring sample {requests[i].sample_id!r} failed: {err}"
                    ) from err
                except (RayError, RuntimeError) as err:
                    if isinstance(err, TimeoutError) or time.monotonic() > deadline:
                        raise
                    attempts[i] += 1
                    if attempts[i] > self.reward_cfg.request_retries:
                        raise RuntimeError(
                            f"sample {requests[i].sample_id!r}: no reward worker answered after "
                            f"{attempts[i]} attempts ({type(err).__name__}: {err})"
                        ) from err
                    log.warning(
                        "reward worker lost (%s); resending %s",
                        type(err).__name__,
                        requests[i].sample_id,
                    )
                    time.sleep(0.5 * attempts[i])
                    pending[i] = self.submit(requests[i])
        bar.close()
        return results  # type: ignore[return-value]

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
