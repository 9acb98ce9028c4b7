"""Adapters pushed in memory: a vLLM engine (its engine core in another process, as on a cluster)
and the transformers engine serve an adapter handed over as tensors exactly as the same adapter
loaded from a folder, and a rollout actor writes nothing for it."""

import os
import pickle
from pathlib import Path

import pytest

from common.config import ModelConfig, RolloutConfig
from rollout.hf_engine import TransformersEngine
from rollout.records import AdapterTensors, RolloutError, WeightUpdate

pytestmark = pytest.mark.slow

CFG = RolloutConfig(max_tokens=12, in_process=False, max_model_len=2048, max_lora_rank=16)


def answers(engine, prompts):
    """Greedy tokens and their logprobs, per prompt."""
    return [
        (g.completions[0].token_ids, g.completions[0].logprobs)
        for g in engine.generate(prompts, greedy=True)
    ]


@pytest.fixture(scope="module")
def vllm_engine(tiny_model):
    """A vLLM engine whose engine core runs in its own process: pushed tensors must cross it."""
    from rollout.vllm_engine import VLLMEngine

    before = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    try:
        engine = VLLMEngine(tiny_model, CFG)
    finally:
        if before is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = before
    yield engine
    engine.llm.llm_engine.engine_core.shutdown()


def test_vllm_serves_an_adapter_in_memory_exactly_as_from_its_folder(vllm_engine, adapter, prompts):
    base = answers(vllm_engine, prompts)
    vllm_engine.update_weights(WeightUpdate(1, adapter_dir=adapter))
    from_folder = answers(vllm_engine, prompts)
    assert [t for t, _ in from_folder] != [t for t, _ in base]  # the adapter changes answers
    tensors = pickle.loads(pickle.dumps(AdapterTensors.read(adapter)))  # as the store hands it
    vllm_engine.update_weights(WeightUpdate(2, adapter_tensors=tensors))
    assert vllm_engine.version == 2
    assert vllm_engine._lora.lora_path == "in-memory://policy-v2"
    in_memory = answers(vllm_engine, prompts)
    assert in_memory == from_folder  # same tokens, bit-identical logprobs
    # And back: a folder push after an in-memory one.
    vllm_engine.update_weights(WeightUpdate(3, adapter_dir=adapter))
    assert answers(vllm_engine, prompts) == from_folder


def test_a_bad_adapter_in_memory_is_refused_and_the_current_one_keeps_serving(
    vllm_engine, adapter, prompts
):
    tensors = AdapterTensors.read(adapter)
    vllm_engine.update_weights(WeightUpdate(4, adapter_tensors=tensors))
    serving = answers(vllm_engine, prompts)
    too_wide = AdapterTensors({**tensors.config, "r": 32}, tensors.tensors)
    with pytest.raises(
        RolloutError, match=r"weight version 5 .*rank 32 exceeds .* max_lora_rank 16"
    ):
        vllm_engine.update_weights(WeightUpdate(5, adapter_tensors=too_wide))
    name = next(k for k in tensors.tensors if "q_proj.lora_A" in k)
    stray = dict(tensors.tensors)
    stray[name.replace("q_proj", "no_such_proj")] = stray[name].clone()
    with pytest.raises(RolloutError, match=r"weight version 6 .*no LoRA for: .*no_such_proj"):
        vllm_engine.update_weights(
            WeightUpdate(6, adapter_tensors=AdapterTensors(tensors.config, stray))
        )
    assert vllm_engine.version == 4
    # The same adapter still serves: the same greedy tokens, logprobs to float noise (the refused
    # loads leave the engine's batch shapes and thread timing different, ~5e-7 seen)
    after = answers(vllm_engine, prompts)
    assert [tokens for tokens, _ in after] == [tokens for tokens, _ in serving]
    for (_, got), (_, want) in zip(after, serving):
        assert got == pytest.approx(want, abs=1e-5)


def test_transformers_and_a_rollout_actor_take_an_adapter_in_memory(
    tiny_model, adapter, prompts, tmp_path, monkeypatch
):
    from rollout.actor import SCRATCH_ENV, RolloutWorker

    cfg = RolloutConfig(engine="transformers", max_tokens=8)
    reference = TransformersEngine(tiny_model, cfg)
    reference.update_weights(WeightUpdate(1, adapter_dir=adapter))
    monkeypatch.setenv(SCRATCH_ENV, str(tmp_path / "scratch"))
    worker = RolloutWorker(str(tiny_model), cfg, ModelConfig())
    assert worker.update_weights(WeightUpdate(1, adapter_tensors=AdapterTensors.read(adapter))) == 1
    assert answers(worker.engine, prompts) == answers(reference, prompts)
    assert list(Path(worker.where()["scratch"]).iterdir()) == []  # nothing written for it
    worker.close()


def test_adapter_tensors_round_trip_through_a_folder_and_pickle(adapter, tmp_path):
    import torch

    tensors = AdapterTensors.read(adapter)
    again = AdapterTensors.read(tensors.write(tmp_path / "copy"))
    assert again.config == tensors.config and again.rank == 8
    assert all((again.tensors[k] == v).all() for k, v in tensors.tensors.items())
    assert again.nbytes == tensors.nbytes > 0
    mixed = AdapterTensors({"r": 2}, {"a": torch.randn(3, 5).bfloat16(), "b": torch.randn(2, 2)})
    back = pickle.loads(pickle.dumps(mixed))
    for name, tensor in mixed.tensors.items():
        assert back.tensors[name].dtype == tensor.dtype
        assert torch.equal(back.tensors[name], tensor)


def test_packed_tensors_come_back_whatever_their_dtypes_and_alignment():
    import torch

    from rollout.vllm_engine import pack_tensors, unpack_tensors

    tensors = {  # 3 int8 bytes put the float32 after them off its 4-byte alignment
        "a": torch.randn(3, 5).bfloat16(),
        "c": torch.arange(3, dtype=torch.int8),
        "d": torch.randn(4),
    }
    specs, payload = pack_tensors(tensors)
    assert specs == [["a", [3, 5], "bfloat16"], ["c", [3], "int8"], ["d", [4], "float32"]]
    assert len(payload) == 30 + 3 + 16
    back = unpack_tensors(specs, bytes(payload))
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    with pytest.raises(ValueError, match="adapter payload: 48 bytes where the specs need 49"):
        unpack_tensors(specs, bytes(payload)[:-1])


def test_the_learner_pushes_the_tensors_and_config_it_would_save(tiny_model, tmp_path):
    """What the learner pushes in memory is what its adapter folder holds, for what vLLM reads."""
    import dataclasses

    import torch
    from vllm.lora.peft_helper import PEFTHelper

    from common.config import LoraSettings
    from learner.adapters import adapter_tensors, save_adapter
    from learner.engine import build_engine, deepspeed_config, load_lora_policy

    lora = LoraSettings(rank=4, alpha=8, dropout=0.0)
    model, processor = load_lora_policy(tiny_model, lora, "fp32", False)
    engine = build_engine(model, deepspeed_config(1e-3, 0.0, 1.0, 0, "fp32", 1), 4, 0.0)
    pushed = adapter_tensors(engine)
    saved = AdapterTensors.read(save_adapter(engine, processor, tmp_path / "a", frame=None))
    assert pushed.tensors.keys() == saved.tensors.keys() and len(pushed.tensors) > 0
    assert all(torch.equal(pushed.tensors[k], v) for k, v in saved.tensors.items())
    read = {f.name for f in dataclasses.fields(PEFTHelper)} - {"vllm_max_position_embeddings"}
    assert {k: pushed.config.get(k) for k in read} == {k: saved.config.get(k) for k in read}
    assert pushed.rank == 4
