"""The GRPO driver with ``grpo.overlap`` off and on: how close the overlapped step comes to its
slowest phase. Run from the repository root:

    python -m bench.overlap [--shape tiny|paper] [--steps 4] [--repeats 3] [--batch B]

Each side is the real run as ``ray job submit`` starts it (``cluster.trainer.GRPOTrainer`` on a
local Ray instance: a vLLM rollout actor, the reward pool on Ray Serve, a DeepSpeed learner actor),
on the tiny Qwen3-VL and phantoms built here, each actor on the CPUs its bundle names (one each by
default; ``--cpus`` changes the rollout actor's and the learner's). The sides alternate run by run;
the first step of each run warms it up (and is the one step an overlapped run cannot overlap). From
the sequential runs come the phases of a step (generate, reward, learn, weight sync); from the
overlapped runs the step itself. The output ends with the median ratios and their min-max spread,
and the lines ``sequential / overlap: N.NNx`` and ``overlap step / slowest phase: N.NNx``.

``--shape paper`` is the paper's prompt (64 slices of 256 px, up to 256 new tokens, one prompt
per step, G = 4); ``tiny`` (default) is 16 slices of 128 px, 64 tokens, 4 prompts per step. The
random tiny policy's answers are malformed, so the reward phase is short on both sides: this
measures how generation and learning overlap; ``bench.reward_server`` measures the reward pool.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from common.cli import ArgumentParser, command

PHASES = ("time/generate_s", "time/reward_s", "time/learn_s", "time/weight_sync_s")


def run_steps(config: Path, overrides: list[str], steps: int) -> list[dict]:
    """``steps`` GRPO steps of one run (a fresh trainer); each step's metrics."""
    from cluster.trainer import GRPOTrainer
    from common.config import load_run_config

    trainer = GRPOTrainer(load_run_config(config, overrides))
    try:
        return [trainer.step() for _ in range(steps)]
    finally:
        trainer.close()


@command()
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m bench.overlap", description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=("tiny", "paper"), default="tiny")
    parser.add_argument("--steps", type=int, default=4, help="measured steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side (>= 1)")
    parser.add_argument("--batch", type=int, help="prompts per step")
    parser.add_argument("--cpus", type=float, default=1.0,
                        help="CPUs of the rollout actor and of the learner")
    args = parser.parse_args(argv)
    slices, size, tokens, batch = (64, 256, 256, 1) if args.shape == "paper" else (16, 128, 64, 4)
    batch = args.batch or batch
    from common.runtime import set_default_environment

    set_default_environment()
    import ray

    from data.phantoms import write_phantoms
    from rollout.tiny_model import build_tiny_qwen3vl

    repo = Path(__file__).resolve().parents[1]
    tmp = Path(tempfile.mkdtemp(prefix="bench-overlap-"))
    model = build_tiny_qwen3vl(tmp / "tiny", "test")
    steps = args.steps + 1  # the first step of a run warms it up
    side = max(128, size)
    manifest = write_phantoms(tmp / "data", n=6, seed=0,
                              shape=(max(48, slices + 16), side, side), progress=False)
    common = [
        f"data.manifest={manifest}", f"data.cache_dir={tmp / 'cache'}",
        f"data.num_slices={slices}", f"data.slice_size={size}", f"model.path={model}",
        f"rollout.max_tokens={tokens}", "rollout.temperature=1.0",
        f"rollout.max_model_len={1024 + slices * (size // 32) ** 2 + tokens}",
        f"grpo.batch_size={batch}", "grpo.epochs=4", f"grpo.max_steps={steps}", "grpo.tis_cap=2.0",
        f"cluster.rollout_cpus={args.cpus:g}", f"cluster.learner_cpus={args.cpus:g}",
        "cluster.log_to_driver=false", f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
        "grpo.checkpoint_every=1000", "grpo.from_base=true",
    ]
    os.chdir(repo)
    sequential, overlapped = [], []
    for r in range(args.repeats):
        for on, runs in ((False, sequential), (True, overlapped)):
            out = tmp / f"run-{r}-{'on' if on else 'off'}"
            runs.append(run_steps(repo / "configs/tiny.yaml",
                                  [*common, f"output_dir={out}", f"grpo.overlap={str(on).lower()}"],
                                  steps)[1:])
    ray.shutdown()

    def median(runs: list[list[dict]], key: str) -> np.ndarray:
        """Per run, the median of ``key`` over its measured steps."""
        return np.array([np.median([m[key] for m in run]) for run in runs])

    seq_step = median(sequential, "time/step_s")
    ovl_step = median(overlapped, "time/step_s")
    phases = {key: median(sequential, key) for key in PHASES}
    slowest = np.max(np.stack(list(phases.values())), axis=0)
    stale = median(overlapped, "rollout/staleness")
    speedup, tightness = seq_step / ovl_step, ovl_step / slowest
    print(f"GRPO driver, tiny Qwen3-VL, {batch} prompt(s) x G=4 per step, {slices} slices of "
          f"{size} px, max {tokens} new tokens, rollout actor and learner {args.cpus:g} CPU each, "
          f"{os.cpu_count()} cores (median over {args.steps} steps of each of {args.repeats} "
          f"runs per side, seconds)")
    print(f"  {'':22s} {'sequential':>10s} {'overlap':>10s}")
    for key in PHASES:
        print(f"  {key.removeprefix('time/').removesuffix('_s'):22s} "
              f"{np.median(phases[key]):10.2f} {np.median(median(overlapped, key)):10.2f}")
    print(f"  {'step':22s} {np.median(seq_step):10.2f} {np.median(ovl_step):10.2f}")
    print(f"  slowest phase (sequential runs): {np.median(slowest):.2f} s; staleness with "
          f"overlap: {np.median(stale):.0f} version")
    print(f"per run: sequential / overlap {speedup.min():.2f}x-{speedup.max():.2f}x, "
          f"overlap step / slowest phase {tightness.min():.2f}x-{tightness.max():.2f}x")
    print(f"sequential / overlap: {np.median(speedup):.2f}x")
    print(f"overlap step / slowest phase: {np.median(tightness):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
