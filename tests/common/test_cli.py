"""The shared command line: --print-config prints the merged config of every command that takes
one (and it loads back to an equal config), a command's main runs under the error convention
when called directly, and every console script of pyproject.toml is a real main."""

import importlib
import logging
import tomllib
from pathlib import Path

import pytest

from common.cli import ArgumentParser, UsageError, command, run_cli
from common.config import load_config, load_run_config

REPO = Path(__file__).resolve().parents[2]
OVERRIDES = ["data.num_slices=8", "seed=5"]


def printed_config(module: str, argv: list[str], capsys) -> str:
    main = importlib.import_module(module).main
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "error" not in err
    return out


@pytest.mark.parametrize(
    "module, extra",
    [
        ("learner.sft", []),
        ("cluster.grpo", []),
        ("evaluation.evaluate", ["--adapter", "SFT=nowhere"]),
        ("evaluation.reward_gain", ["--before", "A=nowhere", "--after", "B=nowhere"]),
        ("evaluation.anchor_slack", ["--cases-file", "CASES"]),
        ("evaluation.lesion_side", ["--cases-file", "CASES"]),
    ],
)
def test_print_config_loads_back_to_the_merged_config(module, extra, tmp_path, capsys):
    cases = tmp_path / "cases.jsonl"
    cases.write_text("")
    extra = [str(cases) if a == "CASES" else a for a in extra]
    argv = [*extra, "--config", "configs/tiny.yaml", "--print-config", *OVERRIDES]
    printed = tmp_path / "printed.yaml"
    printed.write_text(printed_config(module, argv, capsys))
    again = load_run_config(printed)
    assert again == load_run_config("configs/tiny.yaml", OVERRIDES)
    assert again != load_run_config("configs/tiny.yaml")
    assert (again.data.num_slices, again.seed) == (8, 5)
    assert not (tmp_path / "eval").exists() and cases.read_text() == ""  # nothing ran


def test_print_config_of_the_default_run_is_what_every_stage_starts_from(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--out-dir", str(out), "--sft-epochs", "2", "--print-config", *OVERRIDES]
    printed = tmp_path / "printed.yaml"
    printed.write_text(printed_config("cluster.default_run", argv, capsys))
    cfg = load_run_config(printed)
    expected = [
        *OVERRIDES,
        f"output_dir={out.resolve()}",
        f"data.manifest={out.resolve() / 'phantoms' / 'manifest.jsonl'}",
        f"data.cache_dir={out.resolve() / 'cache'}",
        "sft.epochs=2",
        "cluster.log_to_driver=false",
    ]
    assert cfg == load_run_config("configs/tiny.yaml", expected)
    assert not out.exists()  # no phantom, no log: nothing ran


def test_print_config_of_the_score_command_holds_its_two_sections(tmp_path, capsys):
    from reward_server.score import ScoreConfig

    manifest, completions = tmp_path / "m.jsonl", tmp_path / "c.jsonl"
    manifest.write_text("")
    completions.write_text("")
    argv = ["--manifest", str(manifest), "--completions", str(completions)]
    argv += ["--out-file", str(tmp_path / "s.jsonl"), "--config", "configs/tiny.yaml"]
    printed = tmp_path / "printed.yaml"
    argv += ["--print-config", "reward.delta=3"]
    printed.write_text(printed_config("reward_server.score", argv, capsys))
    again = load_config(ScoreConfig, printed)
    expected = load_config(
        ScoreConfig, "configs/tiny.yaml", ["reward.delta=3"], sections=("data", "reward")
    )
    assert again == expected and again.reward.delta == 3
    assert not (tmp_path / "s.jsonl").exists()


def toy(argv):
    parser = ArgumentParser(prog="toy")
    parser.add_argument("--cases", type=int, required=True)
    args = parser.parse_args(argv)
    if args.cases < 0:
        raise UsageError(f"--cases {args.cases}: must be >= 0")
    print(f"result {args.cases}")
    return 0


def test_a_command_runs_under_the_convention_when_called_directly_or_inside_run_cli(capsys):
    main = command()(toy)
    handlers = list(logging.getLogger().handlers)
    assert main(["--cases", "-1"]) == 2
    assert capsys.readouterr().err == "error: --cases -1: must be >= 0\n"
    assert run_cli(main, ["--cases", "-2"]) == 2  # inside another run_cli: one line, not two
    assert capsys.readouterr().err == "error: --cases -2: must be >= 0\n"
    assert main(["--cases", "3"]) == 0 and capsys.readouterr().out == "result 3\n"
    assert main.__wrapped__ is toy
    assert logging.getLogger().handlers == handlers  # nothing of its set-up outlives it


def console_scripts() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def test_the_console_scripts_name_the_commands_asked_for():
    scripts = console_scripts()
    assert {
        "medvol-predict": "evaluation.predict:main",
        "medvol-evaluate": "evaluation.evaluate:main",
        "medvol-sft": "learner.sft:main",
        "medvol-grpo": "cluster.grpo:main",
        "medvol-default-run": "cluster.default_run:main",
        "medvol-manifest": "data.manifest:main",
    }.items() <= scripts.items()


@pytest.mark.parametrize("name", sorted(console_scripts()))
def test_each_console_script_is_a_main_that_answers_help(name, capsys):
    module, _, function = console_scripts()[name].partition(":")
    main = getattr(importlib.import_module(module), function)
    with pytest.raises(SystemExit) as done:  # what argparse does for --help
        main(["--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("usage: ")
