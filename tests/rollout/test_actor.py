"""Rollout actors on a real local Ray instance: data-parallel groups, updates, a dead actor."""

import threading
import time

import pytest
import ray

from common.config import ModelConfig, RolloutConfig
from rollout.actor import RolloutFleet
from rollout.hf_engine import TransformersEngine
from rollout.records import WeightUpdate

from .conftest import make_prompt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_instance():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_two_actors_split_prompts_keep_order_and_survive_a_kill(ray_instance, tiny_model, adapter):
    cfg = RolloutConfig(engine="transformers", max_tokens=8, num_actors=2)
    fleet = RolloutFleet(tiny_model, cfg, ModelConfig(), cpus_per_actor=1)
    prompts = [make_prompt(f"p{i}", seed=i) for i in range(4)]
    reference = TransformersEngine(tiny_model, cfg).generate(prompts, greedy=True)
    groups = fleet.generate(prompts, greedy=True)
    assert [g.sample_id for g in groups] == ["p0", "p1", "p2", "p3"]
    assert [g.completions[0].token_ids for g in groups] == [
        g.completions[0].token_ids for g in reference
    ]

    # One prompt, two actors: each samples 2 of the G = 4 with its own seed, one group back.
    (split,) = fleet.generate(prompts[:1], seed=11)
    engine = TransformersEngine(tiny_model, cfg)
    (part0,) = engine.generate(prompts[:1], group_size=2, seed=11)
    (part1,) = engine.generate(prompts[:1], group_size=2, seed=11 + 7919)
    assert split.sample_id == "p0" and len(split.completions) == cfg.group_size == 4
    assert [c.token_ids for c in split.completions] == [
        c.token_ids for c in part0.completions + part1.completions
    ]

    fleet.update_weights(WeightUpdate(version=4, adapter_dir=adapter))
    updated = fleet.generate(prompts, greedy=True)
    assert {g.version for g in updated} == {4}

    out = {}
    runner = threading.Thread(
        target=lambda: out.setdefault("g", fleet.generate(prompts, greedy=True))
    )
    runner.start()
    time.sleep(0.5)
    ray.kill(fleet.actors[0])
    runner.join(timeout=300)
    assert [g.completions[0].token_ids for g in out["g"]] == [
        g.completions[0].token_ids for g in updated
    ]  # redone on a replacement, same weights
    assert {g.version for g in out["g"]} == {4}
    fleet.shutdown()


def test_a_vllm_actor_generates_groups(ray_instance, tiny_model):
    cfg = RolloutConfig(
        max_tokens=8, num_actors=1, in_process=True, max_model_len=2048, enable_lora=False
    )
    fleet = RolloutFleet(tiny_model, cfg, ModelConfig(), cpus_per_actor=1)
    groups = fleet.generate([make_prompt("a"), make_prompt("b", seed=1)], seed=0)
    assert [len(g.completions) for g in groups] == [4, 4]
    assert all(len(c.logprobs) == len(c.token_ids) for g in groups for c in g.completions)
    fleet.shutdown()
