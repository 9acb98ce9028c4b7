"""Learner step time and tokens/s on the tiny Qwen3-VL: with and without gradient checkpointing,
ZeRO-2 against ZeRO-0. Run from the repository root: ``python -m bench.learner``."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    from cluster.runtime import set_default_environment

    set_default_environment()
    from data.prompts import build_messages
    from learner.config import GRPOConfig, LoraSettings
    from learner.grpo_learner import GRPOExample, GRPOLearner
    from rollout.tiny_model import build_tiny_qwen3vl

    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_qwen3vl(Path(tmp) / "tiny", "test")
        rng = np.random.default_rng(0)
        slices = (rng.random((16, 128, 128)) * 255).astype(np.uint8)
        messages = build_messages(slices, "Find the organ that secretes bile.")
        batch = [GRPOExample(messages, tuple(int(t) for t in rng.integers(20, 900, 64)),
                             (-7.0,) * 64, float(a)) for a in (1.0, -1.0, 0.5, -0.5)]
        tokens = sum(len(ex.completion_ids) for ex in batch)
        rows = []
        for zero, checkpointing in ((0, False), (0, True), (2, False), (2, True)):
            cfg = GRPOConfig(zero_stage=zero, gradient_checkpointing=checkpointing,
                             precision="fp32", lora=LoraSettings(rank=128, alpha=256))
            learner = GRPOLearner(model, cfg, group_size=4, total_steps=10)
            learner.step(batch)  # warm-up
            times = []
            for _ in range(3):
                start = time.perf_counter()
                learner.step(batch)
                times.append(time.perf_counter() - start)
            rows.append((zero, checkpointing, float(np.median(times))))
            del learner
        print(f"GRPO step, tiny Qwen3-VL + LoRA rank 128, 4 completions x 64 tokens, "
              f"16 slices of 128 px ({16 * 16} image tokens)")
        base = rows[0][2]
        for zero, checkpointing, seconds in rows:
            print(f"  ZeRO-{zero}  checkpointing={'on ' if checkpointing else 'off'}  "
                  f"{seconds:.3f} s/step  {tokens / seconds:7.1f} completion tokens/s  "
                  f"({seconds / base:.2f}x of ZeRO-0 without checkpointing)")


if __name__ == "__main__":
    main()
