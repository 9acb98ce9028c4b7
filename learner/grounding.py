"""A grounding stage standing for pretraining: full-parameter training of the tiny Qwen3-VL to
answer explicit organ names ("Segment the liver.") with evidence anchors, on training cases only.

A user of MedVol-R1 starts from a pretrained VLM (Qwen3-VL-4B) that can already see and name
organs and draw boxes; the paper's LoRA SFT and GRPO teach it the task on top. The tiny model the
embedded default builds is random: LoRA on a random, frozen vision tower has nothing to adapt.
This stage gives it, cheaply and in the open, what pretraining would: every weight (vision tower
included) trained on the training phantoms asked with the plain "Segment the <target>." query,
the key slice of largest area and its boxes as the answer. It never sees a test case, and never
the implicit phrasings SFT teaches. It is not part of the paper's method, and a real checkpoint
(``model.path``) skips it.

The result is a checkpoint folder built once and reused while its inputs are unchanged (like
the environment): keyed by the tiny model, the training rows, the slice shape and the settings.
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


def grounding_key(model_dir: Path, manifest: Path, cfg) -> str:
    """What the grounded model depends on, hashed: model identity, training rows, settings."""
    rows = [
        line
        for line in Path(manifest).read_text().splitlines()
        if line.strip() and json.loads(line).get("split") == "train"
    ]
    parts = {
        "model": json.loads((Path(model_dir) / "medvol_tiny.json").read_text()),
        "rows": hashlib.sha256("\n".join(rows).encode()).hexdigest(),
        "slices": [cfg.data.num_slices, cfg.data.slice_size, cfg.data.window],
        "grounding": [cfg.model.grounding_epochs, cfg.model.grounding_lr, cfg.seed],
        "version": 1,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def explicit_query(label: str) -> str:
    return f"Segment the {label}."


def ground(model_dir: Path, cfg, out_dir: Path, progress: bool = True) -> Path:
    """Train every weight of the model in ``model_dir`` on the training rows of
    ``cfg.data.manifest`` asked by name; write the result to ``out_dir`` (reused when complete
    for the same inputs). Returns the checkpoint folder."""
    from tqdm import tqdm
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    from data.dataset import VolumeDataset, anchorable
    from data.prompts import build_messages, sft_target_text
    from data.targets import evidence_target
    from learner.policy import completion_logits, encode, target_ids, token_logprobs

    out_dir = Path(out_dir)
    key = grounding_key(model_dir, cfg.data.manifest, cfg)
    marker = out_dir / "medvol_grounding.json"
    if marker.exists() and json.loads(marker.read_text()).get("key") == key:
        return out_dir
    torch.manual_seed(cfg.seed)
    dataset = VolumeDataset(cfg.data.manifest, cfg.data, split="train")
    usable, _ = anchorable(dataset)
    processor = AutoProcessor.from_pretrained(model_dir)
    model = Qwen3VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.model.grounding_lr)
    epochs = cfg.model.grounding_epochs
    total = epochs * len(usable)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + np.cos(np.pi * min(step, total) / total))
    )
    top_k = cfg.data.key_slice_top_k(1)  # the largest slice: an unambiguous answer
    rng = np.random.default_rng(cfg.seed)
    bar = tqdm(total=total, desc="grounding (stands for pretraining)", disable=not progress)
    for _ in range(epochs):
        for i in rng.permutation(usable):
            sample, prepared = dataset[int(i)]
            anchor = evidence_target(prepared, top_k, rng, cfg.data.min_box_area)
            messages = build_messages(np.asarray(prepared.slices), explicit_query(sample.label))
            answer = target_ids(processor, sft_target_text(anchor, sample.label))
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
    (tmp / "medvol_grounding.json").write_text(json.dumps({"key": key, "samples": len(usable)}))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    log.info("grounded model written to %s", out_dir)
    return out_dir
