"""Learner step time and memory on the tiny Qwen3-VL. Run from the repository root:

    python -m bench.learner                 # checkpointing on/off, ZeRO-2 vs ZeRO-0, peak memory
    python -m bench.learner --shape paper [--tokens 256] [--repeats 3]
                                            # the learner phase, per-completion vs grouped pass

``--shape paper`` times one GRPO learner step (reference pass, policy pass, backward, update) at
the paper's prompt shape, 64 slices of 256 px (4,096 image tokens), G = 4 completions of 256
tokens, LoRA r = 128, ZeRO-0, fp32, checkpointing on: the per-completion pass (prompt +
completion for every completion, twice with the reference) against the grouped pass (vision
tower once, prompt once per group). The two sides alternate, each timed ``--repeats`` times
after a warm-up; it ends with the median ratio, its spread, and ``speed-up: N.NNx``.
``--shape tiny`` does the same at 16 slices of 128 px. Without ``--shape``, the peak memory of a
step is measured in fresh processes of this command (``--peak-memory MODEL --checkpointing
on|off``), since a process's peak only grows.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common.cli import ArgumentParser, command


def build_batch(slices: int, size: int, tokens: int, seed: int = 0):
    from data.prompts import build_messages
    from learner.grpo_learner import GRPOExample

    rng = np.random.default_rng(seed)
    volume = (rng.random((slices, size, size)) * 255).astype(np.uint8)
    messages = build_messages(volume, "Find the organ that secretes bile.")
    return [
        GRPOExample(
            messages, tuple(int(t) for t in rng.integers(20, 900, tokens)), (-7.0,) * tokens, a
        )
        for a in (1.0, -1.0, 0.5, -0.5)
    ]


def peak_memory(model: str, checkpointing: bool) -> dict:
    """In this process: RSS before and peak RSS during one GRPO step at the paper's shape."""
    import resource

    from common.config import GRPOConfig, LoraSettings
    from learner.grpo_learner import GRPOLearner

    batch = build_batch(64, 256, 64)
    cfg = GRPOConfig(
        zero_stage=0,
        gradient_checkpointing=checkpointing,
        precision="fp32",
        lora=LoraSettings(rank=128, alpha=256),
    )
    learner = GRPOLearner(Path(model), cfg, group_size=4, total_steps=10)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    learner.step(batch)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"step_mb": (peak - before) / 1024, "seconds": seconds}


def compare_passes(model: Path, slices: int, size: int, tokens: int, repeats: int) -> None:
    """Per-completion against grouped learner steps on the same batch, interleaved."""
    from common.config import GRPOConfig, LoraSettings
    from learner.grpo_learner import GRPOLearner

    batch = build_batch(slices, size, tokens)
    learners = {}
    for learner_pass in ("per_completion", "grouped"):
        cfg = GRPOConfig(
            zero_stage=0,
            gradient_checkpointing=True,
            precision="fp32",
            learner_pass=learner_pass,
            lora=LoraSettings(rank=128, alpha=256),
        )
        learners[learner_pass] = GRPOLearner(model, cfg, group_size=4, total_steps=100)
        learners[learner_pass].step(batch)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in learners}
    for _ in range(repeats):
        for name, lrn in learners.items():
            start = time.perf_counter()
            lrn.step(batch)
            times[name].append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(times["per_completion"], times["grouped"])]
    print(
        f"GRPO learner step: {slices} slices of {size} px ({slices * (size // 32) ** 2} image "
        f"tokens), G = 4 x {tokens} tokens, LoRA r=128, ZeRO-0, fp32, checkpointing on, "
        f"{repeats} interleaved repeats"
    )
    for name, values in times.items():
        print(
            f"  {name:15s} median {np.median(values):7.2f} s/step "
            f"(min {min(values):.2f}, max {max(values):.2f})"
        )
    print(
        f"per-completion / grouped: median {np.median(ratios):.2f}x, "
        f"spread {min(ratios):.2f}x-{max(ratios):.2f}x"
    )
    print(f"speed-up: {np.median(ratios):.2f}x")


def parse_args(argv: list[str] | None):
    parser = ArgumentParser(prog="python -m bench.learner", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--shape",
        choices=("paper", "tiny"),
        help="time the per-completion against the grouped pass at this prompt shape",
    )
    parser.add_argument(
        "--tokens", type=int, default=256, help="tokens per completion (with --shape)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per side")
    parser.add_argument(
        "--peak-memory",
        type=Path,
        metavar="MODEL",
        help="one step's peak memory on MODEL, as JSON (the command runs itself with it)",
    )
    parser.add_argument(
        "--checkpointing", choices=("on", "off"), default="on", help="with --peak-memory"
    )
    return parser.parse_args(argv)


@command()
def main(argv: list[str] | None = None) -> int:
    from common.runtime import set_default_environment

    set_default_environment()
    args = parse_args(argv)
    if args.peak_memory is not None:
        print(json.dumps(peak_memory(str(args.peak_memory), args.checkpointing == "on")))
        return 0
    from rollout.tiny_model import build_tiny_qwen3vl

    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_qwen3vl(Path(tmp) / "tiny", "test")
        if args.shape is not None:
            slices, size = (64, 256) if args.shape == "paper" else (16, 128)
            compare_passes(model, slices, size, args.tokens, args.repeats)
        else:
            compare_settings(model)
            compare_peak_memory(model)
    return 0


def compare_settings(model: Path) -> None:
    """Step time with ZeRO-0 and ZeRO-2, gradient checkpointing off and on, at 16 x 128 px."""
    from common.config import GRPOConfig, LoraSettings
    from learner.grpo_learner import GRPOLearner

    batch = build_batch(16, 128, 64)
    tokens = sum(len(ex.completion_ids) for ex in batch)
    rows = []
    for zero, checkpointing in ((0, False), (0, True), (2, False), (2, True)):
        cfg = GRPOConfig(
            zero_stage=zero,
            gradient_checkpointing=checkpointing,
            precision="fp32",
            lora=LoraSettings(rank=128, alpha=256),
        )
        learner = GRPOLearner(model, cfg, group_size=4, total_steps=10)
        learner.step(batch)  # warm-up
        times = []
        for _ in range(3):
            start = time.perf_counter()
            learner.step(batch)
            times.append(time.perf_counter() - start)
        rows.append((zero, checkpointing, float(np.median(times))))
        del learner
    print(
        "GRPO step, tiny Qwen3-VL + LoRA rank 128, 4 completions x 64 tokens, "
        f"16 slices of 128 px ({16 * 16} image tokens)"
    )
    base = rows[0][2]
    for zero, checkpointing, seconds in rows:
        print(
            f"  ZeRO-{zero}  checkpointing={'on ' if checkpointing else 'off'}  "
            f"{seconds:.3f} s/step  {tokens / seconds:7.1f} completion tokens/s  "
            f"({seconds / base:.2f}x of ZeRO-0 without checkpointing)"
        )


def compare_peak_memory(model: Path) -> None:
    """Peak memory of a step at the paper's shape, checkpointing off and on, each in a fresh
    process of this command (a process's peak RSS only grows)."""
    peaks = {}
    for setting in ("off", "on"):
        out = subprocess.run(
            [sys.executable, "-m", "bench.learner", "--peak-memory", str(model)]
            + ["--checkpointing", setting],
            capture_output=True,
            text=True,
            check=True,
        )
        peaks[setting] = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        "GRPO step at the paper's shape: 64 slices of 256 px (4,096 image tokens), "
        "G = 4 x 64 tokens, ZeRO-0, fp32"
    )
    for setting in ("off", "on"):
        print(
            f"  checkpointing={setting:3s}  peak memory of the step "
            f"{peaks[setting]['step_mb']:8.1f} MB  {peaks[setting]['seconds']:.2f} s"
        )
    print(
        "checkpointing off / on, peak step memory: "
        f"{peaks['off']['step_mb'] / max(peaks['on']['step_mb'], 1e-9):.2f}x"
    )


if __name__ == "__main__":
    sys.exit(main())
