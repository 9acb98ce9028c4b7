"""The embedded default, end to end on one machine: phantoms -> tiny Qwen3-VL -> SFT cold start ->
local Ray head and MLflow on 127.0.0.1 -> GRPO submitted with ``ray job submit`` -> evaluation
(SFT against SFT+RL on held-out phantoms) -> the table and where the MLflow UI is.

    python -m cluster.default_run [--config configs/tiny.yaml] [--cases 12] [--steps 8]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from cluster.config import load_run_config
from cluster.runtime import set_default_environment


def say(message: str) -> None:
    print(f"\n== {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    set_default_environment()
    parser = argparse.ArgumentParser(prog="python -m cluster.default_run")
    parser.add_argument("--config", type=Path, default=Path("configs/tiny.yaml"))
    parser.add_argument("--cases", type=int, default=12, help="phantom cases to generate")
    parser.add_argument("--steps", type=int, default=8, help="GRPO steps")
    parser.add_argument("--sft-epochs", type=int, default=None)
    args = parser.parse_args(argv)
    start = time.time()
    base = load_run_config(args.config)
    out = Path(base.output_dir).resolve()
    manifest = out / "phantoms" / "manifest.jsonl"
    common = [f"output_dir={out}", f"data.manifest={manifest}", f"data.cache_dir={out / 'cache'}"]
    if args.sft_epochs is not None:
        common.append(f"sft.epochs={args.sft_epochs}")
    py = sys.executable

    say(f"phantoms: {args.cases} cases -> {manifest.parent}")
    if not manifest.exists():
        from data.phantoms import write_phantoms

        write_phantoms(manifest.parent, args.cases, seed=base.seed, shape=(48, 128, 128))

    say("SFT cold start (python -m learner.sft)")
    subprocess.run(
        [
            py,
            "-m",
            "learner.sft",
            "--config",
            str(args.config),
            *common,
            f"tracking.tracking_uri=sqlite:///{out / 'mlflow.db'}",
        ],
        check=True,
    )

    from cluster.services import MlflowServer, RayHead

    say("local Ray head and MLflow server on 127.0.0.1")
    mlflow = MlflowServer.start(out / "mlflow.db", out / "mlartifacts", out / "mlflow.log")
    head = RayHead.start(num_cpus=4, temp_dir=Path("/tmp") / f"medvol-ray-{out.name}")
    try:
        say(f"GRPO: ray job submit to {head.dashboard}")
        head.submit_grpo(
            Path("."),
            [
                "--config",
                str(args.config),
                *common,
                f"tracking.tracking_uri={mlflow.uri}",
                f"sft_adapter={out / 'sft' / 'adapter'}",
                f"steps={args.steps}",
            ],
            check=True,
        )
        say("evaluation on held-out phantoms (python -m evaluation.evaluate)")
        subprocess.run(
            [
                py,
                "-m",
                "evaluation.evaluate",
                "--config",
                str(args.config),
                *common,
                "--checkpoint",
                f"SFT={out / 'sft' / 'adapter'}",
                "--checkpoint",
                f"SFT+RL={out / 'grpo' / 'adapter'}",
            ],
            check=True,
        )
    finally:
        head.stop()
        mlflow.stop()
    from cluster.tracking import plot_reward_curves

    curves = plot_reward_curves(
        f"sqlite:///{out / 'mlflow.db'}", base.tracking.experiment, out / "reward_curves.png"
    )
    say(f"done in {time.time() - start:.0f} s")
    print((out / "eval" / "table.md").read_text())
    print(f"table: {out / 'eval' / 'table.md'}; reward curves: {curves}")
    print(
        "MLflow UI (reward curves of the SFT and GRPO runs):\n"
        f"  mlflow ui --backend-store-uri sqlite:///{out / 'mlflow.db'} --host 127.0.0.1 "
        "--port 5000\n  then open http://127.0.0.1:5000"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
