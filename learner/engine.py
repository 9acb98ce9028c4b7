"""The trainable policy inside a DeepSpeed engine: ranks, precision, the LoRA model, the config.

Every learner process (the SFT cold start and each GRPO rank) goes through :func:`setup_rank`,
loads Qwen3-VL with a LoRA adapter (:func:`load_lora_policy`) and wraps it in an engine
(:func:`build_engine`) with AdamW, the ZeRO stage asked and warmup + cosine learning rates.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from common.config import LoraSettings
from common.services import free_port


def resolve_precision(precision: str) -> str:
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    return precision


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits among the learner's data-parallel ranks."""

    rank: int
    world: int


def setup_rank(
    rank: int | None = None,
    world: int | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
) -> RankInfo:
    """The rank set-up every learner process goes through before ``deepspeed.initialize``,
    shared by the SFT cold start and the GRPO learner group.

    Given a rank (a Ray learner actor), it writes the variables torchrun would set; without one
    it reads those torchrun (or the deepspeed launcher) did set; with neither, it makes this
    process rank 0 of 1 on a free loopback port (DeepSpeed otherwise looks for MPI). Each Ray
    actor sees only its own GPU, as device 0, hence LOCAL_RANK 0.
    """
    if rank is not None:
        if world is None or master_addr is None or master_port is None:
            raise ValueError("a rank needs its world size, master address and master port")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world}")
        os.environ.update(
            RANK=str(rank),
            LOCAL_RANK="0",
            WORLD_SIZE=str(world),
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
        )
    elif "RANK" not in os.environ:
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),
        )
    return RankInfo(int(os.environ["RANK"]), int(os.environ.get("WORLD_SIZE", 1)))


def world_size() -> int:
    """The learner's data-parallel world: WORLD_SIZE as :func:`setup_rank` left it (1 unset)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def load_lora_policy(
    model_path: Path,
    lora: LoraSettings,
    precision: str,
    gradient_checkpointing: bool,
    merge: Path | None = None,
    init_adapter: Path | None = None,
):
    """The base Qwen3-VL (with the adapter ``merge`` folded into its weights, if given) and a
    trainable LoRA adapter on top: a fresh one, or ``init_adapter`` loaded to train on (its
    rank and layers, not ``lora``'s); everything but the adapter frozen."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    processor = AutoProcessor.from_pretrained(model_path)
    model = Qwen3VLForConditionalGeneration.from_pretrained(model_path, dtype=dtype)
    if merge is not None:
        model = PeftModel.from_pretrained(model, str(merge)).merge_and_unload()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # frozen embeddings: let checkpoints see a grad input
    if init_adapter is not None:
        return PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True), processor
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
    )
    return get_peft_model(model, config), processor


def lr_factor(step: int, total_steps: int, warmup_ratio: float) -> float:
    """Linear warmup then cosine decay to 0, as a factor of the peak lr, for optimizer step
    ``step`` (0-based). The first step already moves (factor 1 / (W + 1), not 0)."""
    warmup = int(round(warmup_ratio * total_steps))
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def deepspeed_config(
    lr: float,
    weight_decay: float,
    grad_clip: float,
    zero_stage: int,
    precision: str,
    accumulation: int,
) -> dict:
    """AdamW, micro-batch 1 with ``accumulation`` micro-batches per step, the ZeRO stage asked."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": lr,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                "weight_decay": weight_decay,
                # torch's AdamW: no JIT-built fused kernel needed (CPU or GPU).
                "torch_adam": True,
            },
        },
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def forget_destroyed_groups() -> None:
    """DeepSpeed caches its process groups; when another part of the process tears the torch
    world down (vLLM's in-process engine does on shutdown), the next DeepSpeed engine would
    reuse the dead groups and fail with "Group ... is not registered". Drop them first. A
    process that is a world of its own also takes a fresh rendezvous port: the torn-down
    world's store may still hold the old one (EADDRINUSE)."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    if dist.is_initialized():
        return
    if hasattr(groups, "_release_process_group_references"):
        groups._release_process_group_references(None)
    if world_size() == 1:
        os.environ["MASTER_PORT"] = str(free_port(os.environ.get("MASTER_ADDR", "127.0.0.1")))


def build_engine(model, ds_config: dict, total_steps: int, warmup_ratio: float):
    """A DeepSpeed engine over the trainable (LoRA) parameters, with the warmup + cosine
    schedule (DeepSpeed's own WarmupCosineLR gives the first step a learning rate of 0)."""
    import deepspeed
    from torch.optim.lr_scheduler import LambdaLR

    setup_rank()
    forget_destroyed_groups()
    trainable = [p for p in model.parameters() if p.requires_grad]

    def schedule(optimizer):
        return LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup_ratio))

    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=trainable, config=ds_config, lr_scheduler=schedule
    )
    return engine


def adapter_grad_norm(engine) -> float:
    """L2 norm of the accumulated adapter gradients (before clipping), under any ZeRO stage."""
    from deepspeed.utils import safe_get_full_grad

    total = 0.0
    for param in engine.module.parameters():
        if param.requires_grad:
            grad = safe_get_full_grad(param)
            if grad is not None:
                total += float(grad.float().pow(2).sum())
    return total**0.5
