"""The rollout engine over transformers ``generate``, for machines without vLLM.

Same interface and records as ``VLLMEngine``. Logprobs are those of the sampled tokens under the
model's raw distribution (temperature 1, before top-p), as vLLM reports them by default.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from common.config import ModelConfig, RolloutConfig
from rollout.prompting import check_batch, load_processor, render
from rollout.records import Completion, Group, RolloutError, RolloutPrompt, WeightUpdate
from rollout.vllm_engine import (
    WeightGroup,
    broadcast_mismatch,
    check_same_architecture,
    vision_token_ids,
)

log = logging.getLogger(__name__)


class TransformersEngine:
    """transformers' Qwen3-VL with optional peft adapter, one prompt at a time."""

    def __init__(
        self,
        model_path: str | Path,
        cfg: RolloutConfig,
        model_cfg: ModelConfig | None = None,
        device: str | None = None,
    ):
        self.cfg = cfg
        self.model_path = Path(model_path)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = (model_cfg or ModelConfig()).dtype
        if dtype == "auto":
            dtype = "bfloat16" if self.device == "cuda" else "float32"
        self.processor = load_processor(self.model_path, cfg.slice_size)
        self.dtype = getattr(torch, dtype)
        self.model = self._load(self.model_path)
        self.version = 0
        self.weight_group: WeightGroup | None = None
        self.eos = [
            self.processor.tokenizer.convert_tokens_to_ids("<|im_end|>"),
            self.processor.tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        ]

    def _load(self, folder: Path):
        from transformers import Qwen3VLForConditionalGeneration

        model = Qwen3VLForConditionalGeneration.from_pretrained(folder, dtype=self.dtype)
        return model.to(self.device).eval()

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[RolloutPrompt],
        greedy: bool = False,
        group_size: int | None = None,
        seed: int | None = None,
    ) -> list[Group]:
        group_size = 1 if greedy else (group_size or self.cfg.group_size)
        check_batch(prompts, group_size)
        if seed is not None:
            torch.manual_seed(seed)
        groups = []
        for prompt in prompts:
            text, images = render(self.processor, prompt, self.cfg.max_images)
            inputs = self.processor(text=[text], images=images or None, return_tensors="pt")
            prompt_len = inputs["input_ids"].shape[1]
            if prompt_len + 1 > self.cfg.max_model_len:
                raise RolloutError(
                    f"sample {prompt.sample_id!r}: prompt of {prompt_len} tokens "
                    f"exceeds max_model_len {self.cfg.max_model_len}"
                )
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            out = self.model.generate(
                **inputs,
                do_sample=not greedy,
                temperature=None if greedy else self.cfg.temperature,
                top_p=None if greedy else self.cfg.top_p,
                top_k=None,
                max_new_tokens=min(self.cfg.max_tokens, self.cfg.max_model_len - prompt_len),
                num_return_sequences=group_size,
                eos_token_id=self.eos,
                pad_token_id=self.eos[1],
                output_scores=True,
                return_dict_in_generate=True,
                suppress_tokens=vision_token_ids(self.processor.tokenizer),
            )
            # The scores tokens were drawn from (after temperature and top-p), as vLLM's
            # processed logprobs: the learner scores them at the same temperature.
            logprobs = torch.stack(out.scores, dim=1).float().log_softmax(-1)  # (G, T, V)
            completions = []
            for g in range(group_size):
                ids = out.sequences[g, prompt_len:].tolist()
                n = len(ids)
                for i, tok in enumerate(ids):
                    if tok in self.eos:
                        n = i + 1
                        break
                ids = ids[:n]
                finish = "stop" if ids and ids[-1] in self.eos else "length"
                lp = tuple(float(logprobs[g, i, t]) for i, t in enumerate(ids))
                completions.append(
                    Completion(
                        tuple(ids),
                        self.processor.tokenizer.decode(ids, skip_special_tokens=True),
                        lp if self.cfg.logprobs else (),
                        finish,
                    )
                )
            groups.append(
                Group(
                    prompt.sample_id,
                    tuple(inputs["input_ids"][0].tolist()),
                    tuple(completions),
                    self.version,
                )
            )
        return groups

    def update_weights(self, update: WeightUpdate) -> None:
        """Serve ``update``'s weights; a bad update raises and the current weights stay."""
        if update.adapter_dir is not None or update.adapter_tensors is not None:
            self._use_adapter(update)
        elif update.weights_dir is not None:
            check_same_architecture(self.model_path, Path(update.weights_dir))
            self.model = self._load(Path(update.weights_dir))
        elif update.broadcast is not None:
            self._receive(update)
        else:
            raise RolloutError(
                f"weight version {update.version}: bytes of a folder reach an engine only "
                "through a rollout actor, which writes them to its scratch folder first"
            )
        self.version = update.version

    def _use_adapter(self, update: WeightUpdate) -> None:
        from peft import PeftConfig, PeftModel, set_peft_model_state_dict

        where = update.adapter_dir or f"weight version {update.version} (adapter in memory)"
        try:  # a fresh base each time: peft injects its layers into the model it wraps
            base = self._load(self.model_path)
            if update.adapter_dir is not None:
                model = PeftModel.from_pretrained(base, str(update.adapter_dir))
            else:
                adapter = update.adapter_tensors
                model = PeftModel(base, PeftConfig.from_peft_type(**adapter.config))
                result = set_peft_model_state_dict(model, adapter.tensors)
                if result.unexpected_keys:
                    raise ValueError(f"unknown tensors {result.unexpected_keys[:3]}")
        except Exception as err:  # noqa: BLE001 - peft raises various types
            raise RolloutError(f"{where}: adapter does not load ({err})") from None
        # Folded in, so generation runs at base-model speed.
        self.model = model.merge_and_unload().eval()

    def join_weight_group(self, host: str, port: int, rank: int, world: int, timeout_s: float):
        """Join the weight group as ``rank`` (blocks until all ``world`` members have joined)."""
        self.weight_group = WeightGroup(host, port, rank, world, timeout_s)

    def _receive(self, update: WeightUpdate) -> None:
        if self.weight_group is None:
            raise RolloutError("weight broadcast: this engine has not joined a weight group")
        problem = broadcast_mismatch(self.model_path, update.broadcast)
        # Received in full even when refused: the sender must not wait on this engine.
        state = {name: t.clone() for name, t in self.weight_group.receive(update.broadcast)}
        if problem is not None:
            raise RolloutError(f"broadcast weights do not match the served model ({problem})")
        model = self._load(self.model_path)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected:
            raise RolloutError(f"broadcast weights: unknown tensors {unexpected[:3]}")
        self.model = model.eval()


def checkpoint_dtype(path: Path) -> torch.dtype:
    """The dtype a checkpoint folder stores its weights in, from config.json: its top-level
    ``dtype`` (or the older ``torch_dtype``), else its ``text_config``'s (where Qwen3-VL's
    published checkpoints keep it), else its ``vision_config``'s; float32 if none says."""
    import json

    config = json.loads((Path(path) / "config.json").read_text())
    for part in (config, config.get("text_config") or {}, config.get("vision_config") or {}):
        name = part.get("dtype") or part.get("torch_dtype")
        if isinstance(getattr(torch, str(name), None), torch.dtype):
            return getattr(torch, str(name))
    return torch.float32


def merge_adapter(base_path: Path, adapter_dir: Path, out_dir: Path) -> Path:
    """A checkpoint folder of the base with an adapter folder merged in (merged in fp32, saved in
    the base's dtype), with the processor: the weights vLLM serves as the SFT policy. Written to
    a temporary sibling and renamed."""
    import shutil

    from peft import PeftModel
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    base = Qwen3VLForConditionalGeneration.from_pretrained(base_path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.to(checkpoint_dtype(base_path)).save_pretrained(str(tmp))
    AutoProcessor.from_pretrained(base_path).save_pretrained(str(tmp))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir
