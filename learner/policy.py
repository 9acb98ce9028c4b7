"""The trainable policy: Qwen3-VL + peft LoRA inside a DeepSpeed engine, and its token logprobs.

Each training sequence is one prompt (chat messages with slice images) followed by one
completion; the loss looks only at the completion tokens (prompt and image tokens are masked).
Sequences go through the model one at a time (micro-batch 1, as Qwen3-VL's multimodal positions
make padding images awkward) and DeepSpeed accumulates gradients over a batch.
The reference policy pi_ref is the same model with its adapter disabled: no second copy.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from learner.config import LoraSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedSequence:
    """Model inputs for prompt + completion, and where the completion starts."""

    inputs: dict  # input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids
    prompt_len: int
    completion_ids: torch.Tensor  # (T,)


def encode_prompt(processor, messages: list[dict]) -> dict:
    """Model inputs of a prompt, tokenised exactly as the rollout engines tokenise it."""
    from rollout.prompting import prompt_images

    images = prompt_images(messages)
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return dict(processor(text=[text], images=images or None, return_tensors="pt"))


def with_completion(prompt: dict, completion_ids: list[int]) -> EncodedSequence:
    """An encoded prompt followed by completion token ids."""
    completion = torch.tensor([list(completion_ids)], dtype=torch.long)
    inputs = dict(prompt)
    inputs["input_ids"] = torch.cat([prompt["input_ids"], completion], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if "mm_token_type_ids" in prompt:
        inputs["mm_token_type_ids"] = torch.cat(
            [prompt["mm_token_type_ids"], torch.zeros_like(completion)], dim=1
        )
    return EncodedSequence(inputs, prompt["input_ids"].shape[1], completion[0])


def encode(processor, messages: list[dict], completion_ids: list[int]) -> EncodedSequence:
    """Tokenise a prompt as the rollout engines do and append completion token ids."""
    return with_completion(encode_prompt(processor, messages), completion_ids)


def target_ids(processor, text: str) -> list[int]:
    """Token ids of an assistant answer followed by the end-of-turn token."""
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(ids) + [processor.tokenizer.convert_tokens_to_ids("<|im_end|>")]


def completion_logits(model, seq: EncodedSequence, device) -> torch.Tensor:
    """Logits predicting each completion token: (T, V)."""
    inputs = {k: v.to(device) for k, v in seq.inputs.items()}
    logits = model(**inputs, use_cache=False).logits[0]
    n = seq.prompt_len
    return logits[n - 1 : n - 1 + len(seq.completion_ids)]


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log pi(o_t | prefix) for each completion token: (T, V), (T,) -> (T,)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(1, ids[:, None].to(logits.device))[:, 0]


def resolve_precision(precision: str) -> str:
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    return precision


def init_distributed_env() -> None:
    """Let DeepSpeed start in a plain single process (no launcher): it otherwise looks for MPI."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )


def load_lora_policy(
    model_path: Path,
    lora: LoraSettings,
    precision: str,
    gradient_checkpointing: bool,
    adapter: Path | None = None,
):
    """The base Qwen3-VL with a (new, or loaded and trainable) LoRA adapter; base frozen."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    processor = AutoProcessor.from_pretrained(model_path)
    model = Qwen3VLForConditionalGeneration.from_pretrained(model_path, dtype=dtype)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # frozen embeddings: let checkpoints see a grad input
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    else:
        config = LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
        )
        model = get_peft_model(model, config)
    return model, processor


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


def build_engine(model, ds_config: dict, total_steps: int, warmup_ratio: float):
    """A DeepSpeed engine over the trainable (LoRA) parameters, with the warmup + cosine
    schedule (DeepSpeed's own WarmupCosineLR gives the first step a learning rate of 0)."""
    import deepspeed
    from torch.optim.lr_scheduler import LambdaLR

    init_distributed_env()
    trainable = [p for p in model.parameters() if p.requires_grad]

    def schedule(optimizer):
        return LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup_ratio))

    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=trainable, config=ds_config, lr_scheduler=schedule
    )
    return engine


def lora_state(engine) -> dict:
    """The adapter's weights, gathered from ZeRO-3 partitions when needed. Only LoRA weights:
    a LoRA on lm_head does not drag the full base head into every pushed adapter."""
    from peft import get_peft_model_state_dict

    module = engine.module

    def collect() -> dict:
        state = get_peft_model_state_dict(module, save_embedding_layers=False)
        return {k: v.detach().cpu().clone() for k, v in state.items()}

    if engine.zero_optimization_stage() == 3:
        import deepspeed

        params = [p for n, p in module.named_parameters() if "lora_" in n]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return collect()
    return collect()


def save_adapter(engine, processor, out_dir: Path, write: bool = True) -> Path:
    """A peft adapter folder (plus the processor) loadable by PeftModel and the rollout engines.

    Written to a temporary folder and renamed, so readers never see half an adapter. Every
    process calls it (ZeRO-3 gathers the adapter collectively); only ``write`` ones write.
    """
    import shutil

    out_dir = Path(out_dir)
    state = lora_state(engine)
    if not write:
        return out_dir
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    engine.module.save_pretrained(str(tmp), state_dict=state, save_embedding_layers=False)
    processor.save_pretrained(str(tmp))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def save_merged(engine, processor, base_path: Path, out_dir: Path) -> Path:
    """Full weights with the adapter folded in, as an HF checkpoint folder (for full pushes)."""
    import shutil

    from peft import PeftModel, set_peft_model_state_dict
    from transformers import Qwen3VLForConditionalGeneration

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    base = Qwen3VLForConditionalGeneration.from_pretrained(base_path, dtype=torch.float32)
    peft_model = PeftModel(base, engine.module.peft_config["default"])
    set_peft_model_state_dict(peft_model, lora_state(engine))
    peft_model.merge_and_unload().save_pretrained(str(tmp))
    processor.save_pretrained(str(tmp))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


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
