"""Rendering chat messages to the prompt text and images both engines take."""

from __future__ import annotations

from PIL import Image

from rollout.records import RolloutError, RolloutPrompt


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
