"""MLflow tracking that never stops training: metrics are buffered while the server is away.

A ``Tracker`` opens (or, on resume, reopens) one MLflow run. If the tracking server cannot be
reached, it warns once, keeps every metric, parameter and artifact in memory, and sends them
when the server answers again (tried on each later call and at the end).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """Nested config dict -> {"grpo.lr": "2e-06", ...} for MLflow params (values as text)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)[:500]
    return out


class Tracker:
    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str | None = None,
        run_id: str | None = None,
    ):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.run_id = run_id
        self._metrics: list = []
        self._params: dict[str, str] = {}
        self._artifacts: list[tuple[str, str | None]] = []
        self._warned = False
        self._ready = False
        self._retry_at = 0.0  # after a failure, wait before trying the server again
        self._open()

    def _open(self) -> bool:
        if self.run_id is not None and self._ready:
            return True
        try:
            if self.run_id is None:
                exp = self.client.get_experiment_by_name(self.experiment)
                exp_id = (
                    exp.experiment_id if exp else self.client.create_experiment(self.experiment)
                )
                self.run_id = self.client.create_run(exp_id, run_name=self.run_name).info.run_id
            else:
                self.client.update_run(self.run_id, status="RUNNING")
            self._ready = True
            return True
        except Exception as err:  # noqa: BLE001 - any failure to reach MLflow is survivable
            self._ready = False
            self._failed(err)
            return False

    def _failed(self, err: Exception) -> None:
        self._retry_at = time.monotonic() + self.retry_after_s
        self._warn(err)

    retry_after_s = 30.0  # a down server is retried at most this often, not on every step

    def _warn(self, err: Exception) -> None:
        if not self._warned:
            log.warning(
                "MLflow at %s is unreachable (%s: %s); training goes on and metrics are "
                "kept to send later",
                self.tracking_uri,
                type(err).__name__,
                str(err)[:200],
            )
            self._warned = True

    def log_params(self, params: dict[str, str]) -> None:
        self._params.update(params)
        self.flush()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._metrics += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.flush()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._artifacts.append((str(path), artifact_path))
        self.flush()

    @property
    def pending(self) -> int:
        return len(self._metrics) + len(self._params) + len(self._artifacts)

    def flush(self, force: bool = False) -> bool:
        """Send what is buffered; False (and everything kept) when MLflow is unreachable.
        Within ``retry_after_s`` of a failure nothing is tried unless ``force``."""
        from mlflow.entities import Param

        if not force and time.monotonic() < self._retry_at:
            return False
        if not self._open():
            return False
        try:
            while self._params:
                items = list(self._params.items())[:100]
                self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in items])
                for k, _ in items:
                    del self._params[k]
            while self._metrics:
                chunk = self._metrics[:500]
                self.client.log_batch(self.run_id, metrics=chunk)
                del self._metrics[: len(chunk)]
            while self._artifacts:
                path, artifact_path = self._artifacts[0]
                self.client.log_artifact(self.run_id, path, artifact_path)
                self._artifacts.pop(0)
            if self._warned:
                log.warning("MLflow reachable again; buffered metrics sent")
                self._warned = False
            return True
        except Exception as err:  # noqa: BLE001
            self._failed(err)
            return False

    def end(self, status: str = "FINISHED") -> None:
        if self.flush(force=True):
            try:
                self.client.set_terminated(self.run_id, status=status)
            except Exception as err:  # noqa: BLE001
                self._warn(err)


def latest_run_id(tracking_uri: str, experiment: str, run_suffix: str = "grpo") -> str | None:
    """The newest run of ``experiment`` whose name ends with ``run_suffix``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    for run in client.search_runs([exp.experiment_id], order_by=["start_time DESC"]):
        if (run.info.run_name or "").endswith(run_suffix):
            return run.info.run_id
    return None


def metric_history(tracking_uri: str, run_id: str, name: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric of a run, in step order."""
    from mlflow.tracking import MlflowClient

    history = sorted(
        MlflowClient(tracking_uri).get_metric_history(run_id, name), key=lambda m: m.step
    )
    return [m.step for m in history], [m.value for m in history]


def plot_reward_curves(
    tracking_uri: str, experiment: str, out: Path, run_suffix: str = "grpo", smooth: int = 10
):
    """A PNG of the reward terms per step of the latest GRPO run of an experiment (the same
    curves the MLflow UI draws): raw points and a trailing mean over ``smooth`` steps (one
    prompt per step is noisy), for READMEs and terminals without a browser."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_id = latest_run_id(tracking_uri, experiment, run_suffix)
    if run_id is None:
        return None
    names = [
        "reward/total",
        "reward/format",
        "reward/axial",
        "reward/spatial",
        "reward/consistency",
        "learner/kl",
    ]
    fig, axes = plt.subplots(2, 3, figsize=(10, 5.5))
    for ax, name in zip(axes.ravel(), names):
        steps, values = metric_history(tracking_uri, run_id, name)
        ax.plot(steps, values, "o", ms=2, alpha=0.35, label="per step")
        if values:
            ax.plot(steps, moving_average(values, smooth), lw=2, label=f"mean of {smooth}")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("GRPO step", fontsize=8)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{experiment} / GRPO", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean over up to ``window`` points (shorter at the start): same length as input."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    v = np.asarray(values, dtype=np.float64)
    sums = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(0, idx - window)
    return (sums[idx] - sums[lo]) / (idx - lo)
