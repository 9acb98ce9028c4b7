"""The dtype a checkpoint stores its weights in, read from config.json as the published
checkpoints write it (the policy base each rollout node writes is saved in it)."""

import json

import pytest
import torch

from rollout.hf_engine import checkpoint_dtype


def folder_with(tmp_path, config: dict):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_qwen3_vl_keeps_its_dtype_in_text_config(tmp_path):
    # Qwen3-VL-4B-Instruct's config.json: no top-level dtype; text_config and vision_config
    # carry it (transformers 5 writes "dtype", older files "torch_dtype")
    published = {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": "qwen3_vl",
        "image_token_id": 151655,
        "text_config": {"model_type": "qwen3_vl_text", "hidden_size": 2560, "dtype": "bfloat16"},
        "vision_config": {"model_type": "qwen3_vl", "depth": 24},
        "tie_word_embeddings": True,
    }
    assert checkpoint_dtype(folder_with(tmp_path, published)) == torch.bfloat16
    older = {**published, "text_config": {"torch_dtype": "bfloat16"}}
    assert checkpoint_dtype(folder_with(tmp_path, older)) == torch.bfloat16


@pytest.mark.parametrize(
    "config, dtype",
    [
        ({"dtype": "float16", "text_config": {"dtype": "bfloat16"}}, torch.float16),  # top first
        ({"torch_dtype": "bfloat16"}, torch.bfloat16),
        ({"vision_config": {"dtype": "bfloat16"}}, torch.bfloat16),
        ({"dtype": "auto", "text_config": {"dtype": "bfloat16"}}, torch.bfloat16),  # not a dtype
        ({"text_config": {}}, torch.float32),  # nothing said: float32
        ({}, torch.float32),
    ],
)
def test_where_the_dtype_is_read_from(tmp_path, config, dtype):
    assert checkpoint_dtype(folder_with(tmp_path, config)) == dtype


def test_the_tiny_model_says_its_own(tiny_model):
    config = json.loads((tiny_model / "config.json").read_text())
    said = config.get("dtype") or config.get("text_config", {}).get("dtype") or "float32"
    assert checkpoint_dtype(tiny_model) == getattr(torch, said)
