"""A run's stages and its GRPO job run under the interpreter that started it, found without an
activated environment; a failed stage's error names a log file that holds its traceback."""

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.default_run import StageFailed, run_stage
from common.runtime import InterpreterError, require_interpreter
from common.services import RayHead

REPO = Path(__file__).resolve().parents[2]
BIN = str(Path(sys.executable).parent)
BARE_PATH = "/usr/bin:/bin"  # a shell where the environment was never activated


def test_a_failed_stage_names_its_log_and_the_log_holds_the_traceback(tmp_path, capfd):
    fails = (
        "import logging, sys\n"
        "logging.basicConfig()\n"
        "logging.getLogger('cluster').error('a record before the failure')\n"
        "print('step 1/2', end='\\r', file=sys.stderr)\n"
        "print('step 2/2', file=sys.stderr)\n"
        "raise RuntimeError('boom in the stage')\n"
    )
    with pytest.raises(StageFailed, match=f"boom: exited with status 1 .log: {tmp_path}/boom.log"):
        run_stage("boom", [sys.executable, "-c", fails], tmp_path)
    log = (tmp_path / "boom.log").read_text()
    assert "Traceback (most recent call last)" in log and "RuntimeError: boom in the stage" in log
    assert "step 2/2" in log and "step 1/2" not in log  # a progress bar's last state only
    assert "RuntimeError: boom in the stage" in capfd.readouterr().err  # the console too

    run_stage("fine", [sys.executable, "-c", "import sys; print('ok', file=sys.stderr)"], tmp_path)
    assert not (tmp_path / "fine.log").exists()  # a stage that succeeds keeps its own log only


def fake_ray(folder: Path, status: str) -> Path:
    """A ``ray`` command that records each call's arguments and PATH, accepts a job, prints a
    traceback as its logs and reports it ``status``."""
    script = folder / "ray"
    script.write_text(
        "#!/bin/bash\n"
        f'printf "%s\\n" "$@" > "{folder}/$2.args"\n'
        f'echo "$PATH" > "{folder}/$2.path"\n'
        'case "$2" in\n'
        "  submit) echo submitted ;;\n"
        "  logs) echo 'Traceback (most recent call last):'\n"
        "        echo 'RuntimeError: boom in the job' ;;\n"
        f"  status) echo \"Job '${{@: -1}}' {status}\" ;;\n"
        "esac\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_the_grpo_job_runs_under_this_interpreter_and_a_failure_lands_in_its_log(
    tmp_path, monkeypatch
):
    ray = fake_ray(tmp_path, "failed")
    monkeypatch.setattr("common.services._bin", lambda name: str(ray))
    monkeypatch.setenv("PATH", BARE_PATH)
    head = RayHead(1, 2, tmp_path / "ray")
    log = tmp_path / "logs" / "grpo.log"
    job = head.submit_grpo(
        tmp_path, ["--config", "x.yaml"], log=log, capture_output=True, text=True
    )
    assert job.returncode == 1
    submitted = (tmp_path / "submit.args").read_text().splitlines()
    entrypoint = submitted[submitted.index("--") + 1 :]
    assert entrypoint == [sys.executable, "-m", "cluster.grpo", "--config", "x.yaml"]
    # the head and its jobs' shells find this environment's commands first
    assert (tmp_path / "submit.path").read_text().split(":")[0] == BIN
    assert RayHead.env()["PATH"] == f"{BIN}:{BARE_PATH}"
    text = log.read_text()
    assert "failed" in text.splitlines()[0] and "RuntimeError: boom in the job" in text

    fake_ray(tmp_path, "succeeded")
    log.unlink()
    assert head.submit_grpo(tmp_path, [], log=log, capture_output=True, text=True).returncode == 0
    assert not log.exists()


def test_a_run_under_an_interpreter_without_the_environment_stops_first(tmp_path):
    require_interpreter()  # this environment has everything
    with pytest.raises(InterpreterError, match=f"^{sys.executable}: no {BIN}/no-such-tool;"):
        require_interpreter(("json",), ("no-such-tool",))
    # -S: this very interpreter without its site-packages, as a Python without the environment
    out = subprocess.run(
        [sys.executable, "-S", "-m", "cluster.default_run", "--out-dir", str(tmp_path / "run")],
        cwd=REPO,
        env={"PATH": BARE_PATH, "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {sys.executable}: cannot import "), err
    assert "ray, vllm" in err[0]
    assert not (tmp_path / "run").exists()  # no stage ran
