"""A run's stages and its GRPO job run under the interpreter that started it, found without an
activated environment; a failed stage's error names a log file that holds its traceback."""

import os
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


@pytest.mark.slow
def test_the_grpo_job_runs_under_this_interpreter_and_a_failure_lands_in_its_log(
    tmp_path, monkeypatch
):
    """A real head and two real jobs: one whose config does not exist (it fails, and its
    output lands in the log), one that prints its config (it succeeds, no log)."""
    from ray.job_submission import JobSubmissionClient

    monkeypatch.setenv("PATH", BARE_PATH)  # a shell where the environment was never activated
    assert RayHead.env()["PATH"] == f"{BIN}:{BARE_PATH}"  # the head finds this one's commands
    head = RayHead.start(num_cpus=1, temp_dir=Path("/tmp") / f"medvol-test-stages-{os.getpid()}")
    try:
        log = tmp_path / "logs" / "grpo.log"
        missing = tmp_path / "missing.yaml"
        job = head.submit_grpo(
            REPO, ["--config", str(missing)], log=log, cwd=REPO, capture_output=True, text=True
        )
        assert job.returncode == 1
        text = log.read_text()
        assert "failed" in text.splitlines()[0]
        assert f"error: --config: {missing}: no such file" in text  # the job's own error line
        (info,) = JobSubmissionClient(head.dashboard).list_jobs()
        assert info.entrypoint.split()[:5] == [
            sys.executable,
            "-m",
            "cluster.grpo",
            "--config",
            str(missing),
        ]
        log.unlink()
        args = ["--config", "configs/tiny.yaml", "--print-config"]
        job = head.submit_grpo(REPO, args, log=log, cwd=REPO, capture_output=True, text=True)
        assert job.returncode == 0 and "max_steps:" in job.stdout
        assert not log.exists()
    finally:
        head.stop()


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
