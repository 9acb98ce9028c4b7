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
    """Logits predicting each completion token: (T, V), from positions n - 1 .. n + T - 2 of
    the prompt (n tokens) + completion sequence. Only those rows go through the LM head: the
    full sequence's logits would be ~1.5 GB at 5k tokens x 151,936 vocabulary in fp32."""
    inputs = {k: v.to(device) for k, v in seq.inputs.items()}
    n = seq.prompt_len
    keep = torch.arange(n - 1, n - 1 + len(seq.completion_ids), device=device)
    return model(**inputs, use_cache=False, logits_to_keep=keep).logits[0]


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
    if "mm_token_type_ids" in prompt:
        token_types = prompt["mm_token_type_ids"]
    elif "pixel_values" in prompt or "image_grid_thw" in prompt:
        # Zeros would number the image tokens as text: wrong M-RoPE positions, silently.
        raise ValueError(
            "pack_group: the prompt has images but no mm_token_type_ids (which tokens are "
            "image tokens, for their M-RoPE positions); encode it with a processor that "
            "returns them (learner.encoding.encode_prompt)"
        )
    else:
        token_types = torch.zeros_like(ids)  # text only
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
    mask = allowed[None, None]
    # eager attention adds its mask; sdpa takes a boolean one
    if attention_implementation(model) == "eager":
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


def attention_implementation(model) -> str:
    """The attention kernel the model runs (transformers' ``_attn_implementation``)."""
    return getattr(qwen_model(model).config, "_attn_implementation", "sdpa")


def check_packing(model) -> None:
    """Refuse ``grpo.learner_pass: grouped`` on an attention kernel that takes no 4D mask: a
    packed group needs one (eager and sdpa take it; flash attention kernels take none), and
    learning per completion instead would change the run's cost without a word."""
    impl = attention_implementation(model)
    if impl not in ("eager", "sdpa"):
        raise ValueError(
            f"grpo.learner_pass: grouped packs each group into one sequence under a 4D attention "
            f"mask, which the model's attention implementation {impl!r} does not take (eager "
            "and sdpa do); set grpo.learner_pass: per_completion"
        )


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log pi(o_t | prefix) for each completion token: (T, V), (T,) -> (T,)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(1, ids[:, None].to(logits.device))[:, 0]
