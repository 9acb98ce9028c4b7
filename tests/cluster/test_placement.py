"""Fractional GPUs in the placement: reward workers sharing a GPU, as Ray packs them."""

import subprocess
import sys
from pathlib import Path

import pytest

from cluster.placement import Node, assign, describe_assignment, parse_cluster, plan
from common.config import load_run_config

REPO = Path(__file__).resolve().parents[2]


def reward_plan(workers: int, gpus: float, *more: str):
    """The tiny run (one CPU-only learner and rollout actor) with ``workers`` reward workers."""
    return plan(
        load_run_config(
            "configs/tiny.yaml",
            [f"reward.num_workers={workers}", f"reward.gpus_per_worker={gpus}", *more],
        )
    )


def rewards(assignments):
    return [(a.node, a.gpus, a.gpu_share) for a in assignments if a.role.startswith("reward")]


def test_four_quarter_gpu_workers_share_one_free_gpu():
    assert rewards(assign(reward_plan(4, 0.25), [Node(1, 8)])) == [(0, (0,), 0.25)] * 4


def test_a_fifth_quarter_worker_goes_to_the_next_gpu():
    placed = rewards(assign(reward_plan(5, 0.25), [Node(2, 8)]))
    assert placed == [(0, (0,), 0.25)] * 4 + [(0, (1,), 0.25)]
    # one GPU on each of two nodes: the fifth spills to node 1
    placed = rewards(assign(reward_plan(5, 0.25), parse_cluster("1,1")))
    assert placed[-1] == (1, (0,), 0.25) and {p[0] for p in placed[:4]} == {0}
    with pytest.raises(ValueError, match=r"reward worker 4 needs .*'GPU': 0.25.*node 0: 0 GPUs,"):
        assign(reward_plan(5, 0.25), [Node(1, 8)])


def test_shares_that_do_not_add_up_to_a_gpu_leave_the_rest_unused():
    # 0.4 + 0.4 = 0.8: a third 0.4 does not fit on what is left (0.2) and takes GPU 1
    placed = rewards(assign(reward_plan(3, 0.4), [Node(2, 8)]))
    assert [p[1] for p in placed] == [(0,), (0,), (1,)]
    with pytest.raises(ValueError, match=r"node 0: 0 GPUs \+ 0.2 of GPU 0, "):
        assign(reward_plan(3, 0.4), [Node(1, 8)])


def test_a_whole_gpu_role_never_takes_a_shared_gpu():
    # learner and rollout actor on whole GPUs first (the placement group), then the shares
    cfg = ["cluster.learner_gpus=1", "rollout.gpus_per_actor=1"]
    placed = assign(reward_plan(2, 0.5, *cfg), [Node(3, 16)])
    assert [(a.role, a.gpus, a.gpu_share) for a in placed] == [
        ("learner", (0,), 1.0),
        ("rollout actor 0", (1,), 1.0),
        ("reward worker 0", (2,), 0.5),
        ("reward worker 1", (2,), 0.5),
    ]


def test_a_fraction_above_one_is_refused_with_ray_s_rule():
    with pytest.raises(
        ValueError,
        match=r"reward.gpus_per_worker 1.5: Ray gives a share of one GPU \(below 1\) or whole "
        r"GPUs \(1 or more\), so a request above 1 must be a whole number",
    ):
        reward_plan(1, 1.5)
    with pytest.raises(ValueError, match=r"rollout.gpus_per_actor 2.5: .* whole number"):
        plan(load_run_config("configs/tiny.yaml", ["rollout.gpus_per_actor=2.5"]))
    with pytest.raises(ValueError, match=r"reward.gpus_per_worker 5e-05: .* 0.0001"):
        reward_plan(1, 0.00005)
    assert rewards(assign(reward_plan(1, 2), [Node(2, 8)])) == [(0, (0, 1), 1.0)]


def test_the_description_shows_each_share():
    placed = assign(reward_plan(2, 0.25), [Node(1, 8)])
    text = describe_assignment(placed, [Node(1, 8)])
    assert "  reward worker 0    node 0  GPU 0 (0.25)  0.5 CPUs" in text
    assert "  reward worker 1    node 0  GPU 0 (0.25)  0.5 CPUs" in text
    assert "idle" not in text


def test_the_dry_run_packs_quarter_gpu_reward_workers_on_one_gpu():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.grpo",
            "--config",
            "configs/paper.yaml",
            "--dry-run",
            "--cluster",
            "4,4",
            "reward.num_workers=4",
            "reward.gpus_per_worker=0.25",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    # paper.yaml: learner GPU 0, rollout actors GPUs 1 and 2, then four workers on GPU 3
    for i in range(4):
        assert f"  reward worker {i}    node 0  GPU 3 (0.25)  4 CPUs" in out.stdout, out.stdout
    assert "  idle               node 1  GPU 0,1,2,3" in out.stdout
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.grpo",
            "--config",
            "configs/paper.yaml",
            "--dry-run",
            "reward.gpus_per_worker=1.5",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0
    assert "reward.gpus_per_worker 1.5: " in refused.stderr, refused.stderr
