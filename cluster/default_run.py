"""The embedded default, end to end on one machine: phantoms -> the tiny Qwen3-VL's stand-in for a
pretrained checkpoint (learner.grounding, built once per machine) -> SFT cold start -> local Ray
head and MLflow on 127.0.0.1 -> GRPO submitted with ``ray job submit`` -> evaluation (base, SFT
and SFT+RL on held-out phantoms, with 95% CIs and the paired SFT+RL - SFT difference) -> the
table, the learning checks, ``learning.png`` and where the MLflow UI is.

    python -m cluster.default_run [--config configs/tiny.yaml] [--cases 60] [--steps N]
        [--seed S] [--out DIR] [-v] [--debug] [key=value ...]

Quiet by default: the console shows the stages, their progress bars and results; each part logs
to ``<out>/logs/`` (``default_run.log``, ``sft.log``, ``grpo.log``, ``evaluate.log``,
``ray.log``), and ``-v`` shows third-party logs on the console as well.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from cluster.config import load_run_config
from cluster.runtime import set_default_environment
from data.cli import (
    LOG_FILE_ENV,
    VERBOSE_ENV,
    ArgumentParser,
    UsageError,
    existing_file,
    log_to_file,
    output_to,
    run_cli,
)


def say(message: str) -> None:
    print(f"\n== {message}", flush=True)


ORACLE = "oracle anchor (baseline)"


def learning_report(out: Path, tracking_uri: str, experiment: str) -> str:
    """The default run's claim, checked: SFT against the oracle-anchor ceiling, SFT+RL against
    SFT (paired, per case), and the slope of the GRPO reward; draws ``learning.png``."""
    import json

    from cluster.tracking import latest_run_id, metric_history
    from evaluation.evaluate import PHRASING_SUFFIX, comparison_line, suite_scores
    from evaluation.stats import bootstrap_ci, slope_ci

    results = [json.loads(line) for line in (out / "eval" / "cases.jsonl").read_text().splitlines()]
    rows = [r for r in dict.fromkeys(r["row"] for r in results)]
    dsc = {}
    for row in rows:
        scores = {k: list(v.values()) for k, v in suite_scores(results, row).items()}
        dsc[row] = tuple(100 * x for x in bootstrap_ci(scores))
    comparisons = json.loads((out / "eval" / "comparisons.json").read_text())
    run_id = latest_run_id(tracking_uri, experiment)
    steps, rewards = metric_history(tracking_uri, run_id, "reward/total") if run_id else ([], [])
    lines = ["", "Does it learn? (held-out cases; mean over suites of DSC, 95% CI)"]
    oracle = dsc.get(ORACLE, (float("nan"),))[0]

    def check(ok: bool) -> str:
        return "yes" if ok else "NO"

    for name, share in (("SFT", 0.5), ("SFT+RL", 0.75)):
        if name in dsc:
            got = dsc[name][0] / oracle
            lines.append(
                f"  {name}: {dsc[name][0]:.2f} DSC = {got:.2f} of the oracle anchor's "
                f"{oracle:.2f} (at least {share}: {check(got >= share)})"
            )
    for c in comparisons:
        if PHRASING_SUFFIX not in c["before"]:
            ok = c["dsc_difference"] >= 2 and c["ci_low"] > 0
            lines.append(f"  {comparison_line(c)} (>= +2 with CI above 0: {check(ok)})")
    for c in comparisons:
        if PHRASING_SUFFIX in c["before"]:
            lines.append(f"  {comparison_line(c)}")
    if len(steps) >= 2:
        slope, low, high = slope_ci(steps, rewards)
        lines.append(
            f"  GRPO reward/total slope: {slope:+.4f} per step, 95% CI [{low:+.4f}, {high:+.4f}] "
            f"over {len(steps)} steps (CI above 0: {check(low > 0)})"
        )
    learning_figure(out / "learning.png", steps, rewards, dsc)
    return "\n".join(lines)


def learning_figure(path: Path, steps, rewards, dsc: dict) -> Path:
    """Left: GRPO reward per step with its trailing mean; right: held-out DSC per checkpoint
    with 95% CIs (hatched: asked with held-out phrasings)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from evaluation.evaluate import PHRASING_SUFFIX
    from evaluation.stats import moving_average

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), width_ratios=[1, 1.3])
    if steps:
        left.plot(steps, rewards, "o", ms=2, alpha=0.35, label="reward/total per step")
        left.plot(steps, moving_average(rewards, 10), lw=2, label="mean of 10 steps")
        left.legend(fontsize=7)
    left.set_xlabel("GRPO step")
    left.set_title("GRPO training reward (R = Rf + Ra + Rs + Rc)", fontsize=9)
    names = list(dsc)
    means = [dsc[n][0] for n in names]
    errors = [[dsc[n][0] - dsc[n][1] for n in names], [dsc[n][2] - dsc[n][0] for n in names]]
    bars = right.bar(range(len(names)), means, yerr=errors, capsize=3, color="tab:blue")
    for bar, name in zip(bars, names):
        if PHRASING_SUFFIX in name:
            bar.set_hatch("//")
            bar.set_alpha(0.6)
        if name.startswith("oracle"):
            bar.set_color("tab:gray")
    right.set_xticks(range(len(names)))
    right.set_xticklabels(
        [
            n.replace(PHRASING_SUFFIX, "\n(held-out\nphrasings)").replace(" anchor ", "\nanchor\n")
            for n in names
        ],
        fontsize=7,
    )
    right.set_ylabel("DSC (mean over suites)")
    right.set_title("held-out cases, 95% CI", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


class StageFailed(RuntimeError):
    """A stage of the default run ended with an error; it printed its own error line."""


def run_stage(name: str, command: list[str], logs: Path) -> None:
    """Run one stage as its own process; its log goes to ``logs/<name>.log``."""
    env = {**os.environ, LOG_FILE_ENV: str(logs / f"{name}.log")}
    done = subprocess.run(command, env=env)
    if done.returncode:
        raise StageFailed(
            f"{name}: exited with status {done.returncode} (log: {logs / f'{name}.log'})"
        )


def main(argv: list[str] | None = None) -> int:
    set_default_environment()
    parser = ArgumentParser(
        prog="python -m cluster.default_run", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", type=existing_file, default=Path("configs/tiny.yaml"))
    parser.add_argument("--cases", type=int, default=60, help="phantom cases to generate")
    parser.add_argument(
        "--steps", type=int, default=None, help="GRPO steps (default: grpo.epochs over the data)"
    )
    parser.add_argument("--sft-epochs", type=int, default=None)
    parser.add_argument(
        "--seed", type=int, default=None, help="seeds phantoms, model init and sampling"
    )
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: output_dir)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every stage")
    args = parser.parse_args(argv)
    # every fourth phantom is a test case: fewer than 4 leaves nothing to evaluate
    if args.cases < 4:
        raise UsageError(f"--cases {args.cases}: need at least 4 (every 4th case is a test case)")
    for flag, value in (("--steps", args.steps), ("--sft-epochs", args.sft_epochs)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} {value}: must be at least 1")
    start = time.time()
    seed_override = [f"seed={args.seed}"] if args.seed is not None else []
    base = load_run_config(args.config, [*seed_override, *args.overrides])
    out = (args.out or Path(base.output_dir)).resolve()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    logs = out / "logs"
    log_to_file(logs / "default_run.log")
    manifest = out / "phantoms" / "manifest.jsonl"
    common = [
        *seed_override,
        *args.overrides,
        f"output_dir={out}",
        f"data.manifest={manifest}",
        f"data.cache_dir={out / 'cache'}",
    ]
    if args.sft_epochs is not None:
        common.append(f"sft.epochs={args.sft_epochs}")
    py = sys.executable
    quiet = os.environ.get(VERBOSE_ENV) != "1"
    if quiet:  # the GRPO job's actors keep their logs in Ray's session folder, off the console
        common.append("cluster.log_to_driver=false")

    say(f"phantoms: {args.cases} cases -> {manifest.parent}")
    if not manifest.exists():
        from data.phantoms import SMALL_SHAPE, write_phantoms

        write_phantoms(manifest.parent, args.cases, seed=base.seed, shape=SMALL_SHAPE)

    one_time = 0.0  # seconds spent building the stand-in for a pretrained checkpoint
    if base.model.path is None and base.model.grounding_epochs > 0:
        from learner.grounding import MARKER, pretrained_dir, pretrained_tiny_model

        folder = pretrained_dir(base)
        if (folder / MARKER).exists():
            say(f"the tiny model's stand-in for a pretrained checkpoint: reused from {folder}")
        else:
            say(
                "the tiny model's stand-in for a pretrained checkpoint (grounding on a phantom "
                f"corpus of its own; once per machine, like the environment) -> {folder}"
            )
            began = time.time()
            pretrained_tiny_model(base)
            one_time = time.time() - began

    say("SFT cold start (python -m learner.sft)")
    run_stage(
        "sft",
        [
            py,
            "-m",
            "learner.sft",
            "--config",
            str(args.config),
            *common,
            f"tracking.tracking_uri=sqlite:///{out / 'mlflow.db'}",
        ],
        logs,
    )

    from cluster.services import MlflowServer, RayHead

    say(f"local Ray head and MLflow server on 127.0.0.1 (logs: {logs})")
    mlflow = MlflowServer.start(out / "mlflow.db", out / "mlartifacts", out / "mlflow.log")
    # The head and everything it runs (the GRPO job, its actors) inherit this environment:
    # quiet settings, and where the GRPO driver logs.
    head = None
    try:
        # The head and everything it runs (the GRPO job, its actors) inherit this environment:
        # the quiet settings, and where the GRPO driver logs.
        os.environ[LOG_FILE_ENV] = str(logs / "grpo.log")
        try:
            with output_to(logs / "ray.log" if quiet else None):  # `ray start` prints a page
                head = RayHead.start(num_cpus=4, temp_dir=Path("/tmp") / f"medvol-ray-{out.name}")
        finally:
            os.environ.pop(LOG_FILE_ENV)
        say(f"GRPO: ray job submit to {head.dashboard}")
        try:
            head.submit_grpo(
                Path("."),
                [
                    "--config",
                    str(args.config),
                    *common,
                    f"tracking.tracking_uri={mlflow.uri}",
                    f"sft_adapter={out / 'sft' / 'adapter'}",
                    *([f"steps={args.steps}"] if args.steps is not None else []),
                ],
                check=True,
            )
        except subprocess.CalledProcessError as err:
            raise StageFailed(
                f"grpo: the Ray job failed (status {err.returncode}; log: {logs / 'grpo.log'})"
            ) from None
        say("evaluation on held-out phantoms (python -m evaluation.evaluate)")
        run_stage(
            "evaluate",
            [
                py,
                "-m",
                "evaluation.evaluate",
                "--config",
                str(args.config),
                *common,
                "--checkpoint",
                "base=base",
                "--checkpoint",
                f"SFT={out / 'sft' / 'adapter'}",
                "--checkpoint",
                f"SFT+RL={out / 'grpo' / 'adapter'}",
                "--phrasings",
                "both",
                "--compare",
                "SFT:SFT+RL",
            ],
            logs,
        )
    finally:
        if head is not None:
            with output_to(logs / "ray.log" if quiet else None):
                head.stop()
        mlflow.stop()
    from cluster.tracking import plot_reward_curves

    tracking = f"sqlite:///{out / 'mlflow.db'}"
    curves = plot_reward_curves(tracking, base.tracking.experiment, out / "reward_curves.png")
    took = time.time() - start
    say(
        f"done in {took - one_time:.0f} s"
        + (f" (and {one_time:.0f} s, once per machine, for the stand-in)" if one_time else "")
    )
    print((out / "eval" / "table.md").read_text())
    print(learning_report(out, tracking, base.tracking.experiment))
    print(f"table: {out / 'eval' / 'table.md'}; reward curves: {curves}; {out / 'learning.png'}")
    print(f"logs of every part: {logs}")
    print(
        "MLflow UI (reward curves of the SFT and GRPO runs):\n"
        f"  mlflow ui --backend-store-uri sqlite:///{out / 'mlflow.db'} --host 127.0.0.1 "
        "--port 5000\n  then open http://127.0.0.1:5000"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, errors=(StageFailed,)))
