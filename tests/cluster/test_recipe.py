"""One recipe: SFT, GRPO and evaluation share output_dir; GRPO refuses to start without the SFT
adapter it looks for; MedSAM2 refuses to score without weights; the example scripts run."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import ConfigError, load_run_config

REPO = Path(__file__).resolve().parents[2]


def test_the_sft_adapter_follows_output_dir_unless_given():
    tiny = load_run_config(REPO / "configs/tiny.yaml")
    assert tiny.sft_adapter == Path("runs/tiny/sft/adapter")
    paper = load_run_config(REPO / "configs/paper.yaml", ["output_dir=/runs/try2"])
    assert paper.sft_adapter == Path("/runs/try2/sft/adapter")
    given = load_run_config(REPO / "configs/paper.yaml", ["sft_adapter=/elsewhere/adapter"])
    assert given.sft_adapter == Path("/elsewhere/adapter")
    base = load_run_config(REPO / "configs/tiny.yaml", ["grpo.from_base=true"])
    assert base.sft_adapter is None
    with pytest.raises(ConfigError, match="sft_adapter .*grpo.from_base"):
        load_run_config(REPO / "configs/tiny.yaml", ["grpo.from_base=true", "sft_adapter=/a"])


def test_grpo_without_its_sft_adapter_stops_naming_the_path(tmp_path, capsys):
    from cluster.grpo import main
    from cluster.trainer import sft_start
    from common.cli import run_cli

    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("")
    argv = ["--config", "configs/tiny.yaml", f"data.manifest={manifest}", f"output_dir={tmp_path}"]
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: sft_adapter: ") and f"{tmp_path}/sft/adapter" in err, err
    assert "grpo.from_base=true" in err
    assert not (tmp_path / "grpo").exists()  # stopped before anything started

    adapter = tmp_path / "sft" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    cfg = load_run_config(REPO / "configs/tiny.yaml", [f"output_dir={tmp_path}"])
    assert sft_start(cfg) == adapter
    assert sft_start(load_run_config(REPO / "configs/tiny.yaml", ["grpo.from_base=true"])) is None


def test_medsam2_without_a_checkpoint_stops_naming_the_field():
    with pytest.raises(ValueError, match=r"^reward.checkpoint: not set.*'medsam2'"):
        load_run_config(REPO / "configs/paper.yaml", ["reward.checkpoint=null"])
    random = load_run_config(
        REPO / "configs/paper.yaml", ["reward.checkpoint=null", "reward.random_weights=true"]
    )
    assert random.reward.checkpoint is None
    assert load_run_config(REPO / "configs/tiny.yaml").reward.propagator == "baseline"


EXAMPLES = sorted((REPO / "examples").glob("*.sh"))


def test_the_examples_are_bash_and_every_module_they_run_answers_help():
    assert {p.name for p in EXAMPLES} >= {"paper.sh", "own_data.sh"}
    modules = set()
    for script in EXAMPLES:
        checked = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert checked.returncode == 0, f"{script.name}: {checked.stderr}"
        text = script.read_text()
        named = re.findall(r'"\$PYTHON" -m ([\w.]+)', text)
        assert named, f"{script.name} runs no module"
        modules.update(named)
        # every key=value override the script gives is a field of its config
        config = re.search(r"--config (\S+)", text)[1]
        keys = re.findall(r'^\s+"([\w.]+)=\$', text, re.MULTILINE)
        assert "output_dir" in keys, script.name
        load_run_config(REPO / config, [f"{key}=/x" for key in keys])
    assert {"learner.sft", "cluster.grpo", "evaluation.evaluate"} <= modules
    missing = sorted(m for m in modules if importlib.util.find_spec(m) is None)
    assert not missing, f"modules the examples run that do not exist: {missing}"
    helps = {
        m: subprocess.Popen(
            [sys.executable, "-m", m, "--help"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for m in sorted(modules)
    }
    for module, process in helps.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0 and "usage:" in out, f"{module} --help: {err[-2000:]}"
