"""Local services of the embedded default run: a Ray head and an MLflow server on 127.0.0.1.

Both are started from this environment's executables and stopped by their own address or
process, never with a bare ``ray stop`` (which would stop every Ray on the machine).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


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
                "--min-worker-port",
                "20000",
                "--max-worker-port",
                "29999",
            ],
            check=True,
            env=head.env(),
        )
        return head

    def submit_grpo(self, working_dir: Path, grpo_args: list[str], **run_kwargs):
        """``ray job submit`` of ``python -m cluster.grpo <grpo_args>`` to this head, uploading
        ``working_dir`` without run outputs; returns the finished CompletedProcess."""
        command = [
            _bin("ray"),
            "job",
            "submit",
            "--address",
            self.dashboard,
            "--working-dir",
            str(working_dir),
            "--runtime-env-json",
            '{"excludes": ["runs/", ".git/", "mlruns/", "*.db"]}',
            "--",
            "python",
            "-m",
            "cluster.grpo",
            *grpo_args,
        ]
        return subprocess.run(command, env=self.env(), **run_kwargs)

    @staticmethod
    def env() -> dict[str, str]:
        """Environment for this head and its clients (``ray job submit``): token auth is off,
        as the head listens on 127.0.0.1 only."""
        return {**os.environ, "RAY_AUTH_MODE": "disabled"}

    def stop(self) -> None:
        """Stop this head's processes only: those whose command line names its temp dir (GCS,
        raylet, dashboard) and their children (agents, workers)."""

        def pids() -> set[str]:
            found = subprocess.run(
                ["pgrep", "-f", str(self.temp_dir)], capture_output=True, text=True
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
        env = os.environ.copy()
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
