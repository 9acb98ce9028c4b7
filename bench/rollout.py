"""Rollout throughput: vLLM against transformers on the same tiny Qwen3-VL and prompts, and the
latency of a live weight update. Run from the repository root:

    python -m bench.rollout [--prompts 4] [--slices 16] [--slice-size 128] [--max-tokens 64]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common.cli import ArgumentParser, command


@command()
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m bench.rollout", description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=4, help="prompts per generate call")
    parser.add_argument("--slices", type=int, default=16, help="slices per prompt")
    parser.add_argument("--slice-size", type=int, default=128, help="side of a slice in px")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens at most")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from common.runtime import set_default_environment

    set_default_environment()
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3VLForConditionalGeneration

    from common.config import RolloutConfig
    from data.prompts import build_messages
    from rollout.hf_engine import TransformersEngine
    from rollout.records import RolloutPrompt, WeightUpdate
    from rollout.tiny_model import build_tiny_qwen3vl
    from rollout.vllm_engine import VLLMEngine

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_qwen3vl(tmp / "tiny", "test")
        rng = np.random.default_rng(0)
        prompts = [
            RolloutPrompt(
                f"p{i}",
                build_messages(
                    (rng.random((args.slices, args.slice_size, args.slice_size)) * 255).astype(
                        np.uint8
                    ),
                    "Find the organ that secretes bile.",
                ),
            )
            for i in range(args.prompts)
        ]
        cfg = RolloutConfig(
            max_tokens=args.max_tokens, in_process=True, max_model_len=8192, max_lora_rank=128
        )
        results = {}
        for name, build in (
            ("vllm", lambda: VLLMEngine(model, cfg)),
            ("transformers", lambda: TransformersEngine(model, cfg)),
        ):
            engine = build()
            engine.generate(prompts[:1], seed=0)  # warm-up
            start = time.perf_counter()
            groups = engine.generate(prompts, seed=1)
            elapsed = time.perf_counter() - start
            tokens = sum(len(c.token_ids) for g in groups for c in g.completions)
            completions = sum(len(g.completions) for g in groups)
            results[name] = (completions / elapsed, tokens / elapsed)
            if name == "vllm":
                base = Qwen3VLForConditionalGeneration.from_pretrained(model, dtype=torch.float32)
                lora = get_peft_model(base, LoraConfig(r=128, target_modules="all-linear"))
                lora.save_pretrained(tmp / "adapter")
                start = time.perf_counter()
                engine.update_weights(WeightUpdate(1, adapter_dir=tmp / "adapter"))
                engine.generate(prompts[:1], greedy=True)
                lora_s = time.perf_counter() - start
                engine._lora = None
                start = time.perf_counter()
                engine.update_weights(WeightUpdate(2, weights_dir=model))
                engine.generate(prompts[:1], greedy=True)
                full_s = time.perf_counter() - start
            del engine
        tokens_per_prompt = args.slices * (args.slice_size // 32) ** 2
        print(
            f"tiny Qwen3-VL, {args.prompts} prompts x G={cfg.group_size}, {args.slices} slices "
            f"of {args.slice_size}px ({tokens_per_prompt} image tokens each), "
            f"max {args.max_tokens} new tokens"
        )
        for name, (cps, tps) in results.items():
            print(f"  {name:12s} {cps:7.2f} completions/s  {tps:8.1f} tokens/s")
        print(
            f"  vllm / transformers: {results['vllm'][1] / results['transformers'][1]:.2f}x "
            "tokens/s"
        )
        print(
            f"  weight update + first greedy answer: LoRA (rank 128) {lora_s:.2f} s, "
            f"full weights {full_s:.2f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
