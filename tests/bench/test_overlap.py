"""The overlap benchmark end to end at its smallest: one run per side through the real GRPO
driver, and figures that agree with each other."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
NUMBER = r"([0-9]+\.[0-9]+)"


def test_one_run_per_side_prints_phases_and_both_ratios():
    run = subprocess.run(
        [sys.executable, "-m", "bench.overlap", "--steps", "1", "--repeats", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    out = run.stdout
    rows = {}
    for phase in ("generate", "reward", "learn", "weight_sync", "step"):
        found = re.search(rf"^  {phase} +{NUMBER} +{NUMBER}$", out, re.M)
        assert found, f"no row for {phase} in\n{out}"
        rows[phase] = tuple(float(v) for v in found.groups())
    # Every overlapped step after the first learns on samples of the previous weights.
    assert "staleness with overlap: 1 version" in out
    slowest = float(re.search(rf"slowest phase \(sequential runs\): {NUMBER} s", out).group(1))
    assert slowest == pytest.approx(max(v[0] for k, v in rows.items() if k != "step"), abs=0.01)
    lines = out.strip().splitlines()
    speedup = re.fullmatch(rf"sequential / overlap: {NUMBER}x", lines[-2])
    tightness = re.fullmatch(rf"overlap step / slowest phase: {NUMBER}x", lines[-1])
    assert speedup and tightness, lines[-2:]
    # One run per side: the ratios are those of the table's medians (to their rounding).
    seq, ovl = rows["step"]
    assert float(speedup.group(1)) == pytest.approx(seq / ovl, rel=0.05)
    assert float(tightness.group(1)) == pytest.approx(ovl / slowest, rel=0.05)
