"""Local services of the embedded default run: a Ray head and an MLflow server on 127.0.0.1.

Both are started from this environment's executables and stopped by their own address or
process, never with a bare ``ray stop`` (which would stop every Ray on the machine).
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from common.runtime import append_output, interpreter_environment


def ray_temp_dir(out: Path) -> Path:
    """The Ray temp dir of the run writing into ``out``: under /tmp (Ray's socket paths must stay
    under 107 bytes) and its own per output folder, since stopping a head stops every process
    that names its temp dir; two runs into folders of the same name must not share one."""
    digest = hashlib.sha1(str(Path(out).resolve()).encode()).hexdigest()[:8]
    return Path("/tmp") / f"medvol-ray-{Path(out).name[:24]}-{digest}"


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free on ``host`` now (the OS's pick)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def agent_port_args() -> list[str]:
    """``ray start`` flags giving a node's agents free ports. Their defaults are fixed: a second
    Ray on the machine (a test's local instance, another head or node) would hold them, and this
    node's job agent would never come up ("No available agent to submit job")."""
    flags = (
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
    )
    return [arg for flag in flags for arg in (flag, str(free_port()))]


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def job_entrypoint(module: str, args: list[str]) -> list[str]:
    """The command a Ray job runs: ``module`` under this very interpreter, never whatever
    ``python`` the head's PATH finds first (a run started as ``<env>/bin/python`` without
    activating the environment would otherwise run its job under the system's Python)."""
    return [sys.executable, "-m", module, *args]


@dataclass
class RayHead:
    port: int
    dashboard_port: int
    temp_dir: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @classmethod
    def start(cls, num_cpus: int, temp_dir: Path) -> RayHead:
        head = cls(free_port(), free_port(), temp_dir)
        temp_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                _bin("ray"),
                "start",
                "--head",
                "--node-ip-address",
                "127.0.0.1",
                "--port",
                str(head.port),
                "--dashboard-host",
                "127.0.0.1",
                "--dashboard-port",
                str(head.dashboard_port),
                "--num-cpus",
                str(num_cpus),
                "--temp-dir",
                str(temp_dir),
                "--disable-usage-stats",
                "--ray-client-server-port",
                str(free_port()),
                *agent_port_args(),
                "--min-worker-port",
                "20000",
                "--max-worker-port",
                "29999",
            ],
            check=True,
            env=head.env(),
        )
        return head

    def submit_grpo(
        self,
        working_dir: Path,
        grpo_args: list[str],
        agent_wait_s: float = 120.0,
        log: Path | None = None,
        **run_kwargs,
    ):
        """``ray job submit`` of ``<this python> -m cluster.grpo <grpo_args>`` to this head,
        uploading ``working_dir`` without run outputs, then its logs followed to the end;
        returns a CompletedProcess whose return code is 0 only if the job succeeded. When it
        fails, the job's whole output (its traceback) is appended to ``log``, if given.

        A head that has just started can refuse jobs until its job agent registers ("No
        available agent to submit job"); the submission is retried for ``agent_wait_s``.
        """
        check = run_kwargs.pop("check", False)
        capture = run_kwargs.get("capture_output", False)
        job_id = f"medvol-grpo-{uuid.uuid4().hex[:12]}"
        submit = [
            _bin("ray"),
            "job",
            "submit",
            "--address",
            self.dashboard,
            "--submission-id",
            job_id,
            "--no-wait",
            "--working-dir",
            str(working_dir),
            "--runtime-env-json",
            '{"excludes": ["runs/", ".git/", "mlruns/", "*.db"]}',
            "--",
            *job_entrypoint("cluster.grpo", grpo_args),
        ]
        deadline = time.time() + agent_wait_s
        while True:
            sent = subprocess.run(
                submit, env=self.env(), capture_output=True, text=True, cwd=run_kwargs.get("cwd")
            )
            if sent.returncode == 0 or "No available agent" not in sent.stdout + sent.stderr:
                break
            if time.time() > deadline:
                break
            time.sleep(2.0)
        if sent.returncode != 0:
            if log is not None:
                append_output(log, f"ray job submit of {job_id} failed", sent.stdout + sent.stderr)
            if not capture:
                sys.stderr.write(sent.stdout + sent.stderr)
            if check:
                raise subprocess.CalledProcessError(
                    sent.returncode, submit, sent.stdout, sent.stderr
                )
            return sent
        logs = subprocess.run(
            [_bin("ray"), "job", "logs", "--address", self.dashboard, "--follow", job_id],
            env=self.env(),
            **run_kwargs,
        )
        status = self.job_status(job_id)
        line = f"Job '{job_id}' {status.lower()}\n"
        code = 0 if status == "SUCCEEDED" else 1
        if code and log is not None:
            self.save_job_output(job_id, status, log)
        if capture:
            logs.stdout = (logs.stdout or "") + line
        else:
            print(line, end="", flush=True)
        if check and code:
            raise subprocess.CalledProcessError(code, submit, logs.stdout, logs.stderr)
        return subprocess.CompletedProcess(submit, code, logs.stdout, logs.stderr)

    def save_job_output(self, job_id: str, status: str, log: Path) -> None:
        """Append what job ``job_id`` printed (its driver's traceback included) to ``log``:
        the console showed it while it ran, but only Ray's session folder keeps it."""
        out = subprocess.run(
            [_bin("ray"), "job", "logs", "--address", self.dashboard, job_id],
            env=self.env(),
            capture_output=True,
            text=True,
        )
        append_output(
            log, f"output of Ray job {job_id} ({status.lower()})", out.stdout + out.stderr
        )

    def job_status(self, job_id: str, timeout_s: float = 60.0) -> str:
        """SUCCEEDED, FAILED, STOPPED, ... of a job on this head, waiting for it to end."""
        deadline = time.time() + timeout_s
        while True:
            out = subprocess.run(
                [_bin("ray"), "job", "status", "--address", self.dashboard, job_id],
                env=self.env(),
                capture_output=True,
                text=True,
            )
            # The CLI reports an ended job as "Job '<id>' succeeded" (failed, was stopped).
            found = re.search(r"Job '[^']+' (succeeded|failed|was stopped)", out.stdout)
            if found:
                return {"succeeded": "SUCCEEDED", "failed": "FAILED"}.get(found[1], "STOPPED")
            if time.time() > deadline:
                return "UNKNOWN"
            time.sleep(1.0)

    @staticmethod
    def env() -> dict[str, str]:
        """Environment for this head and its clients (``ray job submit``): token auth is off,
        as the head listens on 127.0.0.1 only; this interpreter's folder leads PATH, so the
        head, its workers and its jobs' shells find this environment's tools."""
        return {**interpreter_environment(), "RAY_AUTH_MODE": "disabled"}

    def stop(self) -> None:
        """Stop this head's processes only: those whose command line names its temp dir (GCS,
        raylet, dashboard) and their children (agents, workers)."""

        # The temp dir as a whole path component: another head's /tmp/medvol-ray-run2 (or
        # run-2) is not this head's /tmp/medvol-ray-run
        pattern = re.escape(str(self.temp_dir)) + "([/ ]|$)"

        def pids() -> set[str]:
            found = subprocess.run(
                ["pgrep", "-f", pattern], capture_output=True, text=True
            ).stdout.split()
            children = [
                subprocess.run(["pgrep", "-P", p], capture_output=True, text=True).stdout.split()
                for p in found
            ]
            return {p for p in found + sum(children, []) if p != str(os.getpid())}

        targets = pids()
        for signal_name in ("-TERM", "-KILL"):
            if targets:
                subprocess.run(
                    ["kill", signal_name, *targets], check=False, stderr=subprocess.DEVNULL
                )
            deadline = time.time() + 10
            while time.time() < deadline and (targets := pids()):
                time.sleep(0.5)


@dataclass
class MlflowServer:
    port: int
    process: subprocess.Popen

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(
        cls, store: Path, artifacts: Path, log: Path, port: int | None = None
    ) -> MlflowServer:
        port = port or free_port()
        env = interpreter_environment()
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        artifacts.mkdir(parents=True, exist_ok=True)
        process = subprocess.Popen(
            [
                _bin("mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--backend-store-uri",
                f"sqlite:///{store.resolve()}",
                "--artifacts-destination",
                str(artifacts.resolve()),
                "--workers",
                "1",
            ],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            env=env,
        )
        server = cls(port, process)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{server.uri}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return server
            except OSError:
                time.sleep(1)
            if process.poll() is not None:
                raise RuntimeError(f"mlflow server exited; see {log}")
        process.kill()
        raise RuntimeError(f"mlflow server did not answer on {server.uri}; see {log}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
