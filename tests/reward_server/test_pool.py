"""The Ray Serve reward pool, for real on a local Ray instance: concurrency, failures, scaling."""

import threading
import time

import pytest
import ray

from common.config import RewardConfig
from data.answer import EvidenceAnchor, format_answer
from reward_server.pool import TIMED_OUT, TIMEOUT_FAILURE, RewardPool
from reward_server.scorer import RewardScorer, ScoreRequest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_instance():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def requests(dataset, true_anchor):
    out = []
    for sample, prepared in (
        dataset.by_id(i)
        for i in ("ctorg_0000/liver", "ctorg_0000/kidney", "abdomenct1k_0001/liver")
    ):
        anchor = true_anchor(prepared)
        off = EvidenceAnchor(max(1, anchor.key_slice - 3), anchor.boxes)
        out += [
            ScoreRequest(sample.id, format_answer(anchor, "a")),
            ScoreRequest(sample.id, format_answer(off, "b")),
            ScoreRequest(sample.id, "not an answer"),
        ]
    return out


@pytest.fixture(scope="module")
def expected(dataset, requests):
    scorer = RewardScorer(RewardConfig(propagator="baseline"))
    return [scorer.score_group(dataset.by_id(r.sample_id)[1], [r.completion])[0] for r in requests]


@pytest.fixture(scope="module")
def pool(ray_instance, phantom_manifest, data_cfg):
    pool = RewardPool(
        str(phantom_manifest),
        data_cfg,
        RewardConfig(propagator="baseline", num_workers=2),
        cpus_per_worker=0.5,
    )
    yield pool
    pool.shutdown()


def test_two_replicas_serve_concurrently_and_agree_with_the_core(pool, requests, expected):
    assert len(pool.workers()) == 2
    results = pool.score(requests * 4)
    assert results == expected * 4
    scored = [pool.handle.info.remote().result() for _ in range(8)]
    assert len({info["pid"] for info in scored}) == 2  # both replicas answered
    assert all("no MedSAM2" in info["propagator"] for info in scored)


def test_start_returns_at_once_and_each_result_keeps_its_request_order(pool, requests, expected):
    began = time.monotonic()
    first = pool.start(requests[::-1] + requests)
    second = pool.start(requests)
    assert time.monotonic() - began < 5  # submitted, not scored: scoring takes longer
    assert second.result() == expected  # collected in any order
    assert first.result() == expected[::-1] + expected
    assert first.result() is first.result()  # collected once
    assert first.timed_out == second.timed_out == pool.timed_out == 0


def test_killing_a_worker_mid_batch_loses_and_duplicates_nothing(pool, requests, expected):
    out = {}
    batch = requests * 6
    runner = threading.Thread(target=lambda: out.setdefault("r", pool.score(batch)))
    runner.start()
    time.sleep(0.3)
    victim = pool.workers()[0]
    ray.kill(ray.get_actor(victim, namespace="serve"))
    runner.join(timeout=300)
    assert out["r"] == expected * 6  # every request answered once, in order, with right values
    deadline = time.time() + 60
    while time.time() < deadline and (len(pool.workers()) != 2 or victim in pool.workers()):
        time.sleep(1)
    assert len(pool.workers()) == 2 and victim not in pool.workers()  # replaced


def test_scaling_mid_stream_keeps_running_replicas_and_loses_nothing(pool, requests, expected):
    pool.scale(1)
    assert len(pool.workers()) == 1
    survivor = pool.workers()[0]
    out = {}
    batch = requests * 6
    runner = threading.Thread(target=lambda: out.setdefault("r", pool.score(batch)))
    runner.start()
    time.sleep(0.2)
    pool.scale(2)
    runner.join(timeout=300)
    assert out["r"] == expected * 6
    assert len(pool.workers()) == 2 and survivor in pool.workers()
    assert pool.num_workers == 2


def test_a_request_not_answered_in_time_scores_zero_is_counted_and_the_run_goes_on(
    ray_instance, phantom_manifest, data_cfg, dataset, true_anchor
):
    # A real slow worker: SAM2 at 256 px with a +-10 window encodes and tracks for many
    # seconds on this machine, against a 2 s timeout.
    cfg = RewardConfig(
        propagator="medsam2",
        random_weights=True,
        image_size=256,
        delta=10,
        request_timeout_s=2.0,
    )
    slow_pool = RewardPool(str(phantom_manifest), data_cfg, cfg, name="reward_timeout")
    try:
        sample, liver = dataset.by_id("ctorg_0000/liver")
        anchor = true_anchor(liver)
        k = anchor.key_slice
        keys = (k, max(1, k - 6), min(liver.num_slices, k + 6))
        assert len(set(keys)) == 3
        slow = [
            ScoreRequest(sample.id, format_answer(EvidenceAnchor(key, anchor.boxes), "x"))
            for key in keys
        ]
        began = time.monotonic()
        pending = slow_pool.start(slow)
        assert pending.result() == [TIMED_OUT] * 3
        assert time.monotonic() - began < 2.0 + 5  # did not wait for the scoring
        assert TIMED_OUT.failure == TIMEOUT_FAILURE == "reward timeout"
        assert TIMED_OUT.total == 0.0
        assert pending.timed_out == slow_pool.timed_out == 3

        slow_pool.handle.info.remote().result()  # queued behind the slow group: now it is done
        kidney_sample, kidney = dataset.by_id("ctorg_0000/kidney")
        empty_slice = int((kidney.areas == 0).nonzero()[0][0]) + 1
        away = format_answer(EvidenceAnchor(empty_slice, ((10, 10, 40, 40),)), "guess")
        malformed, off_target = slow_pool.score(
            [ScoreRequest(kidney_sample.id, "not an answer"), ScoreRequest(kidney_sample.id, away)]
        )
        assert malformed.total == 0.0 and malformed.failure not in (None, TIMEOUT_FAILURE)
        assert (off_target.format, off_target.total, off_target.failure) == (1.0, 1.0, None)
        assert slow_pool.timed_out == 3
    finally:
        slow_pool.shutdown()
