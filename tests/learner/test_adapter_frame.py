"""Adapter folders carry their frame: save_adapter and the stacked final adapter write it."""

from dataclasses import dataclass

import pytest

from common.config import DataConfig
from learner.training_frame import TrainingFrame


@dataclass
class Engine:
    """What the adapter writers use of a DeepSpeed engine."""

    module: object

    def zero_optimization_stage(self) -> int:
        return 0


@pytest.fixture(scope="module")
def engine_and_processor(tiny_model):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32)
    module = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    return Engine(module), AutoProcessor.from_pretrained(tiny_model)


def test_the_sft_and_final_adapters_carry_the_frame(
    engine_and_processor, sft_adapter, tiny_model, tmp_path
):
    from learner.adapters import save_adapter, save_stacked_adapter

    engine, processor = engine_and_processor
    frame = TrainingFrame.of_run(DataConfig(num_slices=8, slice_size=128), tiny_model)
    alone = save_adapter(engine, processor, tmp_path / "adapter", frame=frame)
    stacked = save_stacked_adapter(engine, processor, sft_adapter, tmp_path / "final", frame=frame)
    for folder in (alone, stacked):
        assert (folder / "adapter_config.json").exists()
        assert TrainingFrame.read(folder) == frame
    pushed = save_adapter(engine, processor, tmp_path / "pushed", frame=None)
    assert TrainingFrame.read_if_any(pushed) is None
