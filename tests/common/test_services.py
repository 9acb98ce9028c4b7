"""Local services: a run's Ray temp dir is its own, and stopping a head stops only its processes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from common.services import RayHead, ray_temp_dir


def test_runs_into_folders_of_one_name_get_their_own_temp_dir(tmp_path):
    a, b = ray_temp_dir(tmp_path / "a" / "run"), ray_temp_dir(tmp_path / "b" / "run")
    assert a != b and a.parent == b.parent == Path("/tmp")
    assert a.name.startswith("medvol-ray-run-") and len(a.name) == len("medvol-ray-run-") + 8
    assert ray_temp_dir(tmp_path / "a" / "run") == a  # the same folder, the same dir
    assert len(str(ray_temp_dir(tmp_path / ("x" * 200)))) < 60  # socket paths stay short


def test_stopping_a_head_leaves_a_neighbour_whose_temp_dir_it_prefixes(tmp_path):
    mine = tmp_path / "medvol-ray-run"
    # Stand-ins for a head's processes: their command lines name the temp dir, as Ray's do.
    sleeper = "import sys, time; time.sleep(120)"
    started = {
        name: subprocess.Popen([sys.executable, "-c", sleeper, str(tmp_path / name / "session")])
        for name in ("medvol-ray-run", "medvol-ray-run2", "medvol-ray-run-2")
    }
    time.sleep(0.5)
    try:
        RayHead(port=0, dashboard_port=0, temp_dir=mine).stop()
        assert started["medvol-ray-run"].wait(timeout=20) is not None
        assert started["medvol-ray-run2"].poll() is None
        assert started["medvol-ray-run-2"].poll() is None
    finally:
        for process in started.values():
            process.kill()
