"""MLflow tracking survives a server that is down and sends what it kept once it is up."""

import logging

import pytest

from common.services import MlflowServer, free_port
from common.tracking import Tracker

pytestmark = pytest.mark.slow


def test_unreachable_server_is_a_warning_and_metrics_are_sent_later(tmp_path, caplog):
    from mlflow.tracking import MlflowClient

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    with caplog.at_level(logging.WARNING):
        tracker = Tracker(uri, "outage", "run")  # nothing listens there yet
        tracker.log_params({"grpo.lr": "2e-06"})
        for step in (1, 2, 3):
            tracker.log_metrics({"reward/total": step / 10}, step)
    assert tracker.run_id is None and tracker.pending == 4
    assert sum("unreachable" in r.message for r in caplog.records) == 1  # warned once
    server = MlflowServer.start(
        tmp_path / "mlflow.db", tmp_path / "artifacts", tmp_path / "mlflow.log", port=port
    )
    try:
        assert tracker.flush(force=True)
        tracker.log_metrics({"reward/total": 0.4}, 4)
        tracker.end()
        client = MlflowClient(uri)
        history = client.get_metric_history(tracker.run_id, "reward/total")
        assert sorted((m.step, round(m.value, 3)) for m in history) == [
            (1, 0.1),
            (2, 0.2),
            (3, 0.3),
            (4, 0.4),
        ]
        assert client.get_run(tracker.run_id).data.params["grpo.lr"] == "2e-06"
    finally:
        server.stop()
