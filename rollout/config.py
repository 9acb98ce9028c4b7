"""Settings of the policy checkpoint and of rollout (sampling G completions per prompt)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class ModelConfig:
    path: Path | None = None  # HF checkpoint folder (Qwen3-VL); None = build the tiny one here
    tiny_size: str = "test"  # tiny Qwen3-VL built when path is None: test | medium | small
    dtype: str = "auto"  # "auto": bfloat16 on GPU, float32 on CPU; or float32 / bfloat16
    # Tiny model only: epochs of the full-parameter grounding stage that stands for pretraining
    # (learner.grounding; 0: none, the random model is the base). Not part of the paper.
    grounding_epochs: int = 0
    grounding_lr: float = 1e-3  # AdamW peak lr of that stage (cosine decay to 0)
    grounding_cases: int = 100  # phantoms of the stage's own corpus (never a run's phantoms)
    grounding_seed: int = 0  # seeds the tiny model's init, the corpus and the stage
    grounding_cache: Path | None = None  # where it is kept; None: ~/.cache/medvol-r1/pretrained


@dataclass
class RolloutConfig:
    engine: str = "vllm"  # "vllm" or "transformers" (for machines without vLLM)
    group_size: int = 4  # G completions per prompt (paper: 4)
    temperature: float = 1.0  # sampling temperature for GRPO rollouts
    top_p: float = 1.0  # nucleus sampling mass
    max_tokens: int = 256  # max generation length (paper: 256)
    logprobs: bool = True  # return the sampled tokens' logprobs (pi_old for the clipped ratio)
    enable_prefix_caching: bool = True  # the G samples of a prompt share its prefill
    max_model_len: int = 6144  # 64 slices x 64 visual tokens + text + 256 generated
    max_images: int = 64  # images per prompt the engine accepts
    enable_lora: bool = True  # take LoRA adapters live (the learner trains LoRA)
    max_lora_rank: int = 128  # paper: LoRA rank 128
    num_actors: int = 1  # rollout actors, data-parallel over prompts (one GPU each on a cluster)
    gpus_per_actor: float = 0.0  # 1 on a GPU cluster; 0 runs actors on CPU
    in_process: bool = False  # vLLM engine core in this process (fast start; tests, one CPU)
    enforce_eager: bool = True  # no graph compilation: reproducible sampling, quick start on CPU
    chunked_prefill: bool | None = None  # None: on GPU only (CPU seeded sampling breaks on chunks)
    gpu_memory_utilization: float = 0.5  # share of a GPU vLLM may take (learner may share it)
    seed: int = 0  # sampling seed

    def __post_init__(self) -> None:
        if self.engine not in ("vllm", "transformers"):
            raise ValueError(
                f"rollout.engine must be 'vllm' or 'transformers', got {self.engine!r}"
            )
        if self.group_size < 1:
            raise ValueError(f"rollout.group_size must be >= 1, got {self.group_size}")
