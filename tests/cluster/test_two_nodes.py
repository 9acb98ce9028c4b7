"""A GRPO run on a two-node Ray cluster started on this machine, with no folder shared between
the nodes that the run writes: the learner ranks on one node, the rollout actor on the other.

Each node runs in its own mount namespace where the other node's scratch folder and the
driver's folder (output_dir, the SFT adapter, MLflow) are empty tmpfs mounts, so a path that one
side wrote is not there on the other: the run can only work if weights, the policy base, the
checkpoints and the final adapter travel as bytes. Both nodes see the code, the base checkpoint
and the data, as every node of a real cluster must.
"""

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.services import RayHead, agent_port_args, free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def cluster_env(**extra: str) -> dict[str, str]:
    """The environment of both nodes and of every driver: Ray's cluster mode (the project keeps
    it off for its one-node runs, but `ray start --address` refuses to add a node without it,
    and in it Ray takes the machine's network address for 127.0.0.1, so every node and driver
    here names that address)."""
    return {**RayHead.env(), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", **extra}


def machine_ip() -> str:
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


def ray_start(temp_dir: Path, resources: dict, hidden: list[Path], scratch: Path, head=None):
    """``ray start`` of one node inside its own mount namespace, ``hidden`` folders replaced by
    empty tmpfs mounts there; returns the head's port (or ``head``)."""
    ray = str(Path(sys.executable).parent / "ray")
    port = head or free_port()
    args = [
        ray,
        "start",
        "--node-ip-address",
        machine_ip(),
        "--num-cpus",
        "2",
        "--resources",
        json.dumps(resources),
        "--temp-dir",
        str(temp_dir),
        "--disable-usage-stats",
        *agent_port_args(),
    ]
    if head is None:
        args += ["--head", "--port", str(port), "--include-dashboard", "false"]
        args += ["--ray-client-server-port", str(free_port())]
        args += ["--min-worker-port", "20000", "--max-worker-port", "24999"]
    else:
        args += ["--address", f"{machine_ip()}:{head}"]
        args += ["--min-worker-port", "25000", "--max-worker-port", "29999"]
    mounts = " && ".join(f"mount -t tmpfs -o size=16m hidden {shlex.quote(str(p))}" for p in hidden)
    env = cluster_env(MEDVOL_SCRATCH=str(scratch))
    command = f"{mounts} && {shlex.join(args)}"
    done = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", command],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return port


def seen_from(address: str, resource: str, paths: list[Path]) -> dict:
    """What a task on the node with ``resource`` finds in ``paths``."""
    code = (
        "import json, os, ray\n"
        f"ray.init(address={address!r}, log_to_driver=False)\n"
        f"@ray.remote(num_cpus=0, resources={{{resource!r}: 0.01}})\n"
        "def look(paths):\n"
        "    return {p: sorted(os.listdir(p)) for p in paths}\n"
        f"print(json.dumps(ray.get(look.remote({[str(p) for p in paths]!r}))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=cluster_env(), check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    base = tmp_path_factory.mktemp("two-nodes")
    driver, learner_scratch, rollout_scratch = base / "driver", base / "learner", base / "rollout"
    for folder in (driver, learner_scratch, rollout_scratch):
        folder.mkdir()
        (folder / "marker").write_text(folder.name)
    short = Path("/tmp") / f"mv2n-{os.getpid()}"
    heads = (short / "h", short / "w")
    port = ray_start(heads[0], {"learner_node": 4}, [driver, rollout_scratch], learner_scratch)
    try:
        ray_start(heads[1], {"rollout_node": 4}, [driver, learner_scratch], rollout_scratch, port)
        yield {
            "address": f"{machine_ip()}:{port}",
            "driver": driver,
            "learner": learner_scratch,
            "rollout": rollout_scratch,
        }
    finally:
        for temp_dir in heads:
            RayHead(0, 0, temp_dir).stop()


def test_the_nodes_see_neither_the_driver_folder_nor_each_other_scratch(two_nodes):
    paths = [two_nodes[k] for k in ("driver", "learner", "rollout")]
    learner = seen_from(two_nodes["address"], "learner_node", paths)
    rollout = seen_from(two_nodes["address"], "rollout_node", paths)
    driver, lscratch, rscratch = (str(p) for p in paths)
    assert learner == {driver: [], lscratch: ["marker"], rscratch: []}
    assert rollout == {driver: [], lscratch: [], rscratch: ["marker"]}


def test_grpo_on_two_nodes_advances_and_resumes_with_weights_as_bytes(
    two_nodes, phantom_manifest, tmp_path
):
    from mlflow.tracking import MlflowClient

    from rollout.tiny_model import build_tiny_qwen3vl
    from tests.conftest import SFT_LIKE_TARGETS, random_adapter

    shared = tmp_path  # seen by both nodes, as a cluster's model and data are
    model = build_tiny_qwen3vl(shared / "tiny", "test")
    driver = two_nodes["driver"]
    sft = random_adapter(model, driver / "sft-adapter", SFT_LIKE_TARGETS, 4, 0.05, 2)
    out, uri = driver / "run", f"sqlite:///{driver / 'mlflow.db'}"
    args = [
        sys.executable,
        "-m",
        "cluster.grpo",
        "--config",
        "configs/tiny.yaml",
        f"cluster.address={two_nodes['address']}",
        f"data.manifest={phantom_manifest}",
        "data.num_slices=8",
        "data.slice_size=64",
        f"data.cache_dir={shared / 'cache'}",
        f"model.path={model}",
        f"sft_adapter={sft}",
        f"output_dir={out}",
        f"tracking.tracking_uri={uri}",
        "rollout.max_tokens=16",
        "grpo.num_learners=2",
        "grpo.batch_size=2",
        "grpo.zero_stage=2",
        "grpo.checkpoint_every=1",
        "cluster.learner_cpus=0.5",
        "cluster.rollout_cpus=0.5",
        "cluster.learner_resources={learner_node: 1}",
        "cluster.rollout_resources={rollout_node: 1}",
    ]
    started = time.perf_counter()
    first = subprocess.run(
        [*args, "grpo.max_steps=1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=cluster_env(),
    )
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = out / "grpo" / "checkpoints" / "step-1" / "learner" / "ckpt"
    shards = sorted(p.name for p in checkpoint.glob("zero_pp_rank_*"))
    assert shards == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    second = subprocess.run(
        [*args, "grpo.max_steps=2", "--resume"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=cluster_env(),
    )
    assert second.returncode == 0, second.stderr[-3000:]
    print(f"two-node run, 1 step + resume 1 step: {time.perf_counter() - started:.0f} s")
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("medvol-r1-tiny").experiment_id])
    assert len(runs) == 1  # resumed into the same run
    history = client.get_metric_history(runs[0].info.run_id, "reward/total")
    assert sorted(h.step for h in history) == [1, 2]
    assert (out / "grpo" / "checkpoints" / "latest").read_text() == "step-2"
    final = json.loads((out / "grpo" / "adapter" / "adapter_config.json").read_text())
    assert final["r"] == 4 + 16  # SFT and GRPO adapters stacked, written by the driver
    # The policy base was built on the rollout node, in its own scratch, from the SFT bytes;
    # the learner node never wrote one (it pushes adapters), and nothing of a weight push was
    # left in either scratch folder or the driver's.
    assert list(two_nodes["rollout"].glob("node-*/policy-base-*/config.json"))
    assert not list(two_nodes["learner"].glob("node-*/policy-base-*"))
    for root in (two_nodes["learner"], two_nodes["rollout"]):
        assert not list(root.glob("node-*/*/adapter-v*")), list(root.rglob("*"))
    assert not (out / "grpo" / "weights").exists() and not (out / "grpo" / "policy-base").exists()
