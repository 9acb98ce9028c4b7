"""A tiny random-initialised Qwen3-VL, built here, that loads like Qwen/Qwen3-VL-4B.

    python -m rollout.tiny_model --out-dir DIR [--model-size test|medium|small] [--seed 0]

Writes, with ``save_pretrained``: the model (``Qwen3VLForConditionalGeneration``), a byte-level
BPE tokenizer trained locally on the project's own prompt and answer text that carries Qwen's
special tokens (``<think>``/``</think>`` as added, non-special tokens so that decoded answers keep
them), a Qwen3-VL chat template, and the image/video processor configs. transformers
(``AutoProcessor``, ``AutoModelForImageTextToText``), peft and ``vllm.LLM`` load the folder the
same way they load the real checkpoint.

Images: patch 16, spatial merge 2, so one 256x256 slice is (256/32)^2 = 64 visual tokens and a
64-slice prompt holds 4096 image tokens plus ~700 text tokens; slices are not resized (the
processor's pixel bounds admit 32x32 up to 256x256 unchanged). Model sizes (``--model-size``,
``model.tiny_size``): ``test`` runs in seconds on
CPU (head_dim 64: vLLM's CPU attention rejects 16); ``small`` (~40 M parameters) can learn the
phantom task on one GPU in minutes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from common.cli import ArgumentParser, command

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
THINK_TOKENS = ["<think>", "</think>"]  # added but not special: they stay in decoded text
TINY_VERSION = 2  # bumped when the builder makes a different model (2: number tokens)
NUMBER_TOKENS = 513  # "0" .. "512": box coordinates up to a 512-pixel slice, slice numbers

SIZES = {
    "test": {
        "hidden": 128,
        "layers": 2,
        "heads": 2,
        "kv_heads": 1,
        "ffn": 256,
        "vision_hidden": 128,
        "vision_depth": 2,
        "vision_heads": 2,
        "vision_ffn": 256,
    },
    "medium": {
        "hidden": 256,
        "layers": 4,
        "heads": 4,
        "kv_heads": 2,
        "ffn": 512,
        "vision_hidden": 128,
        "vision_depth": 2,
        "vision_heads": 2,
        "vision_ffn": 256,
    },
    "small": {
        "hidden": 512,
        "layers": 8,
        "heads": 8,
        "kv_heads": 4,
        "ffn": 1408,
        "vision_hidden": 256,
        "vision_depth": 4,
        "vision_heads": 4,
        "vision_ffn": 1024,
    },
}

# Renders transformers-style messages (content as a string or a list of {"type": "text"|"image"})
# into Qwen's <|im_start|>role ... <|im_end|> turns, one vision block per image.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif part['type'] == 'video' -%}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "<|im_end|>\n"
    "{% endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{% endif -%}"
)


def _corpus() -> list[str]:
    """Text the tokenizer is trained on: prompts, queries, answers and numbers."""
    from data.answer import EvidenceAnchor
    from data.prompts import ANSWER_INSTRUCTION, SYSTEM_PROMPT, sft_target_text
    from data.queries import QUERIES

    lines = [SYSTEM_PROMPT, ANSWER_INSTRUCTION.format(num_slices=64, size=256)]
    for target, items in QUERIES.items():
        lines += [f"Query: {q}" for q in items]
        for k in (1, 17, 33, 64):
            lines.append(sft_target_text(EvidenceAnchor(k, ((k, k + 1, k + 40, k + 90),)), target))
    lines += [f"<slice {k}>" for k in range(1, 65)]
    lines += [" ".join(str(n) for n in range(i, i + 16)) for i in range(0, 257, 16)]
    return lines * 4


def build_tokenizer(out_dir: Path, vocab_size: int = 1024):
    """Train a byte-level BPE on the corpus and wrap it as Qwen's tokenizer class."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    tokenizer = Qwen2Tokenizer(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
    )
    tokenizer.add_tokens(THINK_TOKENS, special_tokens=False)
    # Every integer a coordinate or a slice number can take is one token, so a box is four
    # choices, not a run of digits whose length the model must also get right (measured: the
    # digit-level tiny model wrote "991" for "99" in about a quarter of sampled answers).
    tokenizer.add_tokens([str(n) for n in range(NUMBER_TOKENS)], special_tokens=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_qwen3vl(out_dir: str | Path, size: str = "test", seed: int = 0) -> Path:
    """Build (or reuse, when already complete) a tiny random Qwen3-VL checkpoint folder."""
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    out_dir = Path(out_dir)
    if size not in SIZES:
        raise ValueError(f"unknown tiny model size {size!r}; choose from {sorted(SIZES)}")
    marker = out_dir / "medvol_tiny.json"
    identity = {"size": size, "seed": seed, "version": TINY_VERSION}
    if marker.exists() and json.loads(marker.read_text()) == identity:
        return out_dir
    s = SIZES[size]
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = ((len(tokenizer) + 63) // 64) * 64
    head_dim = s["hidden"] // s["heads"]
    quarter = head_dim // 2
    # Multimodal RoPE sections (time, height, width) over head_dim / 2 frequencies.
    section = [quarter - 2 * (quarter * 5 // 16), quarter * 5 // 16, quarter * 5 // 16]
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": vocab,
            "hidden_size": s["hidden"],
            "intermediate_size": s["ffn"],
            "num_hidden_layers": s["layers"],
            "num_attention_heads": s["heads"],
            "num_key_value_heads": s["kv_heads"],
            "head_dim": head_dim,
            "max_position_embeddings": 8192,
            "tie_word_embeddings": False,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 500000.0,
                "mrope_section": section,
                "mrope_interleaved": True,
            },
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": s["vision_depth"],
            "hidden_size": s["vision_hidden"],
            "intermediate_size": s["vision_ffn"],
            "num_heads": s["vision_heads"],
            "out_hidden_size": s["hidden"],
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "num_position_embeddings": 256,
            "deepstack_visual_indexes": [0],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        # Untied: vLLM's CPU backend repacks lm_head, and reload_weights does not refresh a head
        # tied to the embeddings (measured: live full-weight pushes then diverge from a fresh
        # engine). Qwen3-VL-4B ties them; on GPU the LoRA path is the default push anyway.
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )
    model.save_pretrained(out_dir)
    pixels = {"shortest_edge": 32 * 32, "longest_edge": 256 * 256}
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            size=pixels,
            patch_size=16,
            merge_size=2,
            temporal_patch_size=2,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        ),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2),
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    marker.write_text(json.dumps(identity))
    return out_dir


@command()
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m rollout.tiny_model", description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", required=True, type=Path, help="the model folder to write")
    parser.add_argument(
        "--model-size",
        default="test",
        choices=list(SIZES),
        help="as model.tiny_size (test: seconds on CPU)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the random weights")
    args = parser.parse_args(argv)
    path = build_tiny_qwen3vl(args.out_dir, args.model_size, args.seed)
    print(f"tiny Qwen3-VL ({args.model_size}) in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
