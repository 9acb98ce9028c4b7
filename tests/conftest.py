"""Shared test set-up: the project's process environment, and small phantom data."""

from pathlib import Path

import pytest

from common.runtime import set_default_environment

set_default_environment()

SMALL_SHAPE = (40, 96, 96)  # (z, y, x): quick to write and to prepare


@pytest.fixture(scope="session")
def phantom_manifest(tmp_path_factory) -> Path:
    """Four phantom cases (one per suite, plus a test case), written once per session."""
    from data.phantoms import write_phantoms

    return write_phantoms(
        tmp_path_factory.mktemp("phantoms"), n=4, seed=3, shape=SMALL_SHAPE, progress=False
    )


def random_adapter(
    model_dir: Path, out: Path, target_modules: str, rank: int, std: float, seed: int
) -> Path:
    """A peft LoRA adapter folder on ``model_dir`` with random non-zero B (an adapter that
    changes the policy), saved to ``out``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, init_lora_weights=False, target_modules=target_modules
    )
    peft_model = get_peft_model(model, config)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, std)
    peft_model.save_pretrained(out)
    return out


# An SFT result's stand-in: LoRA on some language-model projections and on lm_head, as
# configs/tiny.yaml trains.
SFT_LIKE_TARGETS = r"(.*language_model.*\.(q_proj|v_proj|down_proj)|lm_head)"
