"""The tiny model's stand-in for pretraining: it learns, is built once per machine from a corpus
of its own, and depends on no run's data or seed."""

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
    from learner.encoding import completion_logits, encode, target_ids, token_logprobs
    from learner.grounding import explicit_query

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


def test_the_stand_in_learns_is_built_once_and_ignores_the_run(tmp_path):
    from common.config import load_run_config
    from data.phantoms import write_phantoms
    from learner.grounding import grounding_key, pretrained_dir
    from learner.sft import model_path
    from rollout.tiny_model import build_tiny_qwen3vl

    run_data = write_phantoms(tmp_path / "run", n=4, seed=1, shape=(40, 96, 96), progress=False)
    overrides = [
        f"output_dir={tmp_path / 'out'}",
        f"data.manifest={run_data}",
        "data.cache_dir=null",
        "data.num_slices=8",
        "data.slice_size=32",
        "model.grounding_epochs=4",
        "model.grounding_lr=0.003",
        "model.grounding_cases=4",
        f"model.grounding_cache={tmp_path / 'cache'}",
    ]
    cfg = load_run_config("configs/tiny.yaml", overrides)
    grounded = model_path(cfg, progress=False)  # tiny model, corpus, grounding
    assert grounded == pretrained_dir(cfg) and grounded.parent == tmp_path / "cache"
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == [
        grounded.name
    ]  # the corpus and the random model are gone, the stand-in stays
    # What it learned on its own corpus carries to phantoms it never saw (the run's).
    random_model = build_tiny_qwen3vl(tmp_path / "random", "test", cfg.model.grounding_seed)
    before, after = answer_loss(random_model, cfg, "train"), answer_loss(grounded, cfg, "train")
    assert after < before - 1.0, (before, after)
    # Built once: the same settings reuse the folder.
    stamp = (grounded / "model.safetensors").stat().st_mtime_ns
    assert model_path(cfg, progress=False) == grounded
    assert (grounded / "model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((grounded / "medvol_grounding.json").read_text())["key"] == (
        grounding_key(cfg)
    )
    # A run's seed and data do not reach it (every run starts from the same checkpoint) ...
    other_run = load_run_config("configs/tiny.yaml", [*overrides, "seed=7", "data.manifest=x"])
    assert grounding_key(other_run) == grounding_key(cfg)
    # ... while its own settings do.
    for change in ("model.grounding_epochs=5", "model.grounding_seed=1", "data.slice_size=64"):
        changed = load_run_config("configs/tiny.yaml", [*overrides, change])
        assert grounding_key(changed) != grounding_key(cfg), change


def test_the_corpus_shares_no_case_with_any_run(tmp_path):
    """The corpus draws from its own random stream: with the same seed and case number, its
    phantoms differ from a run's."""
    import nibabel as nib

    from data.phantoms import write_phantoms
    from learner.grounding import CORPUS_STREAM

    run = write_phantoms(tmp_path / "run", n=3, seed=0, shape=(40, 96, 96), progress=False)
    corpus = write_phantoms(
        tmp_path / "corpus", n=3, seed=0, shape=(40, 96, 96), progress=False, stream=CORPUS_STREAM
    )
    for i, name in enumerate(("ctorg_0000", "abdomenct1k_0001", "kits23_0002")):
        a = np.asarray(nib.load(run.parent / "images" / f"{name}.nii.gz").dataobj)
        b = np.asarray(nib.load(corpus.parent / "images" / f"{name}.nii.gz").dataobj)
        assert a.shape == b.shape and not np.array_equal(a, b), i
