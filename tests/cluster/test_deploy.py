"""The deployment files hold the plan of configs/paper.yaml, give every pod its storage, and run
Ray in the environment scripts/setup.sh builds (deploy/Dockerfile kept in step with it)."""

import re
import shlex
from pathlib import Path

import pytest
import yaml

from cluster.placement import plan
from common.config import load_run_config
from tests.common.test_setup import fake_bin, run_setup, runnable_python
from tests.common.test_setup import plan as setup_plan

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


def test_ray_cluster_starts_ray_in_the_environment_setup_built():
    spec = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    assert any(
        "bash scripts/setup.sh" in c and "--print-env" not in c for c in spec["setup_commands"]
    )
    for command in spec["head_start_ray_commands"] + spec["worker_start_ray_commands"]:
        if "ray start" in command:
            assert command.startswith(
                'source "$(bash ~/medvol-r1/scripts/setup.sh --print-env)/bin/activate" && '
            )
        assert ".cache/medvol-r1/env" not in command


def dockerfile() -> tuple[str, dict[str, str]]:
    """deploy/Dockerfile's text (continuation lines joined) and the variables its ENV lines set."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    env = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(word.split("=", 1) for word in shlex.split(line[4:]))
    return text, env


def test_the_dockerfile_builds_the_environment_setup_sh_would_pick_there(tmp_path):
    text, env = dockerfile()
    cuda_major = re.search(r"^FROM nvidia/cuda:(\d+)\.\d+\.\d+-\w+-ubuntu[\d.]+$", text, re.M)[1]
    apt_python = re.search(r"\bpython(3\.\d+)-venv\b", text)[1]
    setup_vars = {k: v for k, v in env.items() if k.startswith("MEDVOL_")}
    assert setup_vars["MEDVOL_PYTHON"] == f"python{apt_python}"
    # setup.sh runs after the variables are set, and Ray finds the environment first on PATH.
    assert text.index("ENV MEDVOL_TARGET") < text.index("RUN bash scripts/setup.sh")
    assert env["VIRTUAL_ENV"] == setup_vars["MEDVOL_ENV"]
    assert env["PATH"].split(":")[0] == setup_vars["MEDVOL_ENV"] + "/bin"

    # setup.sh under the image's variables, as during `docker build` (no driver seen), with the
    # image's python3.X standing for the real one of that version here.
    interpreter = runnable_python(apt_python)
    if interpreter is None:
        pytest.skip(f"no Python {apt_python} here to stand for the image's")
    (fake_bin(tmp_path) / f"python{apt_python}").symlink_to(interpreter)
    got = setup_plan(tmp_path, **setup_vars)
    assert got["cuda"].split(" ")[0] == cuda_major
    assert got["lock"] == str(DEPLOY.parent / "requirements" / "lock-gpu.txt")
    assert f"(Python {apt_python}." in got["python"]
    printed = run_setup(tmp_path, "--print-env", **setup_vars)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.strip() == got["env"].split(" ")[0] == env["VIRTUAL_ENV"]


def test_rayjob_runs_the_image_the_dockerfile_builds_where_the_code_is():
    text, env = dockerfile()
    tag = re.search(r"^#   docker build -f deploy/Dockerfile -t (\S+) \.$", text, re.M)[1]
    assert re.search(r"^#   docker push (\S+)$", text, re.M)[1] == tag
    _, job = yaml.safe_load_all((DEPLOY / "rayjob.yaml").read_text())
    cluster = job["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]] + [
        group["template"] for group in cluster["workerGroupSpecs"]
    ]
    assert {c["image"] for pod in pods for c in pod["spec"]["containers"]} == {tag}
    workdir = re.search(r"^WORKDIR (\S+)$", text, re.M)[1]
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["working_dir"] == workdir
