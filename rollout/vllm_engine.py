"""The rollout engine over vLLM: G samples per prompt in one generate call, live weight updates.

LoRA updates use one ``LoRARequest`` per adapter version (vLLM loads it on first use, the base
weights stay put). Full-weight updates reload the worker's weights from a folder in place
(``reload_weights``), then drop the prefix and encoder caches, which would otherwise serve
activations of the old weights.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from rollout.config import ModelConfig, RolloutConfig
from rollout.prompting import check_batch, render
from rollout.records import Completion, Group, RolloutError, RolloutPrompt, WeightUpdate

log = logging.getLogger(__name__)


def _dtype(model_cfg: ModelConfig) -> str:
    if model_cfg.dtype != "auto":
        return model_cfg.dtype
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"


# LoRA ranks vLLM can be started with (its ``max_lora_rank`` choices).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_rank_to_serve(adapter_dir: Path, at_least: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that serves the adapter in ``adapter_dir``
    (a GRPO run's final adapter stacks the SFT and GRPO ranks) and is at least ``at_least``."""
    config_path = Path(adapter_dir) / "adapter_config.json"
    try:
        rank = int(json.loads(config_path.read_text())["r"])
    except (FileNotFoundError, KeyError, ValueError) as err:
        raise RolloutError(f"{config_path}: not a peft adapter ({err})") from None
    need = max(rank, at_least)
    for choice in VLLM_LORA_RANKS:
        if choice >= need:
            return choice
    raise RolloutError(f"{adapter_dir}: LoRA rank {rank} is above vLLM's largest, 512")


class VLLMEngine:
    """vLLM ``LLM`` over a Qwen3-VL checkpoint folder."""

    def __init__(
        self, model_path: str | Path, cfg: RolloutConfig, model_cfg: ModelConfig | None = None
    ):
        if cfg.in_process:
            # Must be set before vLLM builds its engine: run the engine core in this process.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from transformers import AutoProcessor
        from vllm import LLM

        self.cfg = cfg
        self.model_path = Path(model_path)
        self.processor = AutoProcessor.from_pretrained(self.model_path)
        kwargs = {}
        if cfg.in_process:
            kwargs["distributed_executor_backend"] = "uni"
        chunked = cfg.chunked_prefill
        if chunked is None:
            import torch

            chunked = torch.cuda.is_available()
        if not chunked:
            # A prompt prefilled in pieces rewinds its seeded generator's offset after each
            # piece, which a CPU generator does not have ("CPU Generator does not use offset"),
            # so on CPU every prompt is prefilled in one step.
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=cfg.max_model_len)
        if cfg.enable_lora:
            kwargs.update(enable_lora=True, max_lora_rank=cfg.max_lora_rank, max_loras=1)
        self.llm = LLM(
            model=str(self.model_path),
            dtype=_dtype(model_cfg or ModelConfig()),
            max_model_len=cfg.max_model_len,
            enable_prefix_caching=cfg.enable_prefix_caching,
            limit_mm_per_prompt={"image": cfg.max_images, "video": 0},
            seed=cfg.seed,
            enforce_eager=cfg.enforce_eager,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            # Logprobs of the distribution tokens were drawn from (after temperature), which
            # the learner scores them under too; vLLM's default is the raw, untempered one.
            logprobs_mode="processed_logprobs",
            **kwargs,
        )
        self.version = 0
        self._lora = None
        self._banned = vision_token_ids(self.processor.tokenizer)

    def _sampling(self, greedy: bool, group_size: int, seed: int | None):
        from vllm import SamplingParams

        return SamplingParams(
            n=group_size,
            temperature=0.0 if greedy else self.cfg.temperature,
            top_p=1.0 if greedy else self.cfg.top_p,
            max_tokens=self.cfg.max_tokens,
            logprobs=0 if self.cfg.logprobs else None,
            seed=seed,
            logit_bias=dict.fromkeys(self._banned, -100.0),
        )

    def generate(
        self,
        prompts: list[RolloutPrompt],
        greedy: bool = False,
        group_size: int | None = None,
        seed: int | None = None,
    ) -> list[Group]:
        """G completions for each prompt (1 when greedy), grouped by prompt, in prompt order."""
        group_size = 1 if greedy else (group_size or self.cfg.group_size)
        check_batch(prompts, group_size)
        requests = []
        for prompt in prompts:
            text, images = render(self.processor, prompt, self.cfg.max_images)
            requests.append({"prompt": text, "multi_modal_data": {"image": images}})
        from vllm.exceptions import VLLMValidationError

        try:
            outputs = self.llm.generate(
                requests,
                self._sampling(greedy, group_size, seed),
                lora_request=self._lora,
                use_tqdm=False,
            )
        except (ValueError, VLLMValidationError) as err:  # e.g. a prompt over max_model_len
            ids = [p.sample_id for p in prompts]
            raise RolloutError(f"samples {ids}: {err}") from None
        groups = []
        for prompt, out in zip(prompts, outputs):
            completions = tuple(
                Completion(
                    token_ids=tuple(c.token_ids),
                    text=c.text,
                    logprobs=tuple(step[tok].logprob for step, tok in zip(c.logprobs, c.token_ids))
                    if c.logprobs is not None
                    else (),
                    finish_reason=c.finish_reason or "length",
                )
                for c in out.outputs
            )
            groups.append(
                Group(prompt.sample_id, tuple(out.prompt_token_ids), completions, self.version)
            )
        return groups

    def update_weights(self, update: WeightUpdate) -> None:
        """Serve ``update``'s weights from the next request on; a bad update raises and the
        engine keeps its current weights."""
        if update.adapter_dir is not None:
            self._use_adapter(update)
        else:
            self._reload(update)
        self.version = update.version
        log.info("rollout engine now at weight version %d", update.version)

    def _use_adapter(self, update: WeightUpdate) -> None:
        from vllm.lora.request import LoRARequest

        if not self.cfg.enable_lora:
            raise RolloutError("this engine was started without LoRA (rollout.enable_lora)")
        config_path = Path(update.adapter_dir) / "adapter_config.json"
        try:
            rank = json.loads(config_path.read_text())["r"]
        except (FileNotFoundError, KeyError, json.JSONDecodeError) as err:
            raise RolloutError(f"{config_path}: not a peft adapter ({err})") from None
        if rank > self.cfg.max_lora_rank:
            raise RolloutError(
                f"{update.adapter_dir}: LoRA rank {rank} exceeds the engine's "
                f"max_lora_rank {self.cfg.max_lora_rank}"
            )
        request = LoRARequest(
            f"policy-v{update.version}", update.version + 1, str(update.adapter_dir)
        )
        previous = self._lora
        self._lora = request
        try:  # load it now, so a broken adapter fails here and not in the next rollout
            self.llm.llm_engine.add_lora(request)
        except Exception as err:  # noqa: BLE001 - vLLM raises various types for bad adapters
            self._lora = previous
            raise RolloutError(f"{update.adapter_dir}: adapter does not load ({err})") from None
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)

    def _reload(self, update: WeightUpdate) -> None:
        check_same_architecture(self.model_path, Path(update.weights_dir))
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(update.weights_dir)})
        # Cached prefixes and image encodings were computed with the old weights.
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()


def vision_token_ids(tokenizer) -> list[int]:
    """Image/video placeholder tokens: a completion containing one could not be fed back to the
    model (it would ask for image features that do not exist), so they are never sampled."""
    names = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    return [i for i in (tokenizer.convert_tokens_to_ids(n) for n in names) if i is not None]


def check_same_architecture(current: Path, new: Path) -> None:
    """Raise unless ``new`` holds weights of the same shapes as ``current`` (by config and by
    the safetensors headers), so a bad push is refused before anything is loaded."""
    from safetensors import safe_open

    def shapes(folder: Path) -> dict[str, tuple[int, ...]]:
        out = {}
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise RolloutError(f"{folder}: no .safetensors weights")
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    out[key] = tuple(f.get_slice(key).get_shape())
        return out

    old, fresh = shapes(current), shapes(new)
    wrong = [k for k in fresh if k in old and old[k] != fresh[k]]
    unknown = [k for k in fresh if k not in old]
    if wrong or unknown:
        detail = "; ".join(
            [f"{k}: {fresh[k]} vs {old[k]}" for k in wrong[:3]]
            + [f"unknown {k}" for k in unknown[:3]]
        )
        raise RolloutError(f"{new}: weights do not match the served model ({detail})")
