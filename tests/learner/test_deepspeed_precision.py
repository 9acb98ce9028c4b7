"""The learner's DeepSpeed config under bf16: gradients accumulated and all-reduced in fp32, read
back from real engines over the tiny Qwen3-VL on the CPU."""

import pytest
import torch

from common.config import LoraSettings
from learner.engine import build_engine, deepspeed_config, load_lora_policy

pytestmark = pytest.mark.slow

LORA = LoraSettings(rank=4, alpha=8, dropout=0.0)


def test_fp32_config_is_unchanged():
    config = deepspeed_config(1e-4, 0.01, 1.0, 2, "fp32", 4)
    assert "data_types" not in config and "communication_data_type" not in config
    assert config["bf16"] == {"enabled": False}


def test_bf16_config_asks_for_fp32_accumulation_and_communication():
    for stage in (1, 2, 3):
        config = deepspeed_config(1e-4, 0.01, 1.0, stage, "bf16", 4)
        assert config["data_types"] == {"grad_accum_dtype": "fp32"}, stage
        assert config["communication_data_type"] == "fp32", stage
    stage0 = deepspeed_config(1e-4, 0.01, 1.0, 0, "bf16", 4)
    assert stage0["communication_data_type"] == "fp32" and "data_types" not in stage0


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_bf16_engine_accumulates_and_reduces_gradients_in_fp32(tiny_model, stage):
    """The engine's own view of the config (DeepSpeed's default for both is the model's bf16),
    and the optimizer it picked keeps its gradient accumulation in fp32; one step runs."""
    model, _ = load_lora_policy(tiny_model, LORA, "bf16", False)
    engine = build_engine(model, deepspeed_config(1e-3, 0.0, 1.0, stage, "bf16", 2), 4, 0.0)
    assert engine.bfloat16_enabled()
    assert engine.communication_data_type == torch.float32
    assert engine.get_data_types() == (torch.bfloat16, torch.float32)
    if stage == 1:  # DeepSpeed runs ZeRO-1 with fp32 accumulation as its BF16_Optimizer
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

        assert isinstance(engine.optimizer, BF16_Optimizer)
        assert {g.dtype for g in engine.optimizer.fp32_groups_gradients_flat} == {torch.float32}
    else:
        assert engine.optimizer.gradient_accumulation_dtype == torch.float32
    ids = torch.tensor([[20, 31, 40, 41]])
    for _ in range(2):  # two micro-batches: one optimizer step
        engine.backward(engine(input_ids=ids, labels=ids, use_cache=False).loss)
        engine.step()
    assert engine.global_steps == 1 and engine.skipped_steps == 0
    del engine, model


def test_deepspeed_takes_no_fp32_accumulation_without_zero(tiny_model):
    """Why stage 0 keeps bf16 accumulation: DeepSpeed 0.19 refuses the mix without ZeRO."""
    model, _ = load_lora_policy(tiny_model, LORA, "bf16", False)
    config = deepspeed_config(1e-3, 0.0, 1.0, 0, "bf16", 2)
    config["data_types"] = {"grad_accum_dtype": "fp32"}
    with pytest.raises(NotImplementedError, match="unsupported mix"):
        build_engine(model, config, 4, 0.0)
    engine = build_engine(model, deepspeed_config(1e-3, 0.0, 1.0, 0, "bf16", 2), 4, 0.0)
    assert engine.communication_data_type == torch.float32
    del engine, model
