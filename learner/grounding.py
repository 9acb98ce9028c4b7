"""The tiny model's stand-in for pretraining: full-parameter training of the random tiny Qwen3-VL
to answer explicit organ names ("Segment the liver.") with evidence anchors, on a phantom corpus
of its own, built once per machine and shared by every run.

A user of MedVol-R1 starts from a pretrained VLM (Qwen3-VL-4B) that can already see and name
organs and draw boxes; the paper's LoRA SFT and GRPO teach it the task on top, and every run,
whatever its seed, starts from the same downloaded checkpoint. The tiny model the embedded default
builds is random, and LoRA on a random, frozen model has nothing to adapt. This stage gives it,
cheaply and in the open, what pretraining would:

- its corpus is ``model.grounding_cases`` phantoms drawn from a random stream of their own
  (``CORPUS_STREAM``), so no run's phantom, training or test, can be among them;
- every weight (vision tower included) is trained on every corpus target asked with the plain
  "Segment the <target>." query, the key slice of largest area and its boxes as the answer; it
  never sees the implicit phrasings SFT teaches, nor any run's data;
- the result lands in the machine's cache (``model.grounding_cache``, default
  ``~/.cache/medvol-r1/pretrained``), keyed by everything it depends on, and is built once, like
  the environment: the tiny model's init and the corpus are seeded by ``model.grounding_seed``,
  not by the run's seed.

It is not part of the paper's method, and a real checkpoint (``model.path``) skips it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

# Bumped whenever the stage would learn something else from the same settings (the prompt
# format, the answer text, the phantom generator, the stage's own code). 3: query last, number
# tokens, own corpus.
GROUNDING_VERSION = 3
# The corpus phantoms' random stream: run phantoms draw case i from [seed, i], the corpus from
# [seed, i, CORPUS_STREAM], a different stream for every seed.
CORPUS_STREAM = 1
# Written into the stand-in's folder last: its presence means the folder is complete.
MARKER = "medvol_grounding.json"


def grounding_key(cfg) -> str:
    """What the pretrained stand-in depends on, hashed: the tiny model, the corpus, the slice
    frame and the stage's settings (never a run's manifest or seed)."""
    from data.phantoms import SMALL_SHAPE
    from rollout.tiny_model import TINY_VERSION

    m, d = cfg.model, cfg.data
    parts = {
        "model": [m.tiny_size, m.grounding_seed, TINY_VERSION],
        "corpus": [m.grounding_cases, list(SMALL_SHAPE), CORPUS_STREAM],
        "slices": [d.num_slices, d.slice_size, d.window, d.suite_windows, d.min_box_area],
        "stage": [m.grounding_epochs, m.grounding_lr],
        "version": GROUNDING_VERSION,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def grounding_cache(cfg) -> Path:
    from common.runtime import CACHE_ROOT

    return Path(cfg.model.grounding_cache or CACHE_ROOT / "pretrained")


def pretrained_dir(cfg) -> Path:
    """Where the stand-in for ``cfg`` lives (built or not)."""
    return grounding_cache(cfg) / f"tiny-{cfg.model.tiny_size}-grounded-{grounding_key(cfg)}"


def explicit_query(label: str) -> str:
    return f"Segment the {label}."


def pretrained_tiny_model(cfg, progress: bool = True) -> Path:
    """The grounded tiny model for ``cfg``: reused from the cache when complete, else built
    (random tiny model, corpus phantoms, the stage) and left there. Returns its folder."""
    from common.runtime import file_lock

    out = pretrained_dir(cfg)
    with file_lock(out.with_name(out.name + ".lock")):
        if (out / MARKER).exists():
            return out
        from data.phantoms import SMALL_SHAPE, write_phantoms
        from rollout.tiny_model import build_tiny_qwen3vl

        work = out.with_name(f".{out.name}.work")
        shutil.rmtree(work, ignore_errors=True)
        tiny = build_tiny_qwen3vl(
            work / "tiny-model", cfg.model.tiny_size, cfg.model.grounding_seed
        )
        manifest = write_phantoms(
            work / "corpus",
            cfg.model.grounding_cases,
            seed=cfg.model.grounding_seed,
            shape=SMALL_SHAPE,
            progress=progress,
            stream=CORPUS_STREAM,
        )
        ground(tiny, manifest, cfg, out, work / "cache", progress)
        shutil.rmtree(work, ignore_errors=True)  # the corpus can be drawn again from its seed
    return out


def ground(
    model_dir: Path, manifest: Path, cfg, out_dir: Path, cache_dir: Path | None, progress: bool
) -> Path:
    """Train every weight of the model in ``model_dir`` on every row of ``manifest`` asked by
    name, for ``model.grounding_epochs`` epochs; write the result to ``out_dir``."""
    from dataclasses import replace

    from tqdm import tqdm
    from transformers import Qwen3VLForConditionalGeneration

    from data.dataset import VolumeDataset, anchorable
    from data.prompts import build_messages, sft_target_text
    from data.targets import evidence_target
    from learner.encoding import completion_logits, encode, target_ids, token_logprobs
    from rollout.prompting import load_processor

    seed = cfg.model.grounding_seed
    torch.manual_seed(seed)
    dataset = VolumeDataset(manifest, replace(cfg.data, cache_dir=cache_dir))  # every split
    usable, _ = anchorable(dataset)
    processor = load_processor(model_dir, cfg.data.slice_size)
    model = Qwen3VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.model.grounding_lr)
    epochs = cfg.model.grounding_epochs
    total = epochs * len(usable)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + np.cos(np.pi * min(step, total) / total))
    )
    top_k = cfg.data.key_slice_top_k(1)  # the largest slice: an unambiguous answer
    rng = np.random.default_rng(seed)
    desc = "grounding, the tiny model's stand-in for pretraining (once per machine)"
    bar = tqdm(total=total, desc=desc, disable=not progress)
    for _ in range(epochs):
        for i in rng.permutation(usable):
            sample, prepared = dataset[int(i)]
            anchor = evidence_target(prepared, top_k, rng, cfg.data.min_box_area)
            messages = build_messages(
                np.asarray(prepared.slices), explicit_query(sample.label), cfg.data.box_coords
            )
            target = sft_target_text(anchor, sample.label, cfg.data.slice_size, cfg.data.box_coords)
            answer = target_ids(processor, target)
            seq = encode(processor, messages, answer)
            logits = completion_logits(model, seq, model.device)
            loss = -token_logprobs(logits, seq.completion_ids).mean()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update(1)
    bar.close()
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    processor.save_pretrained(str(tmp))
    (tmp / MARKER).write_text(
        json.dumps({"key": grounding_key(cfg), "samples": len(usable), "epochs": epochs})
    )
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    log.info("grounded tiny model written to %s", out_dir)
    return out_dir
