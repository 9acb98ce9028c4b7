"""A prompt and its completions as model inputs: one sequence, or a group packed into one.

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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
