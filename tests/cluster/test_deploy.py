"""The deployment files hold the plan of configs/paper.yaml and give every pod its storage."""

from pathlib import Path

import yaml

from cluster.placement import plan
from common.config import load_run_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_rayjob_has_the_plans_gpus_and_every_pod_mounts_runs_and_shm():
    claim, job = yaml.safe_load_all((DEPLOY / "rayjob.yaml").read_text())
    assert claim["kind"] == "PersistentVolumeClaim" and claim["spec"]["accessModes"] == [
        "ReadWriteMany"
    ]
    cluster = job["spec"]["rayClusterSpec"]
    need = plan(load_run_config(DEPLOY.parent / "configs" / "paper.yaml")).total()["GPU"]
    workers = cluster["workerGroupSpecs"][0]
    gpus_per_pod = int(
        workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    )
    assert workers["minReplicas"] * gpus_per_pod >= need
    assert workers["maxReplicas"] > workers["minReplicas"] and cluster["enableInTreeAutoscaling"]
    for pod in (cluster["headGroupSpec"]["template"], workers["template"]):
        mounts = {m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
        assert {"/mnt", "/dev/shm"} <= mounts
        claims = [v for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v]
        assert claims[0]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_ray_cluster_counts_the_heads_gpus_and_ships_the_code():
    spec = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    assert not any("--num-gpus=0" in c for c in spec["head_start_ray_commands"])
    assert "~/medvol-r1" in spec["file_mounts"]
