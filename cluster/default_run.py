"""The embedded default, end to end on one machine, under the paper's protocol: phantoms (train,
validation and test scans) -> the tiny Qwen3-VL's stand-in for a pretrained checkpoint
(learner.grounding, built once per machine) -> a short SFT cold start -> local Ray head and MLflow
on 127.0.0.1 -> GRPO submitted with ``ray job submit`` -> the equal-compute control (the cold
start continued by SFT for as many sample passes as GRPO made) -> evaluation of base, SFT,
SFT (equal updates) and SFT+RL on the validation and the test scans -> the sampled training
reward of SFT and SFT+RL on the same prompts -> the table, the bar's checks, ``learning.png`` and
where the MLflow UI is.

    python -m cluster.default_run [--config configs/tiny.yaml] [--cases 60] [--val-every 8]
        [--manifest M] [--steps N] [--sft-epochs N] [--seed S] [--out-dir DIR] [--print-config]
        [-v] [--debug] [key=value ...]

``--manifest M`` runs the same stages on a manifest of your own scans (``data.manifest``,
``data.m3dseg``) instead of phantoms: it needs training and test rows; validation rows, when it
has them, get their own table. With ``--config configs/paper.yaml`` and its ``model.path`` the
stages train the real model. ``--print-config`` prints the config every stage starts from (the
file, the overrides, and the run folder's paths) and exits.

Quiet by default: the console shows the stages, their progress bars and results; each part logs
to ``<out-dir>/logs/`` (``default_run.log``, ``sft.log``, ``grpo.log``, ``sft_equal.log``,
``evaluate.log``, ``evaluate_val.log``, ``reward_gain.log``, ``ray.log``), and ``-v`` shows
third-party logs on the console as well. A stage that fails adds its console output (its
traceback; the GRPO job's whole output) to its log, and the error names that file. Every stage,
the Ray head and the GRPO job run under the interpreter that started this command, checked
first, so ``<env>/bin/python -m cluster.default_run`` works without activating the environment.
"""

from __future__ import annotations

import codecs
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from common.cli import (
    LOG_FILE_ENV,
    VERBOSE_ENV,
    ArgumentParser,
    UsageError,
    add_config_arguments,
    command,
    command_config,
    existing_file,
    log_to_file,
    output_to,
)
from common.runtime import (
    InterpreterError,
    append_output,
    interpreter_environment,
    keep_gpus_for,
    require_interpreter,
    set_default_environment,
)

if TYPE_CHECKING:  # the top imports the standard library only (see main)
    from common.config import RunConfig


def say(message: str) -> None:
    print(f"\n== {message}", flush=True)


ORACLE = "oracle anchor (baseline)"
EQUAL = "SFT (equal updates)"  # the control: the cold start continued for GRPO's sample uses
BUDGET_S = 900  # the whole default run, stand-in cached, on a 2-core machine


@dataclass(frozen=True)
class Split:
    """One evaluated split of the default run: its rows' DSC with CIs and its paired comparisons."""

    name: str
    dsc: dict  # row -> (mean, CI low, CI high), x100
    malformed: dict  # row -> (malformed answers, cases)
    comparisons: list  # evaluation.evaluate.compare records


def read_split(name: str, folder: Path) -> Split:
    from evaluation.cases import read_cases
    from evaluation.evaluate import suite_scores
    from evaluation.stats import bootstrap_ci

    results, rows = read_cases(folder / "cases.jsonl", None)
    dsc = {row: tuple(100 * x for x in bootstrap_ci(suite_scores(results, row))) for row in rows}
    malformed = {
        row: (
            sum(1 for r in results if r["row"] == row and r.get("failure")),
            sum(1 for r in results if r["row"] == row),
        )
        for row in rows
    }
    comparisons = json.loads((folder / "comparisons.json").read_text())
    return Split(name, dsc, malformed, comparisons)


def bar_checks(split: Split, kl_step1: float | None, gain: dict | None, took: float) -> list[str]:
    """The default run's bar, checked on one split's rows (read by name). The paper's setting is
    the held-out phrasings (its test queries are free-form descriptions)."""
    from evaluation.evaluate import PHRASING_SUFFIX as H
    from evaluation.evaluate import comparison_line

    def check(ok: bool) -> str:
        return "yes" if ok else "NO"

    dsc, oracle = split.dsc, split.dsc.get(ORACLE, (float("nan"),))[0]
    pairs = {(c["before"], c["after"]): c for c in split.comparisons}
    lines = [
        f"Does it learn? {split.name} scans; DSC x100, mean over suites, 95% CIs resample scans;"
        f" the paper's setting is the held-out phrasings. Oracle anchor: {oracle:.2f}"
    ]
    paper = pairs.get(("SFT" + H, "SFT+RL" + H))
    if paper:
        ok = paper["dsc_difference"] >= 2 and paper["ci_low"] > 0
        lines.append(f"  {comparison_line(paper)} (>= +2 with CI above 0: {check(ok)})")
    trained = pairs.get(("SFT", "SFT+RL"))
    if trained:
        ok = trained["dsc_difference"] >= 0
        lines.append(f"  {comparison_line(trained)} (>= 0: {check(ok)})")
    for row, share in (("SFT+RL", 0.6), ("SFT+RL" + H, 0.4), ("SFT", 1 / 3)):
        if row in dsc:
            got = dsc[row][0] / oracle
            lines.append(
                f"  {row}: {dsc[row][0]:.2f} = {got:.2f} of the oracle (at least {share:.2f}: "
                f"{check(got >= share)})"
            )
    if "SFT" in split.malformed:
        bad, n = split.malformed["SFT"]
        lines.append(
            f"  SFT malformed answers: {bad} of {n} (at most 15%: {check(bad <= 0.15 * n)})"
        )
    for suffix in ("", H):
        c = pairs.get((EQUAL + suffix, "SFT+RL" + suffix))
        if c:
            lines.append(f"  control: {comparison_line(c)}")
    if kl_step1 is not None:
        lines.append(
            f"  KL to the reference at GRPO step 1: {kl_step1:.2e} (below 0.01: "
            f"{check(kl_step1 < 0.01)})"
        )
    if gain is not None:
        from evaluation.reward_gain import gain_line

        lines.append(f"  {gain_line(gain)} (CI above 0: {check(gain['ci_low'] > 0)})")
    if took:
        lines.append(f"  time: {took:.0f} s (at most {BUDGET_S} s: {check(took <= BUDGET_S)})")
    return lines


def learning_figure(path: Path, steps, rewards, splits: list[Split]) -> Path:
    """Left: GRPO reward per step with its trailing mean; right: DSC per checkpoint on each
    split with 95% CIs (hatched: asked with held-out phrasings, the paper's setting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from common.tracking import moving_average
    from evaluation.evaluate import PHRASING_SUFFIX

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.2), width_ratios=[1, 1.7])
    if steps:
        left.plot(steps, rewards, "o", ms=2, alpha=0.35, label="reward/total per step")
        left.plot(steps, moving_average(rewards, 10), lw=2, label="mean of 10 steps")
        left.legend(fontsize=7)
    left.set_xlabel("GRPO step")
    left.set_title("GRPO training reward (R = Rf + Ra + Rs + Rc)", fontsize=9)
    names = list(dict.fromkeys(n for s in reversed(splits) for n in s.dsc))  # test's order
    width = 0.8 / max(1, len(splits))
    colours = ("tab:orange", "tab:blue")
    for k, split in enumerate(splits):
        xs = [
            i + (k - (len(splits) - 1) / 2) * width for i, n in enumerate(names) if n in split.dsc
        ]
        vals = [split.dsc[n] for n in names if n in split.dsc]
        bars = right.bar(
            xs,
            [v[0] for v in vals],
            width,
            yerr=np.array([[v[0] - v[1] for v in vals], [v[2] - v[0] for v in vals]]),
            capsize=2,
            color=colours[k % 2],
            label=f"{split.name} scans",
        )
        for bar, name in zip(bars, [n for n in names if n in split.dsc]):
            if PHRASING_SUFFIX in name:
                bar.set_hatch("//")
            if name.startswith("oracle"):
                bar.set_alpha(0.5)
    right.set_xticks(range(len(names)))
    right.set_xticklabels(
        [
            n.replace(PHRASING_SUFFIX, "\n(held-out\nphrasings)")
            .replace(" anchor ", "\nanchor\n")
            .replace(" (equal updates)", "\n(equal\nupdates)")
            for n in names
        ],
        fontsize=7,
    )
    right.legend(fontsize=7)
    right.set_ylabel("DSC (mean over suites)")
    right.set_title(
        "DSC per checkpoint, 95% CI over scans (hatched: held-out phrasings)", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def learning_report(out: Path, tracking_uri: str, experiment: str, took: float = 0.0) -> str:
    """The default run's claim, checked on validation and on test: the bar's checks per split,
    the KL at GRPO's first step, the sampled-reward gain on training prompts; draws
    ``learning.png``."""
    from common.tracking import latest_run_id, metric_history

    splits = [
        read_split(name, out / folder)
        for name, folder in (("validation", "eval-val"), ("test", "eval"))
        if (out / folder / "cases.jsonl").exists()
    ]
    run_id = latest_run_id(tracking_uri, experiment)
    steps, rewards = metric_history(tracking_uri, run_id, "reward/total") if run_id else ([], [])
    _, kls = metric_history(tracking_uri, run_id, "learner/kl") if run_id else ([], [])
    gain_file = out / "reward_gain" / "reward_gain.json"
    gain = json.loads(gain_file.read_text()) if gain_file.exists() else None
    lines = [""]
    for split in splits:
        final = split.name == "test"
        lines += bar_checks(
            split,
            kls[0] if kls and final else None,
            gain if final else None,
            took if final else 0.0,
        )
        lines.append("")
    learning_figure(out / "learning.png", steps, rewards, splits)
    return "\n".join(lines)


class StageFailed(RuntimeError):
    """A stage of the default run ended with an error; it printed its own error line."""


def run_stage(name: str, command: list[str], logs: Path) -> None:
    """Run one stage as its own process; its log records go to ``logs/<name>.log``. Its stderr
    reaches the console as it comes and, if the stage fails, that log too: a traceback or a
    one-line error is printed, never logged, and the error below points to that file."""
    log = logs / f"{name}.log"
    env = {**interpreter_environment(), LOG_FILE_ENV: str(log)}
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        try:
            while chunk := os.read(process.stderr.fileno(), 1 << 16):
                sys.stderr.write(decoder.decode(chunk))
                sys.stderr.flush()
                stderr.write(chunk)
        except BaseException:  # Ctrl-C: the stage got it too; do not leave it running
            process.kill()
            process.wait()
            raise
        finally:
            process.stderr.close()
        sys.stderr.write(decoder.decode(b"", final=True))
        code = process.wait()
        if code:
            stderr.seek(0)
            text = stderr.read().decode("utf-8", "replace")
            append_output(log, f"stderr of stage {name} (exit status {code})", text)
            raise StageFailed(f"{name}: exited with status {code} (log: {log})")


@dataclass(frozen=True)
class Stages:
    """How every stage of one default run is started: the interpreter, the config, the
    overrides every stage shares, the run folder and where the logs go."""

    out: Path
    config: list[str]  # --config FILE
    common: list[str]  # key=value overrides of every stage
    logs: Path
    quiet: bool

    def run(self, name: str, module: str, *args: str) -> None:
        """``python -m module --config ... <common> <args>`` as its own process."""
        run_stage(
            name, [sys.executable, "-m", module, *self.config, *self.common, *args], self.logs
        )


def parse_args(argv: list[str] | None):
    parser = ArgumentParser(
        prog="python -m cluster.default_run", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--cases", type=int, default=60, help="phantom cases (scans) to generate")
    parser.add_argument(
        "--val-every",
        type=int,
        default=8,
        metavar="K",
        help="scan i with i %% K == 0 is a validation scan (test: i %% 4 == 3; 0: no validation)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="GRPO steps (default: grpo.epochs over the data)"
    )
    parser.add_argument("--sft-epochs", type=int, default=None)
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seeds phantoms, model init and sampling (default: the config's seed, 0)",
    )
    parser.add_argument(
        "--manifest",
        type=existing_file,
        default=None,
        help="your own scans' manifest, instead of phantoms (--cases and --val-every unused)",
    )
    parser.add_argument(
        "--out-dir", type=Path, default=None, help="run folder (default: output_dir)"
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cpu (default: every GPU hidden from every stage, so the run is the CPU's fp32 "
        "run whatever the machine has) or cuda (the stages see the GPUs)",
    )
    add_config_arguments(parser, default=Path("configs/tiny.yaml"))
    args = parser.parse_args(argv)
    # every fourth phantom is a test case: fewer than 4 leaves nothing to evaluate
    if args.cases < 4:
        raise UsageError(f"--cases {args.cases}: need at least 4 (every 4th case is a test case)")
    for flag, value in (("--steps", args.steps), ("--sft-epochs", args.sft_epochs)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} {value}: must be at least 1")
    if args.val_every < 0:
        raise UsageError(f"--val-every {args.val_every}: must be 0 (no validation) or more")
    return args


def make_phantoms(manifest: Path, cases: int, seed: int, val_every: int) -> dict:
    """The run's phantom scans (once per run folder); returns :func:`split_counts`."""
    say(f"phantoms: {cases} scans -> {manifest.parent}")
    if not manifest.exists():
        from data.phantoms import SMALL_SHAPE, write_phantoms

        write_phantoms(manifest.parent, cases, seed=seed, shape=SMALL_SHAPE, val_every=val_every)
    splits = split_counts(manifest)
    print("  " + ", ".join(f"{split}: {n} scans, {t} targets" for split, (n, t) in splits.items()))
    return splits


def own_manifest(manifest: Path) -> dict:
    """A user's manifest in place of phantoms; returns :func:`split_counts`. SFT and GRPO need
    training rows and the tables test rows: a manifest without either stops here."""
    say(f"your manifest: {manifest}")
    splits = split_counts(manifest)
    if missing := [split for split in ("train", "test") if split not in splits]:
        counts = ", ".join(f"{split} {t}" for split, (_, t) in sorted(splits.items()))
        raise UsageError(
            f"--manifest {manifest}: no {' and no '.join(missing)} rows (rows per split: "
            f"{counts or 'none'}); set their split field, e.g. with python -m data.manifest "
            "--test-fraction"
        )
    print("  " + ", ".join(f"{split}: {n} scans, {t} targets" for split, (n, t) in splits.items()))
    return splits


def stand_in(base) -> float:
    """The tiny model's stand-in for a pretrained checkpoint, built once per machine; returns
    the seconds spent building it (0 when reused or not needed)."""
    if base.model.path is not None or base.model.grounding_epochs <= 0:
        return 0.0
    from learner.grounding import MARKER, pretrained_dir, pretrained_tiny_model

    folder = pretrained_dir(base)
    if (folder / MARKER).exists():
        say(f"the tiny model's stand-in for a pretrained checkpoint: reused from {folder}")
        return 0.0
    say(
        "the tiny model's stand-in for a pretrained checkpoint (grounding on a phantom "
        f"corpus of its own; once per machine, like the environment) -> {folder}"
    )
    began = time.time()
    pretrained_tiny_model(base)
    return time.time() - began


def equal_updates_control(stages: Stages, base, sft: Path) -> Path:
    """The cold start continued by SFT for as many sample uses as GRPO made; its adapter."""
    out = stages.out
    uses = grpo_sample_uses(out / "mlflow.db", base.tracking.experiment, base.grpo.batch_size)
    say(f"{EQUAL}: the cold start continued by SFT for GRPO's {uses} sample uses")
    stages.run(
        "sft_equal",
        "learner.sft",
        f"tracking.tracking_uri=sqlite:///{out / 'mlflow.db'}",
        f"output_dir={out / 'equal'}",
        f"sft.init_adapter={sft}",
        f"sft.max_steps={max(1, uses // base.sft.batch_size)}",
        # epochs enough to hold max_steps; the schedule follows max_steps
        f"sft.epochs={base.grpo.epochs + 1}",
    )
    return out / "equal" / "sft" / "adapter"


def evaluate_checkpoints(stages: Stages, splits: dict, sft: Path, equal: Path, grpo: Path) -> None:
    """SFT, the control and SFT+RL (and the base on test) on the validation and the test
    scans, with both phrasings; then the sampled reward of SFT and SFT+RL on training prompts."""
    rows = [
        *("--adapter", f"SFT={sft}", "--adapter", f"{EQUAL}={equal}"),
        *("--adapter", f"SFT+RL={grpo}", "--phrasings", "both"),
        *("--compare", "SFT:SFT+RL", "--compare", f"{EQUAL}:SFT+RL"),
    ]
    if splits.get("val", (0, 0))[0]:
        say("evaluation on the validation scans (python -m evaluation.evaluate --split val)")
        split = ("--split", "val", "--out-dir", str(stages.out / "eval-val"))
        stages.run("evaluate_val", "evaluation.evaluate", *split, *rows)
    say("evaluation on the test scans (python -m evaluation.evaluate)")
    stages.run("evaluate", "evaluation.evaluate", "--adapter", "base=base", *rows)
    say(
        "the sampled training reward of SFT and SFT+RL on the same prompts "
        "(python -m evaluation.reward_gain)"
    )
    stages.run(
        "reward_gain",
        "evaluation.reward_gain",
        "--before",
        f"SFT={sft}",
        "--after",
        f"SFT+RL={grpo}",
        "--split",
        "train",
    )


@command(StageFailed, InterpreterError)
def main(argv: list[str] | None = None) -> int:
    set_default_environment()
    args = parse_args(argv)
    keep_gpus_for(args.device)  # before any stage, or torch, starts
    # Every stage runs under sys.executable: stop now if it cannot, before the first import of
    # a third-party package (this module's top imports the standard library only).
    require_interpreter()
    start = time.time()
    base, stages = plan_stages(args)
    log_to_file(stages.logs / "default_run.log")
    splits = input_scans(args, stages, base)
    one_time = stand_in(base)
    sft, equal, grpo = train(stages, base, args.steps)
    evaluate_checkpoints(stages, splits, sft, equal, grpo)
    report(stages, base, took=time.time() - start - one_time, one_time=one_time)
    return 0


def plan_stages(args) -> tuple[RunConfig, Stages]:
    """The run config (file, ``--seed`` and overrides) and how each stage starts: the run
    folder and the overrides every stage shares (its paths, ``--sft-epochs``, quiet actors).
    ``--print-config`` prints the config every stage starts from and ends the command here."""
    from common.config import load_run_config

    seed_override = [f"seed={args.seed}"] if args.seed is not None else []
    base = load_run_config(args.config, [*seed_override, *args.overrides])
    out = (args.out_dir or Path(base.output_dir)).resolve()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out-dir {out}: exists and is not a folder")
    manifest = args.manifest.resolve() if args.manifest else out / "phantoms" / "manifest.jsonl"
    common = [
        *seed_override,
        *args.overrides,
        f"output_dir={out}",
        f"data.manifest={manifest}",
        f"data.cache_dir={out / 'cache'}",
    ]
    if args.sft_epochs is not None:
        common.append(f"sft.epochs={args.sft_epochs}")
    quiet = os.environ.get(VERBOSE_ENV) != "1"
    if quiet:  # the GRPO job's actors keep their logs in Ray's session folder, off the console
        common.append("cluster.log_to_driver=false")
    command_config(args, overrides=common)
    return base, Stages(out, ["--config", str(args.config)], common, out / "logs", quiet)


def input_scans(args, stages: Stages, base: RunConfig) -> dict:
    """The run's scans: the user's manifest, or phantoms written once per run folder; returns
    :func:`split_counts`."""
    if args.manifest is not None:
        return own_manifest(args.manifest.resolve())
    manifest = stages.out / "phantoms" / "manifest.jsonl"
    return make_phantoms(manifest, args.cases, base.seed, args.val_every)


def train(stages: Stages, base: RunConfig, steps: int | None) -> tuple[Path, Path, Path]:
    """SFT cold start, GRPO from it, and the equal-updates control; their adapters."""
    out = stages.out
    say("SFT cold start (python -m learner.sft)")
    stages.run("sft", "learner.sft", f"tracking.tracking_uri=sqlite:///{out / 'mlflow.db'}")
    sft, grpo = out / "sft" / "adapter", out / "grpo" / "adapter"
    max_steps = [f"grpo.max_steps={steps}"] if steps is not None else []
    run_grpo(stages, [f"sft_adapter={sft}", *max_steps])
    equal = equal_updates_control(stages, base, sft)
    return sft, equal, grpo


def report(stages: Stages, base: RunConfig, took: float, one_time: float) -> None:
    """The reward curves, the tables, the learning checks, and where the logs and MLflow are."""
    from common.tracking import plot_reward_curves

    out = stages.out
    tracking = f"sqlite:///{out / 'mlflow.db'}"
    curves = plot_reward_curves(tracking, base.tracking.experiment, out / "reward_curves.png")
    say(
        f"done in {took:.0f} s"
        + (f" (and {one_time:.0f} s, once per machine, for the stand-in)" if one_time else "")
    )
    for folder in ("eval-val", "eval"):
        if (out / folder / "table.md").exists():
            print(f"\n{folder}/table.md:\n" + (out / folder / "table.md").read_text())
    print(learning_report(out, tracking, base.tracking.experiment, took))
    print(
        f"tables: {out / 'eval-val' / 'table.md'}, {out / 'eval' / 'table.md'}; reward "
        f"curves: {curves}; {out / 'learning.png'}"
    )
    print(f"logs of every part: {stages.logs}")
    print(
        "MLflow UI (reward curves of the SFT and GRPO runs):\n"
        f"  mlflow ui --backend-store-uri sqlite:///{out / 'mlflow.db'} --host 127.0.0.1 "
        "--port 5000\n  then open http://127.0.0.1:5000"
    )


def split_counts(manifest: Path) -> dict[str, tuple[int, int]]:
    """{split: (scans, targets)} of a manifest."""
    from evaluation.stats import scan_of

    scans: dict[str, set] = {}
    targets: dict[str, int] = {}
    for line in manifest.read_text().splitlines():
        row = json.loads(line)
        scans.setdefault(row["split"], set()).add(scan_of(row["id"]))
        targets[row["split"]] = targets.get(row["split"], 0) + 1
    return {split: (len(scans[split]), targets[split]) for split in scans}


def run_grpo(stages: Stages, grpo_args: list[str]) -> None:
    """A local Ray head and an MLflow server on 127.0.0.1, GRPO submitted to the head with
    ``ray job submit``, both stopped afterwards."""
    from common.services import MlflowServer, RayHead, ray_temp_dir

    out, logs, quiet = stages.out, stages.logs, stages.quiet
    say(f"local Ray head and MLflow server on 127.0.0.1 (logs: {logs})")
    mlflow = MlflowServer.start(out / "mlflow.db", out / "mlartifacts", out / "mlflow.log")
    head = None
    try:
        # The head and everything it runs (the GRPO job, its actors) inherit this environment:
        # the quiet settings, and where the GRPO driver logs.
        os.environ[LOG_FILE_ENV] = str(logs / "grpo.log")
        try:
            with output_to(logs / "ray.log" if quiet else None):  # `ray start` prints a page
                head = RayHead.start(num_cpus=4, temp_dir=ray_temp_dir(out))
        finally:
            os.environ.pop(LOG_FILE_ENV)
        say(f"GRPO: ray job submit to {head.dashboard}")
        args = [*stages.config, *stages.common, *grpo_args, f"tracking.tracking_uri={mlflow.uri}"]
        try:
            head.submit_grpo(Path("."), args, log=logs / "grpo.log", check=True)
        except subprocess.CalledProcessError as err:
            raise StageFailed(
                f"grpo: the Ray job failed (status {err.returncode}; log: {logs / 'grpo.log'})"
            ) from None
    finally:
        if head is not None:
            with output_to(logs / "ray.log" if quiet else None):
                head.stop()
        mlflow.stop()


def grpo_sample_uses(db: Path, experiment: str, batch_size: int) -> int:
    """How many samples the finished GRPO run trained on: its steps x prompts per step."""
    from common.tracking import latest_run_id, metric_history

    uri = f"sqlite:///{db}"
    run_id = latest_run_id(uri, experiment)
    steps = metric_history(uri, run_id, "reward/total")[0] if run_id else []
    if not steps:
        raise StageFailed(f"grpo: no reward/total logged in {db}; the GRPO run made no step")
    return len(steps) * batch_size


if __name__ == "__main__":
    sys.exit(main())
