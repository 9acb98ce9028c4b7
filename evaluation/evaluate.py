"""Evaluation in the shape of the paper's Table 1: voxel DSC / IoU per dataset, one row per policy
checkpoint, plus an oracle-anchor row per propagator.

    python -m evaluation.evaluate --config configs/<run>.yaml [--checkpoint NAME=ADAPTER ...]
        [--split test] [--propagator baseline --propagator medsam2] [--workers 2] [key=value ...]

For every case of the split: the policy answers greedily (an evidence anchor), the propagator
runs through the whole volume in both directions from the anchor, the mask is mapped back to the
source grid and compared with the ground truth there. The oracle row prompts the propagator with
the true anchor (the largest slice and its component boxes): the ceiling propagation can give.
Cases are scored in parallel on Ray; each result is appended to ``cases.jsonl`` as it arrives,
and a re-run skips what is already there (resume). Writes ``table.md`` and ``table.csv``.
Without ``--checkpoint``: rows for the base model, ``<output_dir>/sft/adapter`` and
``<output_dir>/grpo/adapter`` when they exist.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from cluster.config import RunConfig, load_run_config
from cluster.runtime import set_default_environment

log = logging.getLogger(__name__)

SUITE_NAMES = {"ctorg": "CT-ORG", "abdomenct1k": "AbdomenCT-1K", "kits23": "KiTS23"}


@dataclass(frozen=True)
class CaseJob:
    row: str  # table row: a checkpoint name or "oracle anchor (<propagator>)"
    sample_id: str
    key_slice: int | None  # None: the policy's answer was malformed (empty mask)
    boxes: tuple
    failure: str | None = None


class CaseScorer:
    """Propagates an anchor through a whole volume and scores it on the source grid."""

    def __init__(self, manifest: str, data_cfg, reward_cfg, propagator: str):
        set_default_environment()
        from data.dataset import VolumeDataset
        from reward_server.propagation import build_propagator

        self.dataset = VolumeDataset(manifest, data_cfg, check_labels=False)
        checkpoint = reward_cfg.checkpoint if propagator == "medsam2" else None
        self.propagator = build_propagator(propagator, checkpoint, reward_cfg.image_size)

    def score(self, job: CaseJob) -> dict:
        from data.preprocess import to_source_grid
        from data.volume import load_volume
        from evaluation.metrics import dsc, iou

        sample, prepared = self.dataset.by_id(job.sample_id)
        labels = load_volume(sample.mask, "mask").array
        truth = np.isin(labels, self.dataset.label_values(sample.id))
        if job.key_slice is None:
            pred = np.zeros_like(truth)
        else:
            mask = self.propagator.propagate(
                sample.id, np.asarray(prepared.slices), job.key_slice, job.boxes, None
            )
            pred = to_source_grid(mask, prepared)
        return {
            "row": job.row,
            "id": sample.id,
            "suite": sample.suite,
            "dsc": dsc(pred, truth),
            "iou": iou(pred, truth),
            "failure": job.failure,
            "propagator": self.propagator.name,
        }


def policy_answers(model_path: Path, adapter: Path | None, cfg: RunConfig, samples) -> list[str]:
    """Greedy answers of a checkpoint for (Sample, PreparedVolume) pairs."""
    from data.prompts import build_messages
    from rollout.actor import build_engine
    from rollout.records import RolloutPrompt, WeightUpdate

    rollout = cfg.rollout
    if adapter is not None and rollout.engine == "vllm" and rollout.enable_lora:
        from rollout.vllm_engine import lora_rank_to_serve

        # a GRPO run's final adapter stacks SFT and GRPO ranks
        rollout = replace(rollout, max_lora_rank=lora_rank_to_serve(adapter, rollout.max_lora_rank))
    engine = build_engine(model_path, rollout, cfg.model)
    if adapter is not None:
        engine.update_weights(WeightUpdate(1, adapter_dir=adapter))
    prompts = [
        RolloutPrompt(s.id, build_messages(np.asarray(p.slices), s.query)) for s, p in samples
    ]
    groups = engine.generate(prompts, greedy=True)
    del engine
    return [g.completions[0].text for g in groups]


def anchor_jobs(row: str, samples, texts: list[str]) -> list[CaseJob]:
    from data.answer import ParsedAnswer, parse_answer

    jobs = []
    for (sample, prepared), text in zip(samples, texts):
        parsed = parse_answer(text, prepared.num_slices, prepared.size)
        if isinstance(parsed, ParsedAnswer):
            jobs.append(CaseJob(row, sample.id, parsed.anchor.key_slice, parsed.anchor.boxes))
        else:
            jobs.append(CaseJob(row, sample.id, None, (), parsed.reason))
    return jobs


def oracle_jobs(row: str, samples, min_area: int, top_k: int = 1) -> list[CaseJob]:
    from data.targets import EmptyTargetError, evidence_target

    jobs = []
    for sample, prepared in samples:
        try:
            anchor = evidence_target(prepared, top_k, np.random.default_rng(0), min_area)
        except EmptyTargetError as err:
            jobs.append(CaseJob(row, sample.id, None, (), str(err)))
            continue
        jobs.append(CaseJob(row, sample.id, anchor.key_slice, anchor.boxes))
    return jobs


def table(results: list[dict], rows: list[str]) -> tuple[str, list[list[str]]]:
    """Markdown and CSV rows: mean DSC / IoU (x100) per dataset, one row per table row."""
    suites = sorted(
        {r["suite"] for r in results},
        key=lambda s: list(SUITE_NAMES).index(s) if s in SUITE_NAMES else 99,
    )
    header = (
        ["checkpoint"]
        + [f"{SUITE_NAMES.get(s, s)} {m}" for s in suites for m in ("DSC", "IoU")]
        + ["cases", "malformed"]
    )
    body = []
    for row in rows:
        mine = [r for r in results if r["row"] == row]
        if not mine:
            continue
        cells = [row]
        for suite in suites:
            vals = [r for r in mine if r["suite"] == suite]
            for metric in ("dsc", "iou"):
                cells.append(f"{100 * np.mean([v[metric] for v in vals]):.2f}" if vals else "-")
        cells += [str(len(mine)), str(sum(1 for r in mine if r.get("failure")))]
        body.append(cells)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines), [header] + body


def evaluate(
    cfg: RunConfig,
    checkpoints: dict[str, Path | None],
    out_dir: Path,
    split: str = "test",
    propagators: tuple[str, ...] = ("baseline",),
    oracle: bool = True,
    workers: int = 2,
    progress: bool = True,
) -> str:
    """Run the evaluation; returns the markdown table (also written as table.md / table.csv)."""
    import ray
    from ray.util import ActorPool
    from tqdm import tqdm

    from data.dataset import VolumeDataset
    from learner.sft import model_path

    out_dir.mkdir(parents=True, exist_ok=True)
    cases_file = out_dir / "cases.jsonl"
    done = (
        [json.loads(line) for line in cases_file.read_text().splitlines()]
        if cases_file.exists()
        else []
    )
    seen = {(r["row"], r["id"]) for r in done}
    dataset = VolumeDataset(cfg.data.manifest, cfg.data, split=split)
    samples = [dataset[i] for i in range(len(dataset))]
    base = model_path(cfg)
    jobs_by_propagator: dict[str, list[CaseJob]] = {p: [] for p in propagators}
    rows: list[str] = []
    for prop in propagators if oracle else ():
        row = f"oracle anchor ({prop})"
        rows.append(row)
        jobs_by_propagator[prop] += oracle_jobs(row, samples, cfg.data.min_box_area)
    for name, adapter in checkpoints.items():
        row = name if len(propagators) == 1 else f"{name} ({propagators[0]})"
        rows.append(row)
        todo = [(s, p) for s, p in samples if (row, s.id) not in seen]
        if todo:
            texts = policy_answers(base, adapter, cfg, todo)
            jobs_by_propagator[propagators[0]] += anchor_jobs(row, todo, texts)
    started = ray.is_initialized()
    if not started:
        ray.init(num_cpus=max(2, workers), include_dashboard=False, log_to_driver=False)
    try:
        with cases_file.open("a") as sink:
            for prop, jobs in jobs_by_propagator.items():
                jobs = [j for j in jobs if (j.row, j.sample_id) not in seen]
                if not jobs:
                    continue
                actors = [
                    ray.remote(CaseScorer)
                    .options(num_cpus=1)
                    .remote(str(cfg.data.manifest), cfg.data, cfg.reward, prop)
                    for _ in range(workers)
                ]
                pool = ActorPool(actors)
                for result in tqdm(
                    pool.map_unordered(lambda a, j: a.score.remote(j), jobs),
                    total=len(jobs),
                    desc=f"evaluate ({prop})",
                    disable=not progress,
                ):
                    sink.write(json.dumps(result) + "\n")
                    sink.flush()
                    done.append(result)
                for actor in actors:
                    ray.kill(actor)
    finally:
        if not started:
            ray.shutdown()
    markdown, csv_rows = table(done, rows)
    (out_dir / "table.md").write_text(markdown + "\n")
    with (out_dir / "table.csv").open("w", newline="") as f:
        csv.writer(f).writerows(csv_rows)
    return markdown


def default_checkpoints(cfg: RunConfig) -> dict[str, Path | None]:
    out = Path(cfg.output_dir)
    rows: dict[str, Path | None] = {"base": None}
    if (out / "sft" / "adapter").exists():
        rows["SFT"] = out / "sft" / "adapter"
    if (out / "grpo" / "adapter").exists():
        rows["SFT+RL"] = out / "grpo" / "adapter"
    return rows


def main(argv: list[str] | None = None) -> int:
    set_default_environment()
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.evaluate", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", type=Path)
    parser.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="NAME=ADAPTER",
        help="a table row: NAME=path of a LoRA adapter, or NAME=base",
    )
    parser.add_argument("--split", default="test")
    parser.add_argument("--propagator", action="append", choices=["baseline", "medsam2"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-oracle", action="store_true")
    parser.add_argument("--out", type=Path, help="default: <output_dir>/eval")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_run_config(args.config, args.overrides)
    checkpoints: dict[str, Path | None] = {}
    for item in args.checkpoint:
        name, _, path = item.partition("=")
        checkpoints[name] = None if path in ("", "base") else Path(path)
    markdown = evaluate(
        cfg,
        checkpoints or default_checkpoints(cfg),
        args.out or Path(cfg.output_dir) / "eval",
        args.split,
        tuple(args.propagator or [cfg.reward.propagator]),
        not args.no_oracle,
        args.workers,
    )
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
