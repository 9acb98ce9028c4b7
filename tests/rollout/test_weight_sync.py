"""Weights without a shared disk: full weights broadcast over the weight group (gloo on CPU)
into the vLLM engine (its worker takes them) and the transformers engine, in buckets, with a
timeout; adapters as bytes into a rollout actor's own scratch folder; a push that does not
finish fails instead of hanging."""

import threading
import time
from pathlib import Path

import pytest
import torch

from common.config import ModelConfig, RolloutConfig
from rollout.hf_engine import TransformersEngine
from rollout.records import FolderBytes, WeightSyncError, WeightUpdate
from rollout.vllm_engine import WeightGroup, plan_buckets

pytestmark = pytest.mark.slow

CFG = RolloutConfig(max_tokens=12, in_process=True, max_model_len=2048, max_lora_rank=16)


@pytest.fixture(scope="module")
def perturbed(tiny_model, tmp_path_factory):
    """The tiny model's weights moved by noise, in memory and as a checkpoint folder."""
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path_factory.mktemp("perturbed")
    model.save_pretrained(folder)
    AutoProcessor.from_pretrained(tiny_model).save_pretrained(folder)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, folder


def greedy_tokens(engine, prompts):
    return [g.completions[0].token_ids for g in engine.generate(prompts, greedy=True)]


def test_a_bucketed_broadcast_reaches_a_vllm_and_a_transformers_engine(
    tiny_model, perturbed, prompts
):
    from rollout.vllm_engine import VLLMEngine

    state, folder = perturbed
    vllm_engine = VLLMEngine(tiny_model, CFG)
    hf_engine = TransformersEngine(tiny_model, CFG)
    before = greedy_tokens(vllm_engine, prompts)
    expected = greedy_tokens(TransformersEngine(folder, CFG), prompts)
    assert expected != before  # the push changes what the engines answer
    plan = plan_buckets(state.items(), bucket_bytes=2**20)
    assert len(plan.buckets) > 3  # several collectives, each at most 1 MiB unless one tensor
    for bucket in plan.buckets:
        assert sum(s.numel * 4 for s in bucket) <= 2**20 or len(bucket) == 1
    assert [s.name for b in plan.buckets for s in b] == list(state)

    store, host, port = WeightGroup.open(world=3, timeout_s=60)
    errors = []

    def member(work):
        try:
            work()
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    def sender():
        WeightGroup(host, port, 0, 3, 60, store=store).send(state.items(), plan)

    update = WeightUpdate(7, broadcast=plan)

    def transformers_side():
        hf_engine.join_weight_group(host, port, 2, 3, 60)
        hf_engine.update_weights(update)

    threads = [threading.Thread(target=member, args=(w,)) for w in (sender, transformers_side)]
    for t in threads:
        t.start()
    vllm_engine.join_weight_group(host, port, 1, 3, 60)  # the worker joins, in this process
    vllm_engine.update_weights(update)
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert vllm_engine.version == hf_engine.version == 7
    assert greedy_tokens(vllm_engine, prompts) == expected
    assert greedy_tokens(hf_engine, prompts) == expected
    del vllm_engine


def test_a_broadcast_that_never_comes_fails_within_the_timeout(tiny_model):
    store, host, port = WeightGroup.open(world=2, timeout_s=2)
    joined = threading.Event()

    def silent_sender():  # joins the group, then never sends
        WeightGroup(host, port, 0, 2, 2, store=store)
        joined.set()
        time.sleep(6)

    threading.Thread(target=silent_sender, daemon=True).start()
    engine = TransformersEngine(tiny_model, CFG)
    engine.join_weight_group(host, port, 1, 2, 2)
    assert joined.wait(10)
    plan = plan_buckets([("w", torch.zeros(4))], bucket_bytes=2**20)
    started = time.perf_counter()
    with pytest.raises(WeightSyncError, match=r"bucket 1/1 .* within 2 s \(cluster.weight_sync"):
        engine.update_weights(WeightUpdate(3, broadcast=plan))
    assert time.perf_counter() - started < 10
    assert engine.version == 0  # the old weights stay


def test_adapter_bytes_land_in_the_actor_scratch_and_the_policy_base_is_built_there(
    tiny_model, adapter, tmp_path, prompts, monkeypatch
):
    """A rollout actor's engine loads pushed adapters and the policy base only from its own
    scratch folder, written from bytes; the newest keep_adapters adapters stay."""
    from rollout.actor import SCRATCH_ENV, RolloutWorker
    from tests.conftest import SFT_LIKE_TARGETS, random_adapter

    monkeypatch.setenv(SCRATCH_ENV, str(tmp_path / "scratch"))
    sft = random_adapter(tiny_model, tmp_path / "sft", SFT_LIKE_TARGETS, 4, 0.05, seed=2)
    cfg = RolloutConfig(engine="transformers", max_tokens=8)
    worker = RolloutWorker(
        str(tiny_model), cfg, ModelConfig(), base_adapter=FolderBytes.read(sft), keep_adapters=2
    )
    files = FolderBytes.read(adapter)
    for version in (1, 2, 3):
        assert worker.update_weights(WeightUpdate(version, adapter=files)) == version
    where = worker.where()
    scratch = tmp_path / "scratch"
    assert all(str(scratch) in folder for folder in where["served"]), where
    assert where["served"][0].rsplit("/", 1)[-1].startswith("policy-base-")
    kept = sorted(p.name for p in Path(where["scratch"]).glob("adapter-v*"))
    assert kept == ["adapter-v2", "adapter-v3"]
    # The same answers as an engine given the merged base and the adapter folder directly.
    from rollout.hf_engine import merge_adapter

    reference = TransformersEngine(merge_adapter(tiny_model, sft, tmp_path / "merged"), cfg)
    reference.update_weights(WeightUpdate(3, adapter_dir=adapter))
    assert greedy_tokens(worker.engine, prompts) == greedy_tokens(reference, prompts)
    worker.close()
    assert not Path(where["scratch"]).exists()
