"""The image budget is pinned: every slice is (slice_size / 32)^2 tokens in vLLM and in the
processor the learner and the transformers engine encode with, whatever the checkpoint's
preprocessor config allows (the published Qwen3-VL: up to 16,777,216 pixels an image)."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from common.config import RolloutConfig
from rollout.prompting import load_processor, processor_kwargs, render

from .conftest import make_prompt

SLICE = 128  # (128 / 32)^2 = 16 tokens a slice
HUGE = 16_777_216  # Qwen3-VL-4B-Instruct's longest_edge, in pixels


@pytest.fixture(scope="module")
def huge_budget_model(tiny_model, tmp_path_factory):
    """The tiny model with the published Qwen3-VL's image budget in its processor config."""
    folder = tmp_path_factory.mktemp("huge-budget") / "model"
    shutil.copytree(tiny_model, folder)
    path = folder / "processor_config.json"
    config = json.loads(path.read_text())
    config["image_processor"]["size"] = {"longest_edge": HUGE, "shortest_edge": 65536}
    path.write_text(json.dumps(config))
    return folder


def test_a_slice_size_that_is_not_whole_tokens_is_refused():
    with pytest.raises(ValueError, match=r"data.slice_size: 100 is not a positive multiple of 32"):
        processor_kwargs(100)
    assert processor_kwargs(256) == {"size": {"shortest_edge": 65536, "longest_edge": 65536}}


def test_the_pinned_processor_gives_every_square_image_the_slice_budget(huge_budget_model):
    from transformers import AutoProcessor

    unpinned = AutoProcessor.from_pretrained(huge_budget_model)
    assert unpinned.image_processor.size["longest_edge"] == HUGE  # the fixture bites
    big = Image.fromarray(np.full((1024, 1024), 128, np.uint8)).convert("RGB")
    assert unpinned.image_processor(images=[big])["image_grid_thw"].tolist() == [[1, 64, 64]]
    pinned = load_processor(huge_budget_model, SLICE)
    for side in (64, 512, 1024):  # upscaled or downscaled to 128 x 128: 8 x 8 patches
        image = Image.fromarray(np.full((side, side), 128, np.uint8)).convert("RGB")
        assert pinned.image_processor(images=[image])["image_grid_thw"].tolist() == [[1, 8, 8]]


@pytest.mark.slow
def test_vllm_budgets_and_encodes_each_slice_at_the_pinned_size(huge_budget_model):
    """vLLM's per-image budget (what it profiles and reserves for) and its prompt ids follow the
    pin, and equal the pinned processor's ids, for slices smaller and larger than the frame."""
    from vllm.multimodal import MULTIMODAL_REGISTRY

    from rollout.hf_engine import TransformersEngine
    from rollout.vllm_engine import VLLMEngine

    cfg = RolloutConfig(
        max_tokens=4, in_process=True, max_model_len=2048, max_lora_rank=16, slice_size=SLICE
    )
    engine = VLLMEngine(huge_budget_model, cfg)
    model_config = engine.llm.llm_engine.model_config
    info = MULTIMODAL_REGISTRY.create_processor(model_config).info
    per_item = info.get_mm_max_tokens_per_item(cfg.max_model_len, {"image": 1})
    assert per_item["image"] == (SLICE // 32) ** 2 == 16
    assert tuple(info.get_image_size_with_most_features()) == (SLICE, SLICE)

    prompts = [make_prompt("small", slices=3, size=64), make_prompt("large", slices=3, size=512)]
    groups = engine.generate(prompts, greedy=True)
    pinned = load_processor(huge_budget_model, SLICE)
    image_pad = pinned.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    hf_groups = TransformersEngine(huge_budget_model, cfg).generate(prompts, greedy=True)
    for prompt, group, hf_group in zip(prompts, groups, hf_groups):
        assert group.prompt_token_ids.count(image_pad) == 3 * 16
        text, images = render(pinned, prompt, 64)
        expected = pinned(text=[text], images=images)["input_ids"][0]
        assert list(group.prompt_token_ids) == list(expected)
        assert hf_group.prompt_token_ids == group.prompt_token_ids
    del engine
