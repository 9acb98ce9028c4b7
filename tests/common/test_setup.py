"""scripts/setup.sh picks the target, CUDA lock, interpreter and folder it says it picks.

Each test runs the real script with --dry-run or --print-env (nothing is built). The NVIDIA driver
is the machine's hardware: a two-line `nvidia-smi` on PATH stands in for it, answering `-L` and
the driver-version query the way the real one does.
"""

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SETUP = REPO / "scripts" / "setup.sh"
HERE_MINOR = f"{sys.version_info.major}.{sys.version_info.minor}"


def runnable_python(minor: str) -> str | None:
    """A `python<minor>` that runs on this machine, or None (pyenv shims may exist but not run)."""
    found = [shutil.which(f"python{minor}") or ""]
    found += sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{minor}.*/bin/python{minor}")))
    for candidate in found:
        if candidate and subprocess.run([candidate, "-c", ""], capture_output=True).returncode == 0:
            return candidate
    return None


def fake_bin(tmp_path: Path, driver: str | None = None, gpus: int = 2) -> Path:
    """A folder to put first on PATH; with `driver`, it holds an nvidia-smi reporting it."""
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    if driver is not None:
        listing = "\\n".join(f"GPU {i}: NVIDIA RTX A6000 (UUID: GPU-{i})" for i in range(gpus))
        smi = folder / "nvidia-smi"
        smi.write_text(
            "#!/bin/sh\n"
            f'case "$*" in -L) printf "{listing}\\n" ;;\n'
            f'  *driver_version*) printf "{driver}\\n{driver}\\n" ;; esac\n'
        )
        smi.chmod(0o755)
    return folder


def run_setup(tmp_path: Path, *args: str, driver: str | None = None, **env: str):
    """Runs setup.sh (or `_SETUP`) with HOME in tmp_path, no real nvidia-smi, only `env` set."""
    script = env.pop("_SETUP", str(SETUP))
    folder = fake_bin(tmp_path, driver)
    path = [str(folder)] + [
        d
        for d in os.environ["PATH"].split(os.pathsep)
        if not os.access(os.path.join(d, "nvidia-smi"), os.X_OK)
    ]
    base = {k: v for k, v in os.environ.items() if not k.startswith("MEDVOL_")}
    base.update(PATH=os.pathsep.join(path), HOME=str(tmp_path / "home"))
    base.update(env)
    return subprocess.run(
        ["bash", script, *args],
        env=base,
        capture_output=True,
        text=True,
        timeout=60,
    )


def plan(tmp_path: Path, **kw) -> dict[str, str]:
    """The --dry-run lines as {field: value}; the run must succeed."""
    done = run_setup(tmp_path, "--dry-run", **kw)
    assert done.returncode == 0, done.stderr
    return dict(line.split(": ", 1) for line in done.stdout.splitlines())


def refusal(tmp_path: Path, **kw) -> str:
    done = run_setup(tmp_path, "--dry-run", **kw)
    assert done.returncode == 2 and done.stdout == "", (done.stdout, done.stderr)
    return done.stderr


def test_without_a_gpu_it_picks_the_cpu_lock_and_touches_nothing(tmp_path):
    got = plan(tmp_path, MEDVOL_PYTHON=sys.executable)
    assert got["target"] == "cpu (no nvidia-smi on PATH)"
    assert got["cuda"] == "- (cpu target)"
    assert got["lock"] == str(REPO / "requirements" / "lock.txt")
    suffix = "-py312" if HERE_MINOR == "3.12" else ""
    assert got["env"].split(" ")[0] == f"{tmp_path}/home/.cache/medvol-r1/env{suffix}"
    assert got["action"] == f"build (no stamp in {tmp_path}/home/.cache/medvol-r1/env{suffix})"
    assert not (tmp_path / "home").exists()


@pytest.mark.parametrize("driver", ["580.65.06", "595.12"])
def test_a_580_or_newer_driver_gets_the_cuda_13_lock(tmp_path, driver):
    got = plan(tmp_path, driver=driver, MEDVOL_PYTHON=sys.executable)
    assert got["target"] == f"gpu (nvidia-smi lists 2 GPU(s), driver {driver})"
    assert got["cuda"] == f"13 (driver {driver} >= 580)"
    assert got["lock"] == str(REPO / "requirements" / "lock-gpu.txt")
    assert "/home/.cache/medvol-r1/env-gpu" in got["env"]


@pytest.mark.parametrize("driver", ["525.60.13", "550.54.15", "579.1"])
def test_a_525_to_579_driver_is_told_there_is_no_cuda_12_lock_and_what_to_do(tmp_path, driver):
    said = refusal(tmp_path, driver=driver, MEDVOL_PYTHON=sys.executable)
    assert f"CUDA 12 (driver {driver} is in 525..579)" in said
    assert "There is no CUDA 12 lock" in said and "download.pytorch.org/whl/cu128" in said
    assert "Upgrade the NVIDIA driver to >= 580" in said


def test_a_driver_older_than_525_is_refused_with_the_minimum(tmp_path):
    said = refusal(tmp_path, driver="470.82.01", MEDVOL_PYTHON=sys.executable)
    assert "NVIDIA driver 470.82.01 is older than 525, the oldest that runs CUDA 12" in said
    assert "needs >= 580" in said


def test_medvol_cuda_overrides_the_driver_and_is_still_checked_against_it(tmp_path):
    said = refusal(tmp_path, driver="550.54.15", MEDVOL_CUDA="13", MEDVOL_PYTHON=sys.executable)
    assert "NVIDIA driver 550.54.15 with CUDA 13 (MEDVOL_CUDA=13)" in said and ">= 580" in said
    said = refusal(tmp_path, driver="580.65.06", MEDVOL_CUDA="12", MEDVOL_PYTHON=sys.executable)
    assert "CUDA 12 (MEDVOL_CUDA=12)" in said and "There is no CUDA 12 lock" in said
    said = refusal(tmp_path, driver="580.65.06", MEDVOL_CUDA="11", MEDVOL_PYTHON=sys.executable)
    assert said.strip() == "error: MEDVOL_CUDA: 11: use 12 or 13"


def test_gpu_target_without_a_driver_takes_cuda_13_as_in_a_container_build(tmp_path):
    got = plan(tmp_path, MEDVOL_TARGET="gpu", MEDVOL_PYTHON=sys.executable)
    assert got["target"] == "gpu (MEDVOL_TARGET=gpu; no nvidia-smi on PATH)"
    assert got["cuda"].startswith("13 (no NVIDIA driver seen")
    assert got["lock"] == str(REPO / "requirements" / "lock-gpu.txt")


def test_cpu_target_on_a_gpu_machine_and_a_bad_target(tmp_path):
    got = plan(tmp_path, driver="470.82.01", MEDVOL_TARGET="cpu", MEDVOL_PYTHON=sys.executable)
    assert got["target"] == "cpu (MEDVOL_TARGET=cpu; nvidia-smi lists 2 GPU(s), driver 470.82.01)"
    assert (
        refusal(tmp_path, MEDVOL_TARGET="tpu").strip()
        == "error: MEDVOL_TARGET: tpu: use cpu or gpu"
    )


def test_print_env_is_the_folder_the_dry_run_names(tmp_path):
    for env in (
        {},
        {"MEDVOL_TARGET": "gpu"},
        {"MEDVOL_ENV": str(tmp_path / "elsewhere")},
    ):
        env = {"MEDVOL_PYTHON": sys.executable, **env}
        printed = run_setup(tmp_path, "--print-env", **env)
        assert printed.returncode == 0, printed.stderr
        assert printed.stdout.strip() == plan(tmp_path, **env)["env"].split(" ")[0]
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "home").exists()


def test_an_unknown_argument_is_refused(tmp_path):
    done = run_setup(tmp_path, "--dryrun")
    assert done.returncode == 2 and "unknown argument '--dryrun'" in done.stderr


def test_medvol_python_must_run_and_be_3_11_or_3_12(tmp_path):
    assert "MEDVOL_PYTHON=/nowhere/python3.11 does not run here" in refusal(
        tmp_path, MEDVOL_PYTHON="/nowhere/python3.11"
    )
    got = plan(tmp_path, MEDVOL_PYTHON=sys.executable)
    assert got["python"].startswith(f"{sys.executable} (Python {HERE_MINOR}.")
    other = runnable_python("3.10") or runnable_python("3.13")
    if other is None:
        pytest.skip("no Python 3.10 or 3.13 here to be refused")
    said = refusal(tmp_path, MEDVOL_PYTHON=other)
    assert f"{other} is Python 3.1" in said and "supports Python 3.11 and 3.12" in said


def test_without_medvol_python_it_falls_back_to_python3_12_and_its_own_folder(tmp_path):
    py312 = runnable_python("3.12")
    if py312 is None:
        pytest.skip("no Python 3.12 here")
    folder = fake_bin(tmp_path)
    broken = folder / "python3.11"  # e.g. a pyenv shim with no 3.11 selected
    broken.write_text("#!/bin/sh\necho 'python3.11: command not found' >&2; exit 127\n")
    broken.chmod(0o755)
    (folder / "python3.12").symlink_to(py312)
    got = plan(tmp_path)
    assert "(Python 3.12." in got["python"]
    assert got["python"].endswith("python3.11 does not run; python3.12 is the first that runs)")
    assert got["env"] == f"{tmp_path}/home/.cache/medvol-r1/env-py312 (default for cpu)"


def test_an_environment_of_another_python_is_refused(tmp_path):
    env = tmp_path / "env"
    env.mkdir()
    (env / "pyvenv.cfg").write_text("home = /usr/bin\nversion = 3.10.13\n")
    said = refusal(tmp_path, MEDVOL_ENV=str(env), MEDVOL_PYTHON=sys.executable)
    assert f"{env} holds Python 3.10.13, not {HERE_MINOR}" in said


def copy_of_setup(tmp_path: Path) -> Path:
    """scripts/setup.sh and requirements/ in a scratch tree, to change one without the other."""
    root = tmp_path / "repo"
    shutil.copytree(REPO / "requirements", root / "requirements")
    (root / "scripts").mkdir()
    shutil.copy(SETUP, root / "scripts" / "setup.sh")
    return root


def test_the_stamp_follows_the_requirements_not_the_script(tmp_path):
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    kw = {"MEDVOL_ENV": str(env), "MEDVOL_PYTHON": sys.executable}
    stamp = plan(tmp_path, **kw)["stamp"]
    (env / ".medvol-stamp").write_text(stamp + "\n")
    assert plan(tmp_path, **kw)["action"] == f"reuse (stamp {stamp} matches)"

    root = copy_of_setup(tmp_path)
    copied = root / "scripts" / "setup.sh"
    copied.write_text(copied.read_text() + "# a comment changes nothing the env holds\n")
    assert plan(tmp_path, _SETUP=str(copied), **kw)["action"] == f"reuse (stamp {stamp} matches)"
    lock = root / "requirements" / "lock.txt"
    lock.write_text(lock.read_text() + "six==1.17.0\n")
    moved = plan(tmp_path, _SETUP=str(copied), **kw)
    assert moved["action"] == f"build (stamp {stamp} differs from {moved['stamp']})"


def test_an_environment_stamped_by_the_previous_script_is_recognised_while_the_locks_hold(
    tmp_path,
):
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    (env / ".medvol-stamp").write_text("243e077238edf00c\n")  # what it wrote for these locks
    kw = {"MEDVOL_ENV": str(env), "MEDVOL_PYTHON": sys.executable}
    assert plan(tmp_path, **kw)["action"] == (
        "restamp (stamped 243e077238edf00c by the previous setup.sh from the same requirement "
        "files)"
    )
    root = copy_of_setup(tmp_path)
    (root / "requirements" / "project.txt").write_text("transformers==5.19.0\n")
    got = plan(tmp_path, _SETUP=str(root / "scripts" / "setup.sh"), **kw)
    assert got["action"] == f"build (stamp 243e077238edf00c differs from {got['stamp']})"
