"""Rendering chat messages to the prompt text and images both engines take, and the processor
that encodes them with every slice at a fixed image budget."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from rollout.records import RolloutError, RolloutPrompt

# Qwen3-VL's vision tokens: 16 px patches merged 2 x 2, one token per 32 x 32 px.
PIXELS_PER_TOKEN_SIDE = 32


def processor_kwargs(slice_size: int | None) -> dict:
    """The processor settings that pin every image to ``slice_size``^2 pixels, hence
    (slice_size / 32)^2 tokens, whatever the checkpoint's preprocessor config says (the
    published Qwen3-VL allows up to 16,384 tokens an image, and vLLM would budget and profile
    for that). ``AutoProcessor.from_pretrained(path, **kwargs)`` and vLLM's
    ``LLM(mm_processor_kwargs=kwargs)`` both take them: vLLM sizes its per-image budget and its
    profiling image from the same ``size``. None pins nothing (the checkpoint's limits)."""
    if slice_size is None:
        return {}
    if slice_size <= 0 or slice_size % PIXELS_PER_TOKEN_SIDE:
        raise ValueError(
            f"data.slice_size: {slice_size} is not a positive multiple of "
            f"{PIXELS_PER_TOKEN_SIDE} (Qwen3-VL's 16 px patches merged 2 x 2), so its slices "
            "cannot map to a whole number of image tokens"
        )
    pixels = slice_size * slice_size
    return {"size": {"shortest_edge": pixels, "longest_edge": pixels}}


def load_processor(model_path: str | Path, slice_size: int | None):
    """The checkpoint's processor with the image budget pinned (:func:`processor_kwargs`)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_path, **processor_kwargs(slice_size))


def prompt_images(messages: list[dict]) -> list[Image.Image]:
    """The images of chat messages, in the order the template places them."""
    return [
        part["image"]
        for message in messages
        if isinstance(message.get("content"), list)
        for part in message["content"]
        if part.get("type") == "image"
    ]


def render(processor, prompt: RolloutPrompt, max_images: int) -> tuple[str, list[Image.Image]]:
    """The chat-templated prompt text (generation prompt added) and its images, in order."""
    images = prompt_images(prompt.messages)
    if len(images) > max_images:
        raise RolloutError(
            f"sample {prompt.sample_id!r}: {len(images)} images, more than the "
            f"engine's limit of {max_images}"
        )
    text = processor.apply_chat_template(
        prompt.messages, add_generation_prompt=True, tokenize=False
    )
    return text, images


def check_batch(prompts: list[RolloutPrompt], group_size: int) -> None:
    if not prompts:
        raise RolloutError("no prompts to generate for")
    if group_size < 1:
        raise RolloutError(f"group size must be >= 1, got {group_size}")
