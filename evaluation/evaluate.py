"""Evaluation in the shape of the paper's Table 1: voxel DSC / IoU per dataset, one row per policy
checkpoint, plus an oracle-anchor row per propagator, with 95% confidence intervals; and the
surface metrics imaging people expect, NSD and HD95, in mm where the scan's voxel size is known.

    python -m evaluation.evaluate --config configs/<run>.yaml [--adapter NAME=ADAPTER ...]
        [--split test] [--propagator baseline --propagator medsam2] [--workers 2]
        [--phrasings held-out|training|both] [--compare SFT:SFT+RL] [--device cpu|cuda]
        [--samples N [--temperature T] [--seed N]]
        [--out-dir DIR] [--print-config] [-v] [--debug] [key=value ...]

For every case of the split: the policy answers greedily (an evidence anchor), the propagator
runs through the whole volume in both directions from the anchor, the mask is mapped back to the
source grid and compared with the ground truth there. The oracle row prompts the propagator with
the true anchor (the largest slice and its component boxes): the ceiling propagation can give.
Cases are scored in parallel by ``--workers`` Ray actors (0: in this process, without Ray); each
result is appended to ``cases.jsonl`` as it arrives, and a re-run skips what is already there
(resume). Writes ``table.md`` and ``table.csv``.

Surface units: NIfTI and DICOM scans carry their voxel size, so NSD's tolerance and HD95 are in
mm. M3D-Seg arrays carry none: a manifest row's ``spacing`` gives it (mm), else both are in
voxels (the tolerance of ``evaluation.nsd_tolerance_mm`` then counts voxels). Each cases.jsonl row
says which in ``surface_unit`` (``"mm"`` or ``"voxel"``), next to its ``spacing`` and
``nsd_tolerance`` in that unit; the table's HD95 columns are headed with the unit, and a mean
over suites measured in different units is left out ("-").

Queries: test cases are asked with the held-out phrasings of the manifest (``held-out``, the
paper's setting; rows named ``NAME (held-out phrasings)``), or with one training phrasing per
case (``training``: a phrasing the policy has seen, on a case it has not; drawn by a seed made
from the case id, never chosen by results; rows named ``NAME``), or both. A row's name says its
phrasing set whatever the flag, and the table's first line says so. The table's mean is the
mean over suites of each suite's mean DSC, with a CI from a bootstrap that resamples scans
within each suite (``evaluation.stats``);
``--compare A:B`` adds the paired difference B - A per case, with its CI
(``comparisons.json``).
Self-consistency: ``--samples N`` (above 1) also draws N answers per case from each checkpoint
at ``--temperature`` (default ``rollout.temperature``), seeded from ``--seed``, propagates each
and scores their voxel majority (a malformed answer counts as an empty mask; as
``evaluation.predict --samples``) in a row ``<checkpoint> (consensus of N)``; its cases.jsonl
rows add ``agreement`` (the mean pairwise Dice of the N masks on the policy's frame),
``num_samples`` and ``anchors`` (every draw, as predict's evidence.json), and their anchor is
the well-formed draw closest to the consensus. The greedy row is compared with the consensus
row (paired, as ``--compare``), and ``agreement.json`` holds, per consensus row, Spearman's
rho between agreement and DSC over the cases with a 95% CI that resamples scans: whether a low
agreement flags a poor mask.
Without ``--adapter``: rows for the base model, ``<output_dir>/sft/adapter`` and
``<output_dir>/grpo/adapter`` when they exist. One rollout engine answers for every checkpoint:
it serves the bare base first, then each adapter swapped in on it (vLLM takes adapters live, so
its start is paid once per evaluation, not once per row). An adapter's ``medvol.json``
(learner.training_frame) must agree with the config's data settings (slices, size, windows,
m3d_intensity): one that does not stops the evaluation with both values named, one trained on
another base is a warning, and an adapter without it (written before it existed) is evaluated
as configured, with a warning. ``--device`` runs the policy
(transformers engine) and the propagator on the CPU or the GPU (default: the GPU when there is
one). The log goes to ``<out-dir>/evaluate.log`` (default ``<output_dir>/eval``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from common.cli import (
    ArgumentParser,
    UsageError,
    add_config_arguments,
    add_device_argument,
    command,
    command_config,
    log_to_file,
    resolve_device,
)
from common.config import DataConfig, EvaluationConfig, RunConfig
from common.runtime import set_default_environment
from learner.training_frame import FILE_NAME as FRAME_FILE
from learner.training_frame import TrainingFrame, TrainingFrameError, base_model_digest

log = logging.getLogger(__name__)

SUITE_NAMES = {"ctorg": "CT-ORG", "abdomenct1k": "AbdomenCT-1K", "kits23": "KiTS23"}


@dataclass(frozen=True)
class CaseJob:
    row: str  # table row: a checkpoint name or "oracle anchor (<propagator>)"
    sample_id: str
    key_slice: int | None  # None: the policy's answer was malformed (empty mask)
    boxes: tuple
    failure: str | None = None
    answer: str | None = None  # the policy's text (None for an oracle anchor)
    # A consensus row's job: the N drawn answers' jobs, whose masks are voted (the fields
    # above are then the representative's: the well-formed sample closest to the consensus).
    samples: tuple[CaseJob, ...] = ()


class CaseScorer:
    """Propagates an anchor through a whole volume and scores it on the source grid."""

    def __init__(
        self,
        manifest: str,
        data_cfg,
        reward_cfg,
        propagator: str,
        eval_cfg: EvaluationConfig | None = None,
        device: str = "cpu",
    ):
        set_default_environment()
        from data.dataset import VolumeDataset
        from reward_server.propagation import build_propagator

        self.dataset = VolumeDataset(manifest, data_cfg, check_labels=False)
        self.eval_cfg = eval_cfg or EvaluationConfig()
        checkpoint = reward_cfg.checkpoint if propagator == "medsam2" else None
        self.propagator = build_propagator(
            propagator, checkpoint, reward_cfg.image_size, device=device
        )

    def score(self, job: CaseJob) -> dict:
        from data.preprocess import to_source_grid
        from data.volume import load_volume, surface_spacing
        from evaluation.metrics import dsc, hd95, iou, nsd

        sample, prepared = self.dataset.by_id(job.sample_id)
        labels = load_volume(sample.mask, "mask", sample.m3d_axes)
        spacing, unit = surface_spacing(labels, sample.spacing)
        truth = np.isin(labels.array, self.dataset.label_values(sample.id))
        drawn = {}
        if job.samples:
            job, mask, drawn = self._consensus(job, sample.id, prepared)
            pred = to_source_grid(mask, prepared)
        elif job.key_slice is None:
            pred = np.zeros_like(truth)
        else:
            pred = to_source_grid(self._frame_mask(job, sample.id, prepared), prepared)
        tolerance = self.eval_cfg.nsd_tolerance_for(sample.suite)
        return {
            "row": job.row,
            "id": sample.id,
            "suite": sample.suite,
            "dsc": dsc(pred, truth),
            "iou": iou(pred, truth),
            "nsd": nsd(pred, truth, spacing, tolerance),
            "nsd_tolerance": tolerance,
            "hd95": hd95(pred, truth, spacing),
            "spacing": [round(s, 4) for s in spacing],
            "surface_unit": unit,
            "key_slice": job.key_slice,
            "boxes": [list(b) for b in job.boxes],
            "failure": job.failure,
            "propagator": self.propagator.name,
            **({"answer": job.answer} if job.answer is not None else {}),
            **drawn,
        }

    def _frame_mask(self, job: CaseJob, sample_id: str, prepared) -> np.ndarray:
        """The mask of a job's anchor on the policy's frame (empty for a malformed answer)."""
        if job.key_slice is None:
            return np.zeros(np.shape(prepared.slices), bool)
        mask = self.propagator.propagate(
            sample_id, np.asarray(prepared.slices), job.key_slice, job.boxes, None
        )
        return np.asarray(mask, bool)

    def _consensus(self, job: CaseJob, sample_id: str, prepared):
        """A consensus job's representative, its voxel-majority mask on the frame, and what
        the row records of the draws: their agreement (mean pairwise Dice) and anchors."""
        from evaluation.metrics import Draw, consensus_of_draws

        masks = [self._frame_mask(s, sample_id, prepared) for s in job.samples]
        draws = [Draw(s.answer, s.key_slice, s.boxes, s.failure) for s in job.samples]
        found = consensus_of_draws(draws, masks)
        if found.representative is not None:
            shown = replace(job.samples[found.representative], row=job.row, samples=())
        else:
            reason = job.samples[0].failure
            shown = replace(
                job,
                samples=(),
                failure=f"none of the {len(masks)} sampled answers parses (first: {reason})",
                answer=job.samples[0].answer,
            )
        drawn = {
            "num_samples": len(masks),
            "agreement": round(found.agreement, 4),
            "anchors": found.anchors,
        }
        return shown, found.mask, drawn


PHRASING_SUFFIX = " (held-out phrasings)"
# The table's first line: which rows are the paper's setting.
ROWS_NOTE = (
    "Rows `NAME (held-out phrasings)` ask with the split's held-out phrasings, which training "
    "never used: the paper's setting. Rows `NAME` ask with one training phrasing per case."
)


def resolve_phrasings(phrasings: str | None, split: str) -> str:
    """``held-out``, ``training`` or ``both``; None: held-out, or training for the train split
    (whose manifest queries are training phrasings, so it has no held-out ones)."""
    if phrasings is None:
        return "training" if split == "train" else "held-out"
    if phrasings not in ("held-out", "training", "both"):
        raise ValueError(f"phrasings must be held-out, training or both, got {phrasings!r}")
    if split == "train" and phrasings != "training":
        raise UsageError(
            f"--phrasings {phrasings}: the train split's queries are training phrasings; "
            "use --phrasings training"
        )
    return phrasings


def settings_key(cfg: RunConfig, split: str) -> str:
    """Digest of every setting a case result depends on besides the checkpoint: the data, the
    propagation, the metrics and the split."""
    import hashlib

    from common.config import to_dict

    settings = {
        "split": split,
        "data": to_dict(cfg.data),
        "reward": to_dict(cfg.reward),
        "evaluation": to_dict(cfg.evaluation),
        "rollout": to_dict(cfg.rollout),
    }
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def checkpoint_key(base: Path, adapter: Path | None, cache_dir: Path | None) -> str:
    """Digest of a checkpoint's weights (the base model's files, and the adapter's): a re-run
    reuses a case result only if it was computed from these very weights. Each file is hashed
    once per version (``data.preprocess.content_digest``)."""
    import hashlib

    from data.preprocess import content_digest

    digest = hashlib.sha256()
    folders = [Path(base)] + ([Path(adapter)] if adapter is not None else [])
    for folder in folders:
        for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*config.json")):
            digest.update(f"{path.name}:{content_digest(path, cache_dir)}\n".encode())
    return digest.hexdigest()[:16]


def check_adapter_frames(data: DataConfig, checkpoints: dict[str, Path | None]) -> None:
    """Each adapter's medvol.json (learner.training_frame) against the run config's data
    settings: one that contradicts them (slices, size, windows, m3d_intensity) stops the
    evaluation with an error naming both values; an adapter without one (written before it
    existed) is evaluated as configured, with a warning."""
    for name, adapter in checkpoints.items():
        if adapter is None:
            continue
        try:
            frame = TrainingFrame.read_if_any(adapter)
        except TrainingFrameError as err:
            raise UsageError(f"--adapter {name}={adapter}: {err}") from None
        if frame is None:
            log.warning(
                "--adapter %s=%s: no %s (an adapter from before it); evaluated with the "
                "config's data settings, which must be those it was trained with",
                name,
                adapter,
                FRAME_FILE,
            )
            continue
        conflicts = frame.conflicts(data)
        if conflicts:
            raise UsageError(f"--adapter {name}={adapter}: " + "; ".join(conflicts))


def warn_other_base(base: Path, checkpoints: dict[str, Path | None]) -> None:
    """A warning for each adapter whose medvol.json names a base other than ``base``."""
    digest = None
    for name, adapter in checkpoints.items():
        frame = TrainingFrame.read_if_any(adapter) if adapter is not None else None
        if frame is None:
            continue
        digest = digest or base_model_digest(base)
        if frame.base_model_sha256 != digest:
            log.warning(
                "--adapter %s=%s: trained on the base %s (%s), not on %s (config.json or "
                "weight files differ)",
                name,
                adapter,
                frame.base_model,
                FRAME_FILE,
                base,
            )


def with_training_phrasing(sample):
    """The sample asked with one of its target's training phrasings, drawn by a seed made from
    the case id (the same phrasing every run, whatever the results)."""
    import zlib

    from data.queries import sample_query

    rng = np.random.default_rng(zlib.crc32(sample.id.encode()))
    return replace(sample, query=sample_query(sample.label, "train", rng))


def policy_engine(
    model_path: Path,
    cfg: RunConfig,
    adapters: Iterable[Path | None] = (),
    device: str | None = None,
):
    """A rollout engine serving the bare base, able to take each of ``adapters`` in turn. On
    vLLM its max LoRA rank covers the largest of them (a GRPO run's final adapter stacks SFT
    and GRPO ranks). ``device`` places the transformers engine (default: the GPU when there is
    one); vLLM runs where its build runs."""
    from rollout.actor import build_engine

    rollout = cfg.rollout
    adapters = [Path(a) for a in adapters if a is not None]
    if adapters and rollout.engine == "vllm" and rollout.enable_lora:
        from rollout.vllm_engine import lora_rank_to_serve

        rank = max(lora_rank_to_serve(a, rollout.max_lora_rank) for a in adapters)
        rollout = replace(rollout, max_lora_rank=rank)
    if rollout.engine == "transformers" and device is not None:
        from rollout.hf_engine import TransformersEngine

        return TransformersEngine(model_path, rollout, cfg.model, device=device)
    return build_engine(model_path, rollout, cfg.model)


# Prompts per generate call: a prompt of 64 slices of 256 px carries ~100 MB of pixels through
# the processor and vLLM, so a test split is generated in chunks, not all at once.
GENERATE_CHUNK = 16


def generate_in_chunks(
    engine, samples, seed: int | None = None, box_coords: str = "pixels", **kwargs
) -> list:
    """The engine's groups for every sample, in order, generated ``GENERATE_CHUNK`` at a time
    (boxes asked for in ``box_coords``, data.box_coords); a ``seed`` seeds the chunk starting at
    sample i with ``seed + i``."""
    groups = []
    for start in range(0, len(samples), GENERATE_CHUNK):
        chunk = prompts_of(samples[start : start + GENERATE_CHUNK], box_coords)
        if seed is not None:
            kwargs["seed"] = seed + start
        groups += engine.generate(chunk, **kwargs)
    return groups


def prompts_of(samples, box_coords: str = "pixels") -> list:
    from data.prompts import build_messages
    from rollout.records import RolloutPrompt

    return [
        RolloutPrompt(s.id, build_messages(np.asarray(p.slices), s.query, box_coords))
        for s, p in samples
    ]


def policy_answers(
    model_path: Path,
    checkpoints: dict[str, Path | None],
    cfg: RunConfig,
    asked: dict[str, list[tuple[list, int]]],
    device: str | None = None,
    seed: int = 0,
) -> dict[str, list[list]]:
    """The answers of each checkpoint (name -> its adapter, None for the bare base) to each
    ``(pairs, n)`` in ``asked[name]``, a list of (Sample, PreparedVolume) pairs: with n = 1 the
    greedy answer to each pair (a text), with n > 1 n answers drawn per pair at
    ``rollout.temperature``, seeded from ``seed`` (a list of n texts). One engine answers for
    every checkpoint: the adapters are swapped in on it one after the other."""
    engine = policy_engine(model_path, cfg, checkpoints.values(), device)
    answers = {}
    for name in each_checkpoint(engine, checkpoints):
        answers[name] = [
            _answers(engine, pairs, n, seed, cfg.data.box_coords) for pairs, n in asked[name]
        ]
    del engine
    return {name: answers[name] for name in checkpoints}


def _answers(engine, pairs: list, n: int, seed: int, box_coords: str) -> list:
    if n == 1:
        groups = generate_in_chunks(engine, pairs, box_coords=box_coords, greedy=True)
        return [g.completions[0].text for g in groups]
    groups = generate_in_chunks(engine, pairs, seed=seed, box_coords=box_coords, group_size=n)
    return [[c.text for c in g.completions] for g in groups]


def each_checkpoint(engine, checkpoints: dict[str, Path | None]):
    """The names of ``checkpoints`` (name -> adapter, None for the bare base), each yielded once
    ``engine`` serves it. The bare base comes first, on the fresh engine: the vLLM engine has no
    call that drops an adapter once one is in (it keeps sending its last adapter request), while
    any adapter can replace another."""
    from rollout.records import WeightUpdate

    order = sorted(checkpoints, key=lambda name: checkpoints[name] is not None)
    for version, name in enumerate(order, start=1):
        if checkpoints[name] is not None:
            # A new version per adapter: vLLM keys a loaded adapter by it.
            engine.update_weights(WeightUpdate(version, adapter_dir=checkpoints[name]))
        yield name


def anchor_jobs(row: str, samples, texts: list, box_coords: str = "pixels") -> list[CaseJob]:
    """A job per case of the policy's answer (a text), or of its drawn answers (a list of
    texts: a consensus job), read with boxes in ``box_coords`` (data.box_coords)."""
    return [
        _anchor_job(row, sample.id, prepared, text, box_coords)
        if isinstance(text, str)
        else CaseJob(
            row,
            sample.id,
            None,
            (),
            samples=tuple(_anchor_job(row, sample.id, prepared, t, box_coords) for t in text),
        )
        for (sample, prepared), text in zip(samples, texts)
    ]


def _anchor_job(row: str, sample_id: str, prepared, text: str, box_coords: str) -> CaseJob:
    from data.answer import ParsedAnswer, parse_answer

    parsed = parse_answer(text, prepared.num_slices, prepared.size, box_coords)
    if isinstance(parsed, ParsedAnswer):
        a = parsed.anchor
        return CaseJob(row, sample_id, a.key_slice, a.boxes, answer=text)
    return CaseJob(row, sample_id, None, (), parsed.reason, answer=text)


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


def suite_scores(results: list[dict], row: str, metric: str = "dsc") -> dict[str, dict]:
    """{suite: {case id: score}} of one table row."""
    out: dict[str, dict] = {}
    for r in results:
        if r["row"] == row:
            out.setdefault(r["suite"], {})[r["id"]] = r[metric]
    return out


# Per-case metrics in the table: (key in cases.jsonl, column name, scale); HD95's column name
# gets the suite's surface unit
TABLE_METRICS = (
    ("dsc", "DSC", 100.0),
    ("iou", "IoU", 100.0),
    ("nsd", "NSD", 100.0),
    ("hd95", "HD95", 1.0),
)
SURFACE_METRICS = ("nsd", "hd95")
MIXED_UNITS = "mm/voxel"


def surface_units(results: list[dict]) -> dict[str, str]:
    """{suite: the unit of its surface metrics}: ``mm``, ``voxel``, or ``MIXED_UNITS`` where its
    cases mix the two (a spacing table that misses some scans). A row without ``surface_unit``
    (an earlier version's) counts as mm, as it was labelled."""
    units: dict[str, set[str]] = {}
    for r in results:
        units.setdefault(r["suite"], set()).add(r.get("surface_unit", "mm"))
    return {suite: u.pop() if len(u) == 1 else MIXED_UNITS for suite, u in units.items()}


def _mean_cell(values: list, scale: float) -> str:
    # cases.jsonl of an earlier version has no surface metrics: "-" rather than a wrong mean
    if not values or any(v is None for v in values):
        return "-"
    return f"{scale * float(np.mean(values)):.2f}"


def table(results: list[dict], rows: list[str]) -> tuple[str, list[list[str]]]:
    """Markdown and CSV rows: mean DSC / IoU / NSD (x100) and HD95 (in the suite's surface unit)
    per dataset, the mean DSC over datasets with its 95% CI (bootstrap over scans, stratified by
    suite), the mean NSD and HD95 over datasets, one row per table row. Surface metrics of a
    suite that mixes units, and their means over suites in different units, are "-"."""
    from evaluation.stats import bootstrap_ci

    suites = sorted(
        {r["suite"] for r in results},
        key=lambda s: list(SUITE_NAMES).index(s) if s in SUITE_NAMES else 99,
    )
    units = surface_units(results)
    one_unit = units[suites[0]] if suites and len(set(units.values())) == 1 else MIXED_UNITS
    header = (
        ["checkpoint"]
        + [
            f"{SUITE_NAMES.get(s, s)} {name}" + (f" {units[s]}" if key == "hd95" else "")
            for s in suites
            for key, name, _ in TABLE_METRICS
        ]
        + ["mean DSC", "95% CI", "mean NSD"]
        + ["mean HD95" + ("" if one_unit == MIXED_UNITS else f" {one_unit}"), "cases", "malformed"]
    )
    body = []
    for row in rows:
        mine = [r for r in results if r["row"] == row]
        if not mine:
            continue
        cells = [row]
        for suite in suites:
            vals = [r for r in mine if r["suite"] == suite]
            for key, _, scale in TABLE_METRICS:
                if key in SURFACE_METRICS and units[suite] == MIXED_UNITS:
                    cells.append("-")  # a mean of mm and voxels is no number
                else:
                    cells.append(_mean_cell([v.get(key) for v in vals], scale))
        mean, low, high = bootstrap_ci(suite_scores(mine, row))
        cells += [f"{100 * mean:.2f}", f"[{100 * low:.2f}, {100 * high:.2f}]"]
        for key, scale in (("nsd", 100.0), ("hd95", 1.0)):
            per_suite = [[v.get(key) for v in mine if v["suite"] == s] for s in suites]
            if one_unit == MIXED_UNITS or any(v is None for values in per_suite for v in values):
                cells.append("-")
            else:
                cells.append(f"{scale * np.mean([np.mean(v) for v in per_suite if v]):.2f}")
        cells += [str(len(mine)), str(sum(1 for r in mine if r.get("failure")))]
        body.append(cells)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines), [header] + body


def compare(results: list[dict], before: str, after: str) -> dict:
    """The paired per-case DSC difference ``after - before`` (x100) with its 95% CI."""
    from evaluation.stats import paired_difference_ci

    mean, low, high, cases = paired_difference_ci(
        suite_scores(results, before), suite_scores(results, after)
    )
    return {
        "before": before,
        "after": after,
        "dsc_difference": 100 * mean,
        "ci_low": 100 * low,
        "ci_high": 100 * high,
        "cases": cases,
    }


def comparison_line(c: dict) -> str:
    return (
        f"{c['after']} - {c['before']}: {c['dsc_difference']:+.2f} DSC per case, 95% CI "
        f"[{c['ci_low']:+.2f}, {c['ci_high']:+.2f}] over {c['cases']} cases "
        "(paired, scans resampled)"
    )


def reusable(earlier: list[dict], row_keys: dict[str, str]) -> list[dict]:
    """The case results of an earlier run that a re-run keeps: those whose key is their row's
    now (the same settings and weights) and that say their ``surface_unit`` (an earlier
    version's rows called HD95 on a voxel grid mm)."""
    return [
        r
        for r in earlier
        if r.get("key") is not None and r["key"] == row_keys.get(r["row"]) and "surface_unit" in r
    ]


@dataclass(frozen=True)
class Sampling:
    """``evaluate --samples N``: N answers drawn per case at ``temperature`` (None: the
    config's ``rollout.temperature``), seeded from ``seed``; 1 adds no row."""

    samples: int = 1
    temperature: float | None = None
    seed: int = 0

    def check(self) -> None:
        from evaluation.predict import MAX_SAMPLES

        if not 1 <= self.samples <= MAX_SAMPLES:
            raise UsageError(f"--samples {self.samples}: need 1..{MAX_SAMPLES}")
        if self.temperature is not None and not self.temperature > 0:
            raise UsageError(f"--temperature {self.temperature}: need > 0")

    def row(self, name: str) -> str:
        """The consensus row of a checkpoint."""
        return f"{name} (consensus of {self.samples})"

    def engine_config(self, cfg: RunConfig) -> RunConfig:
        if self.temperature is None:
            return cfg
        return replace(cfg, rollout=replace(cfg.rollout, temperature=self.temperature))


def evaluate(
    cfg: RunConfig,
    checkpoints: dict[str, Path | None],
    out_dir: Path,
    split: str = "test",
    propagators: tuple[str, ...] = ("baseline",),
    oracle: bool = True,
    workers: int = 2,
    progress: bool = True,
    phrasings: str | None = None,
    comparisons: tuple[tuple[str, str], ...] = (),
    device: str | None = None,
    log_file: Path | None = None,
    sampling: Sampling | None = None,
) -> str:
    """Run the evaluation; returns the markdown table (also written as table.md / table.csv)
    followed by the paired comparisons (also in comparisons.json). ``device`` is ``cpu`` or
    ``cuda`` for the policy and the propagator (default: the GPU when there is one);
    ``workers`` scorers on Ray, or 0 to score in this process. With ``log_file``, this
    process's log goes there too once the inputs are checked. ``sampling`` with ``samples``
    above 1 adds each checkpoint's consensus row and the agreement's rank correlation with DSC
    (agreement.json), and compares each checkpoint's greedy row with its consensus row."""
    from learner.sft import model_path

    sampling = sampling or Sampling()
    sampling.check()
    device = resolve_device(device)
    phrasings = resolve_phrasings(phrasings, split)
    dataset = _checked_inputs(cfg, checkpoints, split, propagators)
    out_dir.mkdir(parents=True, exist_ok=True)
    if log_file is not None:
        log_to_file(log_file)
    cases_file = out_dir / "cases.jsonl"
    samples = [dataset[i] for i in range(len(dataset))]
    base = model_path(cfg)
    warn_other_base(base, checkpoints)
    askings = _askings(samples, phrasings)
    row_keys = _row_keys(cfg, split, base, checkpoints, propagators, askings, oracle, sampling)
    done = _earlier_results(cases_file, row_keys)
    seen = {(r["row"], r["id"]) for r in done}
    rows, jobs = _oracle_rows(samples, cfg, propagators, oracle)
    rows += _policy_rows(base, checkpoints, cfg, propagators, askings, seen, jobs, device, sampling)
    done += _score_jobs(cfg, jobs, seen, row_keys, cases_file, workers, device, progress)
    if sampling.samples > 1:
        comparisons += tuple(
            (_row_name(name, propagators), _row_name(sampling.row(name), propagators))
            for name in checkpoints
        )
    text = _write_tables(out_dir, done, rows, bool(checkpoints), comparisons, askings)
    if sampling.samples > 1:
        text += "\n" + _write_agreement(out_dir, done, rows, sampling)
    return text


def _checked_inputs(
    cfg: RunConfig, checkpoints: dict[str, Path | None], split: str, propagators: tuple[str, ...]
):
    """The split's dataset, once the propagators, the adapters and the split are checked;
    nothing is written before."""
    from data.dataset import VolumeDataset

    if "medsam2" in propagators and cfg.reward.checkpoint is None and not cfg.reward.random_weights:
        raise UsageError(
            "--propagator medsam2: reward.checkpoint is not set; give the MedSAM2 checkpoint "
            "(reward.checkpoint=PATH), or reward.random_weights=true for random SAM2 weights"
        )
    for name, adapter in checkpoints.items():
        if adapter is not None and not Path(adapter).is_dir():
            raise UsageError(f"--adapter {name}={adapter}: no such adapter folder")
    check_adapter_frames(cfg.data, checkpoints)
    dataset = VolumeDataset(cfg.data.manifest, cfg.data, split=split)
    if len(dataset) == 0:
        every = VolumeDataset(cfg.data.manifest, cfg.data, check_labels=False).samples
        counts = Counter(s.split for s in every)
        raise UsageError(
            f"{cfg.data.manifest}: no cases in split {split!r} (cases per split: "
            + ", ".join(f"{name} {counts[name]}" for name in sorted(counts))
            + ")"
        )
    return dataset


def _askings(samples: list, phrasings: str) -> list[tuple[str, list]]:
    """(row-name suffix, the samples as asked) per phrasing set: a row's name says its phrasing
    set under every flag, no suffix meaning training phrasings."""
    held_out = (PHRASING_SUFFIX, samples)
    if phrasings == "held-out":
        return [held_out]
    training = ("", [(with_training_phrasing(s), p) for s, p in samples])
    return [training] if phrasings == "training" else [training, held_out]


def _row_name(name: str, propagators: tuple[str, ...]) -> str:
    """A checkpoint's row name: the propagator that scores it is named when there are several."""
    return name if len(propagators) == 1 else f"{name} ({propagators[0]})"


def _row_keys(
    cfg: RunConfig,
    split: str,
    base: Path,
    checkpoints: dict[str, Path | None],
    propagators: tuple[str, ...],
    askings: list,
    oracle: bool,
    sampling: Sampling,
) -> dict[str, str]:
    """What produced each row: a re-run reuses a case result only when its key matches (the
    same settings and, for a checkpoint's rows, the same weights; for a consensus row also
    the draws' number, temperature and seed), never a stale one."""
    settings = settings_key(cfg, split)
    row_keys = {
        f"oracle anchor ({prop})": f"{settings}/oracle" for prop in (propagators if oracle else ())
    }
    temperature = sampling.engine_config(cfg).rollout.temperature
    for name, adapter in checkpoints.items():
        key = f"{settings}/{checkpoint_key(base, adapter, cfg.data.cache_dir)}"
        row_keys.update({_row_name(name, propagators) + suffix: key for suffix, _ in askings})
        if sampling.samples > 1:
            drawn = f"{key}/{sampling.samples}@{temperature:g}/seed{sampling.seed}"
            named = _row_name(sampling.row(name), propagators)
            row_keys.update({named + suffix: drawn for suffix, _ in askings})
    return row_keys


def _earlier_results(cases_file: Path, row_keys: dict[str, str]) -> list[dict]:
    """The case results of an earlier run that this one keeps; ``cases_file`` is rewritten
    without the others."""
    earlier = (
        [json.loads(line) for line in cases_file.read_text().splitlines()]
        if cases_file.exists()
        else []
    )
    done = reusable(earlier, row_keys)
    if len(done) < len(earlier):
        log.info(
            "%s: %d earlier case results of other checkpoints or settings are recomputed",
            cases_file,
            len(earlier) - len(done),
        )
        _write_atomically(cases_file, "".join(json.dumps(r) + "\n" for r in done))
    return done


def _oracle_rows(
    samples: list, cfg: RunConfig, propagators: tuple[str, ...], oracle: bool
) -> tuple[list[str], dict[str, list[CaseJob]]]:
    """The oracle rows (one per propagator) and the jobs of every propagator, oracle's so far."""
    jobs: dict[str, list[CaseJob]] = {p: [] for p in propagators}
    rows: list[str] = []
    for prop in propagators if oracle else ():
        row = f"oracle anchor ({prop})"
        rows.append(row)
        jobs[prop] += oracle_jobs(row, samples, cfg.data.min_box_area)
    return rows, jobs


def _policy_rows(
    base: Path,
    checkpoints: dict[str, Path | None],
    cfg: RunConfig,
    propagators: tuple[str, ...],
    askings: list,
    seen: set,
    jobs: dict[str, list[CaseJob]],
    device: str,
    sampling: Sampling,
) -> list[str]:
    """The checkpoints' rows (with ``sampling``, each followed by its consensus row); the
    policy answers the cases not ``seen`` yet, and their anchors join ``jobs`` of the first
    propagator."""
    rows: list[str] = []
    todo: dict[str, dict[str, tuple[list, int]]] = {}  # checkpoint -> row -> (cases to do, n)
    for name in checkpoints:
        kinds = [(name, 1)]  # (row name, answers per case)
        if sampling.samples > 1:
            kinds.append((sampling.row(name), sampling.samples))
        for suffix, asked in askings:
            for shown, n in kinds:
                row = _row_name(shown, propagators) + suffix
                rows.append(row)
                pending = [(s, p) for s, p in asked if (row, s.id) not in seen]
                if pending:
                    todo.setdefault(name, {})[row] = (pending, n)
    if todo:
        answers = policy_answers(
            base,
            {name: checkpoints[name] for name in todo},
            sampling.engine_config(cfg),
            {name: list(by_row.values()) for name, by_row in todo.items()},
            device,
            sampling.seed,
        )
        for name, by_row in todo.items():
            for (row, (pairs, _)), texts in zip(by_row.items(), answers[name]):
                jobs[propagators[0]] += anchor_jobs(row, pairs, texts, cfg.data.box_coords)
    return rows


def _score_jobs(
    cfg: RunConfig,
    jobs_by_propagator: dict[str, list[CaseJob]],
    seen: set,
    row_keys: dict[str, str],
    cases_file: Path,
    workers: int,
    device: str,
    progress: bool,
) -> list[dict]:
    """Score every job not ``seen``, by ``workers`` Ray actors per propagator (0: in this
    process); each result is appended to ``cases_file`` as it arrives. Returns the results."""
    ray = None
    if workers > 0:
        import ray

        if ray.is_initialized():
            ray = None  # the caller's instance: left running
    if ray is not None:
        ray.init(
            num_cpus=max(2, workers),
            num_gpus=1 if device == "cuda" else 0,
            include_dashboard=False,
            log_to_driver=False,
        )
    results = []
    try:
        with cases_file.open("a") as sink:
            for prop, jobs in jobs_by_propagator.items():
                jobs = [j for j in jobs if (j.row, j.sample_id) not in seen]
                if not jobs:
                    continue
                for result in _scored(cfg, prop, jobs, workers, device, progress):
                    result["key"] = row_keys[result["row"]]
                    sink.write(json.dumps(result) + "\n")
                    sink.flush()
                    results.append(result)
    finally:
        if ray is not None:
            ray.shutdown()
    return results


def _scored(cfg: RunConfig, prop: str, jobs: list[CaseJob], workers: int, device: str, progress):
    """The results of ``jobs`` on one propagator as they finish (any order)."""
    from tqdm import tqdm

    args = (str(cfg.data.manifest), cfg.data, cfg.reward, prop, cfg.evaluation, device)
    bar = dict(total=len(jobs), desc=f"evaluate ({prop})", disable=not progress)
    if workers == 0:
        scorer = CaseScorer(*args)
        yield from tqdm((scorer.score(job) for job in jobs), **bar)
        return
    import ray
    from ray.util import ActorPool

    gpus = 1.0 / workers if device == "cuda" else 0  # scorers share the one GPU when there is one
    actors = [
        ray.remote(CaseScorer).options(num_cpus=1, num_gpus=gpus).remote(*args)
        for _ in range(workers)
    ]
    pool = ActorPool(actors)
    yield from tqdm(pool.map_unordered(lambda a, j: a.score.remote(j), jobs), **bar)
    for actor in actors:
        ray.kill(actor)


def _write_tables(
    out_dir: Path,
    done: list[dict],
    rows: list[str],
    policy_rows: bool,
    comparisons: tuple[tuple[str, str], ...],
    askings: list,
) -> str:
    """table.md, table.csv and comparisons.json; returns the table and the comparison lines."""
    markdown, csv_rows = table(done, rows)
    if policy_rows:
        markdown = f"{ROWS_NOTE}\n\n{markdown}"
    _write_atomically(out_dir / "table.md", markdown + "\n")
    text = io.StringIO()
    csv.writer(text).writerows(csv_rows)
    _write_atomically(out_dir / "table.csv", text.getvalue())
    found = []
    for before, after in comparisons:
        for suffix, _ in askings:
            if f"{before}{suffix}" in rows and f"{after}{suffix}" in rows:
                found.append(compare(done, f"{before}{suffix}", f"{after}{suffix}"))
    _write_atomically(out_dir / "comparisons.json", json.dumps(found, indent=1))
    return "\n".join([markdown, "", *map(comparison_line, found)]).rstrip()


def agreement_study(results: list[dict], row: str) -> dict | None:
    """Spearman's rho between a consensus row's agreement and its DSC over its cases, with a
    95% CI that resamples scans within suites (``evaluation.stats.spearman_ci``); None when
    the row has no case with an agreement."""
    from evaluation.stats import spearman_ci

    pairs: dict[str, dict[str, tuple[float, float]]] = {}
    for r in results:
        if r["row"] == row and r.get("agreement") is not None:
            pairs.setdefault(r["suite"], {})[r["id"]] = (r["agreement"], r["dsc"])
    if not pairs:
        return None
    rho, low, high, cases, scans = spearman_ci(pairs)
    finite = [v if np.isfinite(v) else None for v in (rho, low, high)]
    return dict(zip(("row", "rho", "ci_low", "ci_high"), [row, *finite])) | {
        "cases": cases,
        "scans": scans,
        "mean_agreement": float(np.mean([a for c in pairs.values() for a, _ in c.values()])),
    }


def agreement_line(study: dict) -> str:
    head = f"{study['row']}: agreement vs DSC, Spearman rho "
    tail = f" over {study['cases']} cases of {study['scans']} scans (scans resampled)"
    if study["rho"] is None:
        return head + "undefined (every case's agreement, or DSC, is the same)" + tail
    return (
        head + f"{study['rho']:+.2f}, 95% CI [{study['ci_low']:+.2f}, {study['ci_high']:+.2f}]"
        f"{tail}; mean agreement {study['mean_agreement']:.2f}"
    )


def _write_agreement(out_dir: Path, done: list[dict], rows: list[str], sampling: Sampling) -> str:
    """agreement.json: the agreement study of every consensus row; returns their lines."""
    marker = sampling.row("")
    studies = [agreement_study(done, row) for row in rows if marker in row]
    studies = [s for s in studies if s is not None]
    _write_atomically(out_dir / "agreement.json", json.dumps(studies, indent=1))
    return "\n".join(map(agreement_line, studies))


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    tmp.replace(path)


def default_checkpoints(cfg: RunConfig) -> dict[str, Path | None]:
    out = Path(cfg.output_dir)
    rows: dict[str, Path | None] = {"base": None}
    if (out / "sft" / "adapter").exists():
        rows["SFT"] = out / "sft" / "adapter"
    if (out / "grpo" / "adapter").exists():
        rows["SFT+RL"] = out / "grpo" / "adapter"
    return rows


@command()
def main(argv: list[str] | None = None) -> int:
    set_default_environment()
    parser = ArgumentParser(
        prog="python -m evaluation.evaluate", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=ADAPTER",
        help="a table row: NAME=a LoRA adapter folder, or NAME=base for the bare base model "
        "(default: base, <output_dir>/sft/adapter and <output_dir>/grpo/adapter)",
    )
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--propagator", action="append", choices=["baseline", "medsam2"])
    parser.add_argument(
        "--workers", type=int, default=2, help="scorers on Ray (0: in this process, no Ray)"
    )
    parser.add_argument("--no-oracle", action="store_true")
    parser.add_argument(
        "--phrasings",
        choices=["held-out", "training", "both"],
        help="ask the cases with held-out phrasings (the paper's setting; rows 'NAME (held-out "
        "phrasings)'), training phrasings (rows 'NAME') or both; default: held-out, or "
        "training for --split train",
    )
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="A:B",
        help="paired per-case DSC difference B - A with its 95%% CI (e.g. SFT:SFT+RL)",
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=1,
        metavar="N",
        help="also draw N answers per case: a row '<checkpoint> (consensus of N)' (their "
        "voxel-majority mask), its paired difference from the greedy row, and the rank "
        "correlation of their agreement with DSC (agreement.json); default 1: greedy rows only",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        help="the temperature --samples draws at (default: rollout.temperature's)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the --samples draws (default 0)")
    add_device_argument(parser, "the policy and the propagator")
    parser.add_argument("--out-dir", type=Path, help="default: <output_dir>/eval")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    for item in args.compare:
        if ":" not in item:
            raise UsageError(f"--compare {item}: takes A:B, two row names")
    if args.workers < 0:
        raise UsageError(f"--workers {args.workers}: must be 0 (in this process) or more")
    sampling = Sampling(args.samples, args.temperature, args.seed)
    sampling.check()
    cfg = command_config(args)
    if cfg.data.manifest is None:
        raise UsageError("data.manifest: not set (in the config or as data.manifest=PATH)")
    checkpoints: dict[str, Path | None] = {}
    for item in args.adapter:
        name, _, path = item.partition("=")
        checkpoints[name] = None if path in ("", "base") else Path(path)
    out = args.out_dir or Path(cfg.output_dir) / "eval"
    device = resolve_device(args.device)
    markdown = evaluate(
        cfg,
        checkpoints or default_checkpoints(cfg),
        out,
        args.split,
        tuple(args.propagator or [cfg.reward.propagator]),
        not args.no_oracle,
        args.workers,
        phrasings=args.phrasings,
        comparisons=tuple(tuple(c.split(":", 1)) for c in args.compare),
        device=device,
        log_file=out / "evaluate.log",
        sampling=sampling,
    )
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
