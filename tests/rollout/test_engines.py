"""Real generation with vLLM and transformers on the tiny Qwen3-VL: groups, logprobs, updates."""

import numpy as np
import pytest
import torch

from common.config import RolloutConfig
from rollout.hf_engine import TransformersEngine
from rollout.records import RolloutError, WeightUpdate
from rollout.vllm_engine import vision_token_ids

from .conftest import make_prompt

pytestmark = pytest.mark.slow

CFG = RolloutConfig(max_tokens=24, in_process=True, max_model_len=2048, max_lora_rank=16)


@pytest.fixture(scope="module")
def vllm_engine(tiny_model):
    from rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine(tiny_model, CFG)
    yield engine
    del engine


@pytest.fixture(scope="module")
def hf_engine(tiny_model):
    return TransformersEngine(tiny_model, CFG)


def hf_logprobs(engine: TransformersEngine, prompt_ids, completion_ids, prompt, temperature=1.0):
    """Score a completion with transformers: log p(token | prefix) of each completion token
    under the distribution the engines sample from (logits / T, vision tokens banned)."""
    from rollout.prompting import render

    text, images = render(engine.processor, prompt, 64)
    inputs = engine.processor(text=[text], images=images, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == list(prompt_ids)
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    with torch.no_grad():
        logits = (
            engine.model(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pixel_values=inputs["pixel_values"],
                image_grid_thw=inputs["image_grid_thw"],
                mm_token_type_ids=torch.cat(
                    [
                        inputs["mm_token_type_ids"],
                        torch.zeros(1, len(completion_ids), dtype=torch.long),
                    ],
                    1,
                ),
            )
            .logits[0]
            .float()
        )
    logits[:, vision_token_ids(engine.processor.tokenizer)] = float("-inf")
    logits = (logits / temperature).log_softmax(-1)
    n = len(prompt_ids)
    return [float(logits[n - 1 + i, t]) for i, t in enumerate(completion_ids)]


def test_vllm_samples_g_completions_per_prompt_with_logprobs(vllm_engine, hf_engine, prompts):
    groups = vllm_engine.generate(prompts, seed=3)
    assert [g.sample_id for g in groups] == ["a", "b"]
    for group in groups:
        assert len(group.completions) == 4 and group.version == 0
        for c in group.completions:
            assert len(c.token_ids) == len(c.logprobs) > 0
            assert c.finish_reason in ("stop", "length")
            assert all(lp <= 0 for lp in c.logprobs)
    assert len({c.token_ids for c in groups[0].completions}) > 1  # sampled, not copies
    banned = set(vision_token_ids(vllm_engine.processor.tokenizer))
    assert len(banned) == 4
    assert not banned & {t for g in groups for c in g.completions for t in c.token_ids}
    # The sampling logprobs are the model's own scores of those tokens.
    c = groups[0].completions[0]
    expected = hf_logprobs(hf_engine, groups[0].prompt_token_ids, c.token_ids, prompts[0])
    np.testing.assert_allclose(c.logprobs, expected, atol=2e-3)


def test_sampling_logprobs_are_those_of_the_tempered_distribution(vllm_engine, hf_engine, prompts):
    """At temperature T both engines return log softmax(logits / T) of the sampled tokens, the
    distribution they were drawn from (and the one the learner scores them under)."""
    from dataclasses import replace

    cfg = replace(CFG, temperature=0.5)
    vllm_engine.cfg, hf_engine.cfg = cfg, cfg
    try:
        for engine in (vllm_engine, hf_engine):
            group = engine.generate(prompts[:1], seed=5)[0]
            c = group.completions[0]
            tempered = hf_logprobs(hf_engine, group.prompt_token_ids, c.token_ids, prompts[0], 0.5)
            raw = hf_logprobs(hf_engine, group.prompt_token_ids, c.token_ids, prompts[0])
            np.testing.assert_allclose(c.logprobs, tempered, atol=2e-3)
            assert np.abs(np.array(c.logprobs) - np.array(raw)).max() > 0.05
    finally:
        vllm_engine.cfg, hf_engine.cfg = CFG, CFG


def test_greedy_vllm_equals_greedy_transformers(vllm_engine, hf_engine, prompts):
    v = vllm_engine.generate(prompts, greedy=True)
    h = hf_engine.generate(prompts, greedy=True)
    for a, b in zip(v, h):
        assert a.prompt_token_ids == b.prompt_token_ids
        assert len(a.completions) == 1
        assert a.completions[0].token_ids == b.completions[0].token_ids
        # Texts agree up to vLLM holding back a trailing incomplete UTF-8 byte sequence.
        assert b.completions[0].text.startswith(a.completions[0].text.rstrip("\ufffd"))


def test_lora_update_then_greedy_equals_an_engine_built_with_it(
    vllm_engine, tiny_model, adapter, prompts
):
    before = vllm_engine.generate(prompts, greedy=True)
    vllm_engine.update_weights(WeightUpdate(version=1, adapter_dir=adapter))
    after = vllm_engine.generate(prompts, greedy=True)
    assert after[0].version == 1
    fresh = TransformersEngine(tiny_model, CFG)
    fresh.update_weights(WeightUpdate(version=1, adapter_dir=adapter))
    reference = fresh.generate(prompts, greedy=True)
    assert [g.completions[0].token_ids for g in after] == [
        g.completions[0].token_ids for g in reference
    ]
    assert [g.completions[0].token_ids for g in after] != [
        g.completions[0].token_ids for g in before
    ]


def test_full_weight_update_and_back(vllm_engine, tiny_model, tmp_path, prompts):
    from transformers import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path / "new")
    vllm_engine.processor.save_pretrained(tmp_path / "new")
    vllm_engine._lora = None  # serve the base weights
    base = vllm_engine.generate(prompts, greedy=True)
    vllm_engine.update_weights(WeightUpdate(version=2, weights_dir=tmp_path / "new"))
    pushed = vllm_engine.generate(prompts, greedy=True)
    reference = TransformersEngine(tmp_path / "new", CFG).generate(prompts, greedy=True)
    assert [g.completions[0].token_ids for g in pushed] == [
        g.completions[0].token_ids for g in reference
    ]
    vllm_engine.update_weights(WeightUpdate(version=3, weights_dir=tiny_model))
    restored = vllm_engine.generate(prompts, greedy=True)
    assert [g.completions[0].token_ids for g in restored] == [
        g.completions[0].token_ids for g in base
    ]


def test_bad_input_is_a_clear_error_and_the_engine_keeps_serving(vllm_engine, tmp_path, prompts):
    with pytest.raises(RolloutError, match="65 images, more than the engine's limit of 64"):
        vllm_engine.generate([make_prompt("many", slices=65, size=32)])
    with pytest.raises(RolloutError, match="'long'"):
        vllm_engine.generate([make_prompt("long", slices=64, size=256)])  # 64 x 64 visual tokens
    with pytest.raises(RolloutError, match="no prompts"):
        vllm_engine.generate([])
    with pytest.raises(RolloutError, match="group size"):
        vllm_engine.generate(prompts, group_size=-1)
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    config = Qwen3VLConfig.from_pretrained(vllm_engine.model_path)
    config.text_config.intermediate_size *= 2
    Qwen3VLForConditionalGeneration(config).save_pretrained(tmp_path / "wrong")
    with pytest.raises(RolloutError, match="weights do not match the served model"):
        vllm_engine.update_weights(WeightUpdate(version=9, weights_dir=tmp_path / "wrong"))
    assert vllm_engine.version != 9
    groups = vllm_engine.generate(prompts)
    assert len(groups) == 2 and all(len(g.completions) == 4 for g in groups)
