"""The trainable policy: Qwen3-VL + peft LoRA inside a DeepSpeed engine, and its token logprobs.

Each training sequence is one prompt (chat messages with slice images) followed by one
completion; the loss looks only at the completion tokens (prompt and image tokens are masked).
At the paper's shape the prompt is ~95% of the tokens (4,096 image tokens of ~4,800) and G = 4
completions share it, so GRPO runs a group as one packed sequence (:func:`pack_group`): the
prompt once, then the G completions, each attending to the prompt and to itself only, with the
positions each would have after the prompt alone. Every completion then sees exactly what it
would see in its own sequence, the prompt's activations are computed once, and the gradient
through them is the sum over the completions. The frozen vision tower runs once per prompt
(:func:`vision_features`) and its output is reused by every pass of a step. DeepSpeed
accumulates gradients over the groups of a batch.

GRPO starts from the SFT policy and regularises toward it: the SFT adapter is merged into the
base weights and a fresh adapter is trained on top, so the model with its adapter disabled *is*
the SFT policy (pi_ref) and no second copy is kept. The rollout engines serve the same merged
weights (written once as a checkpoint folder) plus the GRPO adapter; the adapter a run finally
exports stacks both (rank r_sft + r_grpo) on the original base, loadable wherever the SFT
adapter is.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from common.config import LoraSettings
from common.services import free_port
from learner.training_frame import TrainingFrame
from rollout.hf_engine import checkpoint_dtype

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


def qwen_model(model):
    """The ``Qwen3VLModel`` inside a DeepSpeed engine, a peft model or the bare model."""
    model = getattr(model, "module", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model.model


def vision_features(model, prompt: dict, device) -> dict | None:
    """The vision tower's output for a prompt's images, without grad, in the form the model
    takes back as ``mm_encoder_outputs`` (so it runs once per prompt, not once per pass)."""
    if "pixel_values" not in prompt:
        return None
    with torch.no_grad():
        out = qwen_model(model).get_image_features(
            prompt["pixel_values"].to(device),
            prompt["image_grid_thw"].to(device),
            return_dict=True,
        )
    return {"image": out}


@dataclass(frozen=True)
class PackedGroup:
    """A prompt and G completions as one sequence: prompt, c_1, ..., c_G.

    ``keep`` are the positions whose logits are needed (the prompt's last position, which
    predicts every completion's first token, then each completion's positions but its last);
    ``rows[i]`` indexes completion i's logits among them, in token order.
    """

    inputs: dict  # input_ids, a 4D attention mask, 3D (M-RoPE) position_ids, image inputs
    keep: torch.Tensor  # (K,)
    rows: tuple[torch.Tensor, ...]  # (T_i,) each
    completion_ids: tuple[torch.Tensor, ...]  # (T_i,) each


def pack_group(model, prompt: dict, completions: list[list[int]]) -> PackedGroup:
    """One sequence holding ``prompt`` once and every completion after it (module docstring).

    Completion i attends to the whole prompt and causally to its own tokens, never to another
    completion, and its tokens get the positions they would have right after the prompt (text
    positions continue at the prompt's largest M-RoPE position + 1 on all three axes, as Qwen3-VL
    numbers text that follows images).
    """
    if not completions or any(len(c) == 0 for c in completions):
        raise ValueError("every completion of a group needs at least one token")
    qwen = qwen_model(model)
    ids = prompt["input_ids"]
    n = ids.shape[1]
    kwargs = {}
    if "image_grid_thw" in prompt:
        kwargs["image_grid_thw"] = prompt["image_grid_thw"]
    token_types = prompt.get("mm_token_type_ids", torch.zeros_like(ids))
    prompt_positions, _ = qwen.get_rope_index(
        ids, token_types, attention_mask=prompt.get("attention_mask"), **kwargs
    )
    first = int(prompt_positions.max()) + 1
    lengths = [len(c) for c in completions]
    total = n + sum(lengths)
    allowed = torch.zeros(total, total, dtype=torch.bool)
    allowed[:n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
    positions = [prompt_positions]
    keep = [n - 1]
    rows = []
    start = n
    for length in lengths:
        end = start + length
        allowed[start:end, :n] = True
        allowed[start:end, start:end] = torch.ones(length, length, dtype=torch.bool).tril()
        text = torch.arange(first, first + length).view(1, 1, -1).expand(3, 1, -1)
        positions.append(text)
        # Logits of token t come from position t - 1: the prompt's last for t = 0.
        row = [0] + list(range(len(keep), len(keep) + length - 1))
        keep.extend(range(start, end - 1))
        rows.append(torch.tensor(row, dtype=torch.long))
        start = end
    attention_impl = getattr(qwen.config, "_attn_implementation", "sdpa")
    mask = allowed[None, None]
    if attention_impl == "eager":  # eager attention adds its mask; sdpa takes a boolean one
        dtype = qwen.get_input_embeddings().weight.dtype
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    completion_tensors = tuple(torch.tensor(list(c), dtype=torch.long) for c in completions)
    inputs = {
        "input_ids": torch.cat([ids, *(c[None] for c in completion_tensors)], dim=1),
        "attention_mask": mask,
        "position_ids": torch.cat(positions, dim=2),
    }
    for key in ("pixel_values", "image_grid_thw"):
        if key in prompt:
            inputs[key] = prompt[key]
    return PackedGroup(
        inputs, torch.tensor(keep, dtype=torch.long), tuple(rows), completion_tensors
    )


def group_completion_logits(
    model, packed: PackedGroup, device, vision: dict | None = None
) -> list[torch.Tensor]:
    """Logits predicting each completion's tokens, one (T_i, V) tensor per completion, from one
    pass over the packed group; ``vision`` (from :func:`vision_features`) replaces the pixels."""
    inputs = {k: v.to(device) for k, v in packed.inputs.items()}
    if vision is not None:
        inputs.pop("pixel_values", None)
        inputs["mm_encoder_outputs"] = vision
    logits = model(**inputs, use_cache=False, logits_to_keep=packed.keep.to(device)).logits[0]
    return [logits[rows.to(logits.device)] for rows in packed.rows]


def packing_supported(model) -> bool:
    """Whether the model's attention takes the packed group's 4D mask (eager and sdpa do; flash
    attention kernels take no arbitrary mask)."""
    impl = getattr(qwen_model(model).config, "_attn_implementation", "sdpa")
    return impl in ("eager", "sdpa")


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log pi(o_t | prefix) for each completion token: (T, V), (T,) -> (T,)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(1, ids[:, None].to(logits.device))[:, 0]


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


def save_adapter(
    engine, processor, out_dir: Path, write: bool = True, *, frame: TrainingFrame | None
) -> Path:
    """A peft adapter folder (plus the processor) loadable by PeftModel and the rollout engines,
    with ``frame`` as its medvol.json (None: an adapter that is not served on the base alone).

    Written to a temporary folder and renamed, so readers never see half an adapter. Every
    process calls it (ZeRO-3 gathers the adapter collectively); only ``write`` ones write.
    """
    state = lora_state(engine)
    if not write:
        return Path(out_dir)

    def write_to(tmp: Path) -> None:
        engine.module.save_pretrained(str(tmp), state_dict=state, save_embedding_layers=False)
        processor.save_pretrained(str(tmp))
        if frame is not None:
            frame.write(tmp)

    return _write_folder(out_dir, write_to)


def _write_folder(out_dir: Path, write) -> Path:
    """Run ``write(tmp)`` into a temporary sibling folder, then rename it to ``out_dir``."""
    import shutil

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def _merged_model(engine, base_path: Path):
    from peft import PeftModel, set_peft_model_state_dict
    from transformers import Qwen3VLForConditionalGeneration

    state = lora_state(engine)
    base = Qwen3VLForConditionalGeneration.from_pretrained(base_path, dtype=torch.float32)
    peft_model = PeftModel(base, engine.module.peft_config["default"])
    set_peft_model_state_dict(peft_model, state)
    return peft_model.merge_and_unload().to(checkpoint_dtype(base_path))


def merged_state(engine, base_path: Path) -> dict[str, torch.Tensor]:
    """Full weights with the adapter folded in (merged in fp32, in the dtype ``base_path``
    stores), by checkpoint name: what a full push sends."""
    return {k: v.detach() for k, v in _merged_model(engine, base_path).state_dict().items()}


def save_merged(engine, processor, base_path: Path, out_dir: Path) -> Path:
    """Full weights with the adapter folded in, as an HF checkpoint folder (for full pushes)."""

    def write(tmp: Path) -> None:
        _merged_model(engine, base_path).save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))

    return _write_folder(out_dir, write)


class AdapterStackError(ValueError):
    """Two adapters that cannot be stacked into one; names the adapter and the field."""


def _adapter_files(folder: Path) -> tuple[dict, dict]:
    import json

    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    return config, load_file(str(folder / "adapter_model.safetensors"))


def stack_adapters(first: tuple[dict, dict], second: tuple[dict, dict]) -> tuple[dict, dict]:
    """One LoRA adapter equal to applying ``first`` then ``second`` on the same base.

    Each is (adapter_config, state dict with peft's saved keys). LoRA adds
    delta W = (alpha / r) B A per module, and the deltas of two adapters add up, so the stacked
    adapter has rank r1 + r2, A = [A1; A2], B = [s1 B1, s2 B2] and alpha = r1 + r2 (scale 1):
    exactly the sum. A module that only one adapter touches gets zeros for the other half.
    """
    (c1, w1), (c2, w2) = first, second
    for c, which in ((c1, "first"), (c2, "second")):
        for key in ("rank_pattern", "alpha_pattern"):
            if c.get(key):
                raise AdapterStackError(
                    f"{which} adapter: {key} is set; only one rank is supported"
                )
        if c.get("use_rslora") or c.get("use_dora"):
            raise AdapterStackError(f"{which} adapter: rsLoRA/DoRA adapters cannot be stacked")
    r1, r2 = int(c1["r"]), int(c2["r"])
    s1, s2 = c1["lora_alpha"] / r1, c2["lora_alpha"] / r2
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in (*w1, *w2) if ".lora_" in k})
    state = {}
    for module in modules:
        a1, b1 = w1.get(f"{module}.lora_A.weight"), w1.get(f"{module}.lora_B.weight")
        a2, b2 = w2.get(f"{module}.lora_A.weight"), w2.get(f"{module}.lora_B.weight")
        like_a, like_b = (a1, b1) if a1 is not None else (a2, b2)
        if a1 is None:
            a1, b1 = like_a.new_zeros(r1, like_a.shape[1]), like_b.new_zeros(like_b.shape[0], r1)
        if a2 is None:
            a2, b2 = like_a.new_zeros(r2, like_a.shape[1]), like_b.new_zeros(like_b.shape[0], r2)
        state[f"{module}.lora_A.weight"] = torch.cat([a1.float(), a2.float()], dim=0)
        state[f"{module}.lora_B.weight"] = torch.cat([s1 * b1.float(), s2 * b2.float()], dim=1)
    targets = []
    for c in (c1, c2):
        t = c["target_modules"]
        targets.append(t if isinstance(t, str) else "|".join(f".*\\.{m}" for m in t))
    config = dict(c1)
    config.update(
        r=r1 + r2,
        lora_alpha=r1 + r2,
        target_modules=targets[0] if targets[0] == targets[1] else f"({targets[0]})|({targets[1]})",
    )
    return config, state


def save_stacked_adapter(
    engine, processor, first_adapter: Path, out_dir: Path, *, frame: TrainingFrame | None
) -> Path:
    """The adapter folder of ``first_adapter`` (the SFT adapter merged under this run) stacked
    with this engine's adapter: one adapter on the original base (see :func:`stack_adapters`),
    with ``frame`` as its medvol.json."""
    import json

    from safetensors.torch import save_file

    module = engine.module
    config = module.peft_config["default"].to_dict()
    config = json.loads(
        json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v))
    )
    mine = {k: v for k, v in lora_state(engine).items()}
    stacked_config, stacked = stack_adapters(_adapter_files(first_adapter), (config, mine))

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        save_file(
            {k: v.contiguous() for k, v in stacked.items()}, str(tmp / "adapter_model.safetensors")
        )
        (tmp / "adapter_config.json").write_text(json.dumps(stacked_config, indent=2))
        processor.save_pretrained(str(tmp))
        if frame is not None:
            frame.write(tmp)

    return _write_folder(out_dir, write)


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
