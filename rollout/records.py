"""Typed records of rollout: prompts in, groups of completions with logprobs out, weights in."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RolloutPrompt:
    """One prompt: the sample it asks about and its chat messages (``data.prompts``)."""

    sample_id: str
    messages: list[dict]


@dataclass(frozen=True)
class Completion:
    """One sampled answer: its tokens, text, each token's logprob under the sampling policy."""

    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[float, ...]  # empty when logprobs were not asked for
    finish_reason: str  # "stop" (end of turn) or "length" (max_tokens reached)


@dataclass(frozen=True)
class Group:
    """The G completions of one prompt, and the prompt tokens as the engine tokenised them."""

    sample_id: str
    prompt_token_ids: tuple[int, ...]
    completions: tuple[Completion, ...]
    version: int  # weight version that produced the completions


@dataclass(frozen=True)
class WeightUpdate:
    """New policy weights for the engines: a LoRA adapter folder or a full checkpoint folder."""

    version: int
    adapter_dir: Path | None = None  # peft adapter (adapter_config.json + weights)
    weights_dir: Path | None = None  # merged HF weights (safetensors) of the same architecture

    def __post_init__(self) -> None:
        if (self.adapter_dir is None) == (self.weights_dir is None):
            raise ValueError("a weight update needs exactly one of adapter_dir or weights_dir")


class RolloutError(ValueError):
    """A request the engine cannot serve (it keeps serving others); names the sample."""
