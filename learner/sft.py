"""The LoRA cold start: supervised fine-tuning on evidence anchors built from the masks.

    python -m learner.sft --config configs/<run>.yaml [key=value ...] [--resume] [--print-config]
        [--corrections DIR/corrections.jsonl ...]

For every training sample: the 64 tagged slices and the query, then the target answer (short
reasoning, a Top-K key slice and the boxes of the mask's components on it). The loss is the
token-mean cross-entropy over the answer tokens only. Writes ``<output_dir>/sft/adapter`` (a peft
adapter with the processor), logs loss and learning rate to MLflow, checkpoints every
``sft.checkpoint_every`` steps under ``<output_dir>/sft/checkpoints`` and resumes from the latest
with ``--resume``. The adapter and every checkpoint carry ``medvol.json``, the frame they were
trained in (learner.training_frame).

``--corrections FILE`` (repeatable; evaluation.review's ``corrections.jsonl``): a training
sample a reviewer corrected is trained on the corrected answer (its anchor and reasoning, written
by data.answer's formatter) with the correction's query, in place of its Top-K target; rows are
read by :mod:`data.corrections`, and one that is malformed or names a case outside the training
split stops the command before the model loads, naming the file, line and field. A corrected
sample whose mask anchors nothing on the sampled slices is trained too: the reviewer gave it an
anchor.
"""

from __future__ import annotations

import logging
import random
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.cli import (
    ArgumentParser,
    UsageError,
    add_config_arguments,
    command,
    command_config,
    existing_file,
    log_to_file,
    resolve_device,
)
from common.config import RunConfig, to_dict
from common.runtime import set_default_environment
from common.tracking import Tracker, flatten
from data.corrections import Correction, correction_text, read_corrections
from data.dataset import VolumeDataset, anchorable
from data.prompts import build_messages, sft_target_text
from data.targets import evidence_target
from learner.adapters import save_adapter
from learner.encoding import completion_logits, encode, target_ids, token_logprobs
from learner.engine import (
    adapter_grad_norm,
    all_finite,
    build_engine,
    deepspeed_config,
    load_lora_policy,
    resolve_precision,
    setup_rank,
    skip_update,
)
from learner.training_frame import TrainingFrame

log = logging.getLogger(__name__)


def model_path(cfg: RunConfig, progress: bool = True) -> Path:
    """The checkpoint folder to train: the configured one; else the tiny model's stand-in for a
    pretrained checkpoint, built once per machine (``model.grounding_epochs`` > 0: see
    learner.grounding); else a random tiny model built under ``output_dir``."""
    if cfg.model.path is not None:
        return Path(cfg.model.path)
    if cfg.model.grounding_epochs > 0:
        from learner.grounding import pretrained_tiny_model

        return pretrained_tiny_model(cfg, progress)
    from rollout.tiny_model import build_tiny_qwen3vl

    return build_tiny_qwen3vl(Path(cfg.output_dir) / "tiny-model", cfg.model.tiny_size, cfg.seed)


def sft_examples(
    dataset: VolumeDataset,
    indices: list[int],
    top_k: int,
    seed: int,
    epoch: int,
    resample_queries: bool = False,
    corrections: dict[str, Correction] | None = None,
):
    """(messages, target text) for the given samples, anchors (and with ``resample_queries``
    the query phrasings) drawn with a per-epoch seed; a sample in ``corrections`` (by id) takes
    its correction instead."""
    rng = np.random.default_rng([seed, epoch])
    corrections = corrections or {}
    for i in indices:
        correction = corrections.get(dataset.samples[i].id)
        yield sft_example(dataset, i, top_k, rng, resample_queries, correction)


def sft_example(
    dataset: VolumeDataset,
    index: int,
    top_k: int,
    rng: np.random.Generator,
    resample_queries: bool = False,
    correction: Correction | None = None,
) -> tuple[list[dict], str]:
    """(messages, target text) of one training sample: a Top-K key slice and its boxes drawn
    with ``rng``, and with ``resample_queries`` a training phrasing of its target drawn too. A
    ``correction`` replaces both: its query, and its corrected answer as the target."""
    from data.queries import training_query

    sample, prepared = dataset[index]
    size, coords = dataset.cfg.slice_size, dataset.cfg.box_coords
    slices = np.asarray(prepared.slices)
    if correction is not None:
        cold_start = sft_target_text(correction.anchor, sample.label, size, coords)
        return (
            build_messages(slices, correction.query, coords),
            correction_text(correction, cold_start, size, coords),
        )
    anchor = evidence_target(prepared, top_k, rng, dataset.cfg.min_box_area)
    query = training_query(sample, resample_queries, rng)
    target = sft_target_text(anchor, sample.label, size, coords)
    return build_messages(slices, query, coords), target


def shard(dataset: VolumeDataset, seed: int, rank: int, world: int) -> tuple[list[int], int]:
    """Samples that can anchor an answer (the others skipped with a warning), and how many each
    of ``world`` processes takes per epoch (equal counts, so the processes' gradient
    all-reduces stay in step)."""
    valid, skipped = anchorable(dataset)
    for sample_id in skipped:
        log.warning("skipping %s: no box of its target on any sampled slice", sample_id)
    return valid, len(valid) // world


def epoch_order(valid: list[int], per_rank: int, seed: int, epoch: int, rank: int) -> list[int]:
    order = list(valid)
    random.Random(seed * 1000 + epoch).shuffle(order)
    return order[rank * per_rank : (rank + 1) * per_rank]


def training_corrections(
    dataset: VolumeDataset, paths: list[Path], valid: list[int]
) -> tuple[dict[str, Correction], list[int]]:
    """The corrections of ``paths`` for the training split, and ``valid`` with the corrected
    samples that have no anchor of their own added (in dataset order)."""
    if not paths:
        return {}, valid
    cfg = dataset.cfg
    corrections = read_corrections(
        paths,
        cfg.num_slices,
        cfg.slice_size,
        {s.id for s in dataset.samples},
        f"the training split of {cfg.manifest}",
    )
    index = {s.id: i for i, s in enumerate(dataset.samples)}
    added = sorted(set(index[c] for c in corrections) - set(valid))
    log.info(
        "%d corrected training samples from %s (%d without an anchor of their own)",
        len(corrections),
        ", ".join(map(str, paths)),
        len(added),
    )
    return corrections, sorted([*valid, *added])


def train_sft(
    cfg: RunConfig,
    resume: bool = False,
    progress: bool = True,
    corrections: list[Path] | None = None,
) -> Path:
    """Run the cold start; returns the adapter folder. ``corrections``: corrections.jsonl
    files whose corrected anchors replace their samples' targets (module docstring)."""
    set_default_environment()
    out = Path(cfg.output_dir) / "sft"
    ckpt_dir = out / "checkpoints"
    s = cfg.sft
    ranks = setup_rank()  # torchrun's (or the deepspeed launcher's) ranks, else rank 0 of 1
    rank, world = ranks.rank, ranks.world
    lead = rank == 0  # logs, shows progress and writes the adapter
    dataset = VolumeDataset(cfg.data.manifest, cfg.data, split="train")
    top_k = cfg.data.key_slice_top_k()
    valid, per_rank = shard(dataset, cfg.seed, rank, world)
    corrected, valid = training_corrections(dataset, list(corrections or []), valid)
    per_rank = len(valid) // world
    steps_per_epoch = per_rank // s.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"{cfg.data.manifest}: {len(valid)} usable training samples are too few "
            f"for {world} process(es) x batch {s.batch_size}"
        )
    total = steps_per_epoch * s.epochs
    if s.max_steps is not None:
        total = min(total, s.max_steps)
    precision = resolve_precision(s.precision)
    base = model_path(cfg)
    frame = TrainingFrame.of_run(cfg.data, base)  # the adapter's and checkpoints' medvol.json
    init = Path(s.init_adapter) if s.init_adapter else None
    if init is not None and not (init / "adapter_config.json").is_file():
        raise UsageError(
            f"sft.init_adapter: {init}: not a LoRA adapter folder (no adapter_config.json)"
        )
    model, processor = load_lora_policy(
        base,
        s.lora,
        precision,
        s.gradient_checkpointing,
        init_adapter=init,
        slice_size=cfg.data.slice_size,
    )
    engine = build_engine(
        model,
        deepspeed_config(s.lr, s.weight_decay, s.grad_clip, s.zero_stage, precision, s.batch_size),
        total,
        s.warmup_ratio,
    )
    # Training mode: LoRA dropout applies and gradient checkpointing takes effect (transformers
    # checkpoints only in training mode).
    engine.module.train()
    step, run_id = 0, None
    if resume and (ckpt_dir / "latest").exists():
        _, state = engine.load_checkpoint(str(ckpt_dir), load_module_strict=False)
        step, run_id = state["step"], state.get("mlflow_run_id")
        log.info("resuming SFT at step %d", step)
    tracker = None
    if lead:
        tracker = Tracker(
            cfg.tracking.tracking_uri,
            cfg.tracking.experiment,
            f"{cfg.tracking.run_name or Path(cfg.output_dir).name}-sft",
            run_id,
        )
        if run_id is None:
            tracker.log_params(flatten(to_dict(cfg)))
            if corrected:
                tracker.log_params({"sft.corrections": ", ".join(map(str, corrections))})
    bar = tqdm(total=total, initial=step, desc="SFT", disable=not (progress and lead))
    done = step * s.batch_size  # sequences already trained on (the data position)
    seen, losses = 0, []
    for epoch in range(s.epochs):
        mine = epoch_order(valid, per_rank, cfg.seed, epoch, rank)[: steps_per_epoch * s.batch_size]
        for messages, text in sft_examples(
            dataset, mine, top_k, cfg.seed, epoch, cfg.data.resample_queries, corrected
        ):
            if step >= total:
                break
            seen += 1
            if seen <= done:
                continue  # skip what the checkpoint already covered
            seq = encode(processor, messages, target_ids(processor, text))
            logits = completion_logits(engine, seq, engine.device)
            loss = -token_logprobs(logits, seq.completion_ids).mean()
            engine.backward(loss)
            losses.append(loss.item())
            if len(losses) < s.batch_size:
                engine.step()  # counts the micro-batch; the optimizer waits
            elif all_finite(engine, sum(losses), adapter_grad_norm(engine)):
                engine.step()  # the batch's end: the optimizer steps
            else:  # one NaN would poison the adapter: skipped (learner.engine.skip_update)
                log.warning("SFT step %d skipped: loss or gradient not finite", step + 1)
                skip_update(engine)
            if len(losses) == s.batch_size:
                step += 1
                mean = float(np.mean(losses))
                losses = []
                if tracker is not None:
                    tracker.log_metrics(
                        {
                            "sft/loss": mean,
                            "sft/lr": engine.get_lr()[0],
                            # DeepSpeed's count, kept in its checkpoints: cumulative over resumes
                            "sft/skipped_steps": engine.skipped_steps,
                        },
                        step,
                    )
                bar.set_postfix(loss=f"{mean:.3f}")
                bar.update(1)
                if step % s.checkpoint_every == 0 or step == total:
                    if lead:  # before DeepSpeed's files, so a complete checkpoint has it
                        (ckpt_dir / f"step{step}").mkdir(parents=True, exist_ok=True)
                        frame.write(ckpt_dir / f"step{step}")
                    engine.save_checkpoint(
                        str(ckpt_dir),
                        tag=f"step{step}",
                        client_state={
                            "step": step,
                            "mlflow_run_id": tracker.run_id if tracker else None,
                        },
                        exclude_frozen_parameters=True,
                    )
    bar.close()
    adapter = save_adapter(engine, processor, out / "adapter", write=lead, frame=frame)
    if tracker is not None:
        tracker.end()
    log.info("SFT adapter written to %s", adapter)
    return adapter


@command()
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m learner.sft", description=__doc__.split("\n")[0])
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument(
        "--corrections",
        action="append",
        type=existing_file,
        metavar="FILE",
        help="a review's corrections.jsonl: its corrected anchors are the targets of their "
        "training samples (repeatable)",
    )
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    cfg = command_config(args)
    if cfg.data.manifest is None:
        raise UsageError("data.manifest: not set (in the config or as data.manifest=PATH)")
    if not Path(cfg.data.manifest).is_file():
        raise UsageError(f"data.manifest: {cfg.data.manifest}: no such file")
    resolve_device(None)  # tells DeepSpeed the accelerator instead of letting it guess and warn
    log_to_file(Path(cfg.output_dir) / "sft" / "sft.log")
    torch.manual_seed(cfg.seed)
    adapter = train_sft(cfg, resume=args.resume, corrections=args.corrections)
    print(f"SFT adapter: {adapter}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
