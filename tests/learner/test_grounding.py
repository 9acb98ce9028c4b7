"""The grounding stage standing for pretraining: it learns, is built once, reads no test case."""

import json

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow


def answer_loss(model_dir, cfg, split):
    """Mean answer cross-entropy of the explicit-query anchors of a split under a checkpoint."""
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    from data.dataset import VolumeDataset, anchorable
    from data.prompts import build_messages, sft_target_text
    from data.targets import evidence_target
    from learner.grounding import explicit_query
    from learner.policy import completion_logits, encode, target_ids, token_logprobs

    processor = AutoProcessor.from_pretrained(model_dir)
    model = Qwen3VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    dataset = VolumeDataset(cfg.data.manifest, cfg.data, split=split)
    losses = []
    for i in anchorable(dataset)[0]:
        sample, prepared = dataset[i]
        anchor = evidence_target(prepared, 1, np.random.default_rng(0))
        messages = build_messages(np.asarray(prepared.slices), explicit_query(sample.label))
        seq = encode(
            processor, messages, target_ids(processor, sft_target_text(anchor, sample.label))
        )
        with torch.no_grad():
            logits = completion_logits(model, seq, "cpu")
        losses.append(-token_logprobs(logits, seq.completion_ids).mean().item())
    return float(np.mean(losses))


def test_grounding_learns_the_training_cases_and_is_built_once(tmp_path, tiny_model):
    from cluster.config import load_run_config
    from data.phantoms import write_phantoms
    from learner.grounding import ground, grounding_key
    from learner.sft import model_path

    manifest = write_phantoms(tmp_path / "data", n=4, seed=1, shape=(40, 96, 96), progress=False)
    cfg = load_run_config(
        "configs/tiny.yaml",
        [
            f"output_dir={tmp_path}",
            f"data.manifest={manifest}",
            "data.cache_dir=null",
            "data.num_slices=8",
            "data.slice_size=32",
            "model.grounding_epochs=4",
            "model.grounding_lr=0.003",
        ],
    )
    tiny = tmp_path / "tiny-model"
    grounded = model_path(cfg)  # builds the tiny model, then grounds it
    assert grounded == tmp_path / "grounded-model" and (tiny / "config.json").exists()
    before, after = answer_loss(tiny, cfg, "train"), answer_loss(grounded, cfg, "train")
    assert after < before - 1.0, (before, after)
    # Built once: the same inputs reuse the folder, other inputs rebuild it.
    stamp = (grounded / "model.safetensors").stat().st_mtime_ns
    assert ground(tiny, cfg, grounded) == grounded
    assert (grounded / "model.safetensors").stat().st_mtime_ns == stamp
    key = json.loads((grounded / "medvol_grounding.json").read_text())["key"]
    assert key == grounding_key(tiny, manifest, cfg)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    test_rows = [r for r in rows if r["split"] == "test"]
    assert test_rows  # the phantom set holds test cases ...
    edited = [dict(r, query="Where is it?") if r["split"] == "test" else r for r in rows]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in edited))
    assert grounding_key(tiny, manifest, cfg) == key  # ... which the stage never reads
    cfg.model.grounding_epochs = 5
    assert grounding_key(tiny, manifest, cfg) != key
