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
    slice_size: int | None = None,
):
    """The base Qwen3-VL (with the adapter ``merge`` folded into its weights, if given) and a
    trainable LoRA adapter on top: a fresh one, or ``init_adapter`` loaded to train on (its
    rank and layers, not ``lora``'s); everything but the adapter frozen. The processor pins
    images to ``slice_size``^2 pixels, as the rollout engines' do (None: the checkpoint's)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import Qwen3VLForConditionalGeneration

    from rollout.prompting import load_processor

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    processor = load_processor(model_path, slice_size)
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
    """AdamW, micro-batch 1 with ``accumulation`` micro-batches per step, the ZeRO stage asked.

    Under bf16 the gradients are all-reduced in fp32 (DeepSpeed's default is the model's dtype,
    and a bf16 sum over ranks loses the small gradients of a long accumulation), and from ZeRO
    stage 1 up they are accumulated over the micro-batches in fp32 too (stage 1 then runs
    DeepSpeed's BF16_Optimizer, stages 2 and 3 keep an fp32 accumulation buffer). Stage 0 under
    bf16 still accumulates in the parameters' bf16 ``.grad``: DeepSpeed 0.19 takes no fp32
    accumulation without ZeRO (it raises NotImplementedError for that mix); use stage >= 1.
    """
    config = {
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
    if precision == "bf16":
        config["communication_data_type"] = "fp32"
        if zero_stage >= 1:
            config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


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


def skip_update(engine) -> None:
    """End the batch at its accumulation boundary without changing the adapter, its optimizer
    state or the learning-rate schedule (for a batch whose loss or gradient is not finite).

    Call it in place of the batch's last ``engine.step()``. DeepSpeed's own boundary step runs,
    so every gradient buffer (parameters' ``.grad``, ZeRO's partitions, BF16_Optimizer's fp32
    accumulators) is cleared as after an update, ZeRO's collectives run on every rank as usual,
    and its counters move as for a step it skips itself on overflow (``micro_steps``,
    ``global_steps``, ``skipped_steps``); but the torch optimizer underneath applies nothing (no
    AdamW moments, no weight decay), ZeRO's copy of the fp32 master weights back into the model
    copies unchanged values, and the schedule is held back.
    """
    optimizer = engine.basic_optimizer  # the torch AdamW every DeepSpeed wrapper steps last
    schedule, step = engine.lr_scheduler, optimizer.step  # (the scheduler's wrapper of step)
    skipped = engine.skipped_steps
    optimizer.step = lambda *args, **kwargs: None
    engine.lr_scheduler = None
    try:
        engine.step()
    finally:
        optimizer.step = step
        engine.lr_scheduler = schedule
    if engine.skipped_steps == skipped:  # DeepSpeed saw no overflow of its own: count it
        engine.skipped_steps += 1


def all_finite(engine, *values: float) -> bool:
    """Whether ``values`` (this rank's loss, the adapter's gradient norm) are finite on every
    data-parallel rank: the verdict on which every rank steps or skips alike, or their weights
    would part. A gradient norm taken after the batch's last backward is already the same on
    every rank (DeepSpeed all-reduces the gradient there, and a NaN or inf from any rank reaches
    all), but a loss is each rank's own, so the verdict is all-reduced (one scalar)."""
    bad = not all(math.isfinite(v) for v in values)
    if world_size() > 1:
        import torch.distributed as dist

        flag = torch.tensor([float(bad)], device=engine.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        bad = bool(flag.item())
    return not bad
