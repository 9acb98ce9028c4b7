"""Rollout throughput: vLLM against transformers on the same tiny Qwen3-VL and prompts, the
latency of a live weight update, and the push of a rank-128 adapter at Qwen3-VL-4B's layer
shapes, through a folder and in memory. Run from the repository root:

    python -m bench.rollout [--prompts 4] [--slices 16] [--slice-size 128] [--max-tokens 64]
    python -m bench.rollout --push-only  # the adapter push alone (about a minute)

The push is timed from the learner's adapter tensors to the tensors vLLM builds its LoRA model
from, in another Ray actor on this node, through Ray's object store, on the CPU, with synthetic
bf16 weights (no 4B checkpoint needed). Before: the learner writes the adapter folder, reads it
as bytes for the object store, and the rollout actor writes them to its scratch folder, from
which vLLM reads the safetensors. After: the tensors and config go through the object store and
become the one buffer that crosses into vLLM's worker (:meth:`VLLMEngine._use_adapter_tensors`).
Not timed: the engine core's copy of that buffer over its socket when vLLM runs it in its own
process (the folder push sends a path instead), and vLLM building its LoRA model (the same in
both).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common.cli import ArgumentParser, command

# Qwen3-VL-4B's language model: 36 layers, hidden 2560, MLP 9728, 32 query heads and 8 key/value
# heads of 128; LoRA on every projection (lora.target_modules), rank 128 (paper).
QWEN3_VL_4B_LAYERS = 36
QWEN3_VL_4B_PROJECTIONS = {  # name: (in_features, out_features)
    "self_attn.q_proj": (2560, 32 * 128),
    "self_attn.k_proj": (2560, 8 * 128),
    "self_attn.v_proj": (2560, 8 * 128),
    "self_attn.o_proj": (32 * 128, 2560),
    "mlp.gate_proj": (2560, 9728),
    "mlp.up_proj": (2560, 9728),
    "mlp.down_proj": (9728, 2560),
}


def qwen3_vl_4b_adapter(rank: int = 128):
    """A LoRA adapter at Qwen3-VL-4B's shapes, random bf16 weights, by peft's saved names."""
    import torch

    from rollout.records import AdapterTensors

    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(QWEN3_VL_4B_LAYERS):
        for name, (n_in, n_out) in QWEN3_VL_4B_PROJECTIONS.items():
            prefix = f"base_model.model.model.language_model.layers.{layer}.{name}"
            for part, shape in (("lora_A", (rank, n_in)), ("lora_B", (n_out, rank))):
                weight = torch.randn(shape, generator=generator) * 0.01
                tensors[f"{prefix}.{part}.weight"] = weight.to(torch.bfloat16)
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|"
        r"down_proj)",
    }
    return AdapterTensors(config, tensors)


class PushLearner:
    """Learner rank 0's side of a push: its adapter, handed out as the update a push sends."""

    def __init__(self, rank: int, scratch: str):
        self.adapter = qwen3_vl_4b_adapter(rank)
        self.scratch = Path(scratch)

    def nbytes(self) -> int:
        return self.adapter.nbytes

    def update(self, in_memory: bool):
        import shutil

        from rollout.records import FolderBytes, WeightUpdate

        if in_memory:
            return WeightUpdate(1, adapter_tensors=self.adapter)
        folder = self.adapter.write(self.scratch / "learner" / "adapter-v1")
        files = FolderBytes.read(folder)
        shutil.rmtree(folder)
        return WeightUpdate(1, adapter=files)


class PushReceiver:
    """A rollout actor's side: what it does with the update until vLLM has the tensors."""

    def __init__(self, scratch: str):
        self.scratch = Path(scratch)

    def take(self, update) -> int:
        import json
        import shutil

        from safetensors import safe_open

        from rollout.vllm_engine import pack_tensors, unpack_tensors

        if update.adapter_tensors is not None:  # VLLMEngine._use_adapter_tensors, then its worker
            tensors = unpack_tensors(*pack_tensors(update.adapter_tensors.tensors))
        else:  # RolloutWorker.update_weights, then vLLM's folder loader
            folder = update.adapter.write(self.scratch / "actor" / "adapter-v1")
            json.loads((folder / "adapter_config.json").read_text())
            with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            shutil.rmtree(folder)
        return len(tensors)


def push_times(rank: int = 128, repeats: int = 3) -> tuple[int, float, float]:
    """(adapter bytes, median seconds of a folder push, of an in-memory push), between two Ray
    actors of this node."""
    import statistics
    import tempfile

    import ray

    started = ray.is_initialized()
    if not started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            learner = ray.remote(PushLearner).remote(rank, scratch)
            receiver = ray.remote(PushReceiver).remote(scratch)
            nbytes = ray.get(learner.nbytes.remote())
            times = {}
            for in_memory in (False, True):
                ray.get(receiver.take.remote(learner.update.remote(in_memory)))  # warm-up
                runs = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    ray.get(receiver.take.remote(learner.update.remote(in_memory)))
                    runs.append(time.perf_counter() - start)
                times[in_memory] = statistics.median(runs)
            ray.kill(learner)
            ray.kill(receiver)
    finally:
        if not started:
            ray.shutdown()
    return nbytes, times[False], times[True]


def print_push_times(rank: int = 128) -> None:
    nbytes, folder_s, memory_s = push_times(rank)
    print(
        f"LoRA push, rank {rank} at Qwen3-VL-4B's shapes ({QWEN3_VL_4B_LAYERS} layers x "
        f"{len(QWEN3_VL_4B_PROJECTIONS)} projections, bf16, {nbytes / 1e6:.0f} MB), learner "
        "actor -> object store -> rollout actor, CPU, median of 3:"
    )
    print(f"  folder (write, bytes, object store, write, read): {folder_s:6.2f} s")
    print(f"  in memory (tensors, object store, one buffer):    {memory_s:6.2f} s")
    print(f"folder / in-memory: {folder_s / memory_s:.2f}x")


@command()
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m bench.rollout", description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=4, help="prompts per generate call")
    parser.add_argument("--slices", type=int, default=16, help="slices per prompt")
    parser.add_argument("--slice-size", type=int, default=128, help="side of a slice in px")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens at most")
    parser.add_argument(
        "--push-only", action="store_true", help="time the rank-128 adapter push alone"
    )
    args = parser.parse_args(argv)
    if args.push_only:
        print_push_times()
        return 0
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
            max_tokens=args.max_tokens,
            in_process=True,
            max_model_len=8192,
            max_lora_rank=128,
            slice_size=args.slice_size,
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
    print_push_times()
    return 0


if __name__ == "__main__":
    sys.exit(main())
