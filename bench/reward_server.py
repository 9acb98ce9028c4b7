"""Rc throughput of the reward server for groups of G = 4 completions, printed as ratios.

Three comparisons, each repeated (the two sides interleaved, their order alternating) and given
as the median ratio with its min-max spread:

- batched / naive, in one process on all cores: the naive per-completion path scores one
  completion at a time from scratch (fresh image features, MedSAM2's own procedure:
  ``propagate_in_video`` forward, reset, reverse) against the group path (features once per
  volume slice, the group's distinct anchors as objects on one state, batched tracking steps).
  Each group starts from a cold feature cache on both sides. A third side scores the same
  groups on features already cached (each volume scored before on the same worker, as when a
  volume's other targets or an earlier epoch came first).
- per-scan features / per-target, in one process: a scan with 6 targets (one phantom's liver,
  spleen, kidneys, pancreas, vertebrae and lungs, one window). Image features are found by the
  slices' content, so the targets share one feature pass over the scan; the per-target side
  clears the features before each target, as a cache keyed by sample id did. Two settings:
  the whole volume, one anchor per target, as evaluation propagates a scan's targets (the line
  ``per-scan features / per-target``), and Rc's window, a group of G anchors per target (the
  line ``per-scan features / per-target, Rc window``: only the slices that targets' windows
  share are saved there).
- 2 workers / 1 worker, on Ray: the same groups through ``RewardPool`` with one CPU (one torch
  thread) per worker, so a second worker adds a core, as a second GPU would on a cluster.
  Each repeat scores fresh samples, so neither side finds their features cached.

MedSAM2 = SAM2.1 Hiera-tiny with random weights (speed does not depend on the weights), on the
paper's frame (64 slices of 256 px) and window (+-5), at a smaller image size than MedSAM2's 512
so that the run takes minutes on two cores. The machine may be shared: figures are noisy. Run
from the repository root:

    python -m bench.reward_server [--image-size 256] [--groups 4] [--repeats 3]
                                  [--device cpu|cuda] [--no-workers]

``--device`` is where MedSAM2 scores (default: the GPU when torch sees one; on CUDA with bf16
autocast, as MedSAM2); ``--no-workers`` skips the Ray comparison (for a machine without Ray), and
the output then ends without its ratio.
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common.cli import ArgumentParser, add_device_argument, command, resolve_device
from common.config import DataConfig, RewardConfig
from common.runtime import set_default_environment
from data.answer import EvidenceAnchor, format_answer
from data.dataset import VolumeDataset, anchorable
from data.phantoms import LABELS, target_values, write_phantoms
from data.queries import sample_query
from data.targets import evidence_target
from reward_server.scorer import RewardScorer, ScoreRequest

G = 4
PHANTOM_SHAPE = (64, 192, 192)  # (z, y, x) of the written CT phantoms
SIX_TARGETS = ("liver", "spleen", "kidney", "pancreas", "vertebrae", "lungs")


class OneByOne:
    """The naive per-completion path: fresh image features for every call, and MedSAM2's own
    procedure for each anchor in turn."""

    def __init__(self, medsam2):
        self.medsam2 = medsam2
        self.name = f"{medsam2.name}, one anchor at a time"

    def propagate_group(self, volume_id, slices, anchors, window) -> list[np.ndarray]:
        self.medsam2.clear_features()
        return [
            self.medsam2.propagate_reference(volume_id, slices, a.key_slice, a.boxes, window)
            for a in anchors
        ]


def group_anchors(prepared, rng: np.random.Generator) -> list[EvidenceAnchor]:
    """G distinct anchors for one prompt: the true anchor, its boxes nudged."""
    anchor = evidence_target(prepared, top_k=3, rng=rng)
    return [
        EvidenceAnchor(
            anchor.key_slice,
            tuple((max(0, x1 - g), y1, x2, y2) for x1, y1, x2, y2 in anchor.boxes),
        )
        for g in range(G)
    ]


def make_group(prepared, rng: np.random.Generator) -> list[str]:
    """G distinct well-formed answers to one prompt (:func:`group_anchors`)."""
    return [format_answer(a, f"try {g}") for g, a in enumerate(group_anchors(prepared, rng))]


def six_target_manifest(manifest: Path, rng: np.random.Generator) -> Path:
    """A manifest of one phantom scan asked for 6 targets (as a CT-ORG scan has up to 6)."""
    import nibabel as nib

    row = json.loads(manifest.read_text().splitlines()[0])
    labels = np.asarray(nib.load(manifest.parent / row["mask"]).dataobj)
    rows = []
    for target in SIX_TARGETS:
        values = target_values(target, {})
        if not np.isin(labels, values).any():
            raise RuntimeError(f"{row['mask']}: phantom has no {target} ({LABELS})")
        scan = row["id"].split("/")[0]
        rows.append(
            {
                **row,
                "id": f"{scan}/{target}",
                "label": target,
                "query": sample_query(target, "train", rng),
                "split": "train",
                "label_values": values,
            }
        )
    out = manifest.with_name("six_targets.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def time_scan(propagator, scan, window, per_target: bool) -> tuple[float, list]:
    """Propagate the anchors of every target of one scan, ``[(prepared, anchors), ...]``, from
    cold features: encoded once for the scan, or with ``per_target`` again for every target."""
    propagator.clear_features()
    start = time.perf_counter()
    masks = []
    for prepared, anchors in scan:
        if per_target:
            propagator.clear_features()
        masks += propagator.propagate_group(prepared.sample_id, prepared.slices, anchors, window)
    return time.perf_counter() - start, masks


def compare_scan(propagator, scan, window, repeats: int, what: str) -> list[float]:
    """per-target / per-scan time ratios over ``repeats`` interleaved measurements."""
    time_scan(propagator, scan[:1], window, per_target=False)  # first-call costs
    ratios = []
    for rep in range(repeats):
        took, masks = {}, {}
        for side in ("scan", "target") if rep % 2 == 0 else ("target", "scan"):
            took[side], masks[side] = time_scan(propagator, scan, window, side == "target")
        if any((a != b).any() for a, b in zip(masks["scan"], masks["target"])):
            raise RuntimeError(f"{what}: shared features changed a mask")
        ratios.append(took["target"] / took["scan"])
        print(
            f"  repeat {rep + 1}, {what}: features per target {took['target']:.1f} s, once "
            f"per scan {took['scan']:.1f} s"
        )
    return ratios


def spread(ratios: list[float]) -> str:
    each = " ".join(f"{r:.2f}x" for r in ratios)
    return f"{each} (median {np.median(ratios):.2f}x, min-max {min(ratios):.2f}-{max(ratios):.2f}x)"


def time_naive(naive: RewardScorer, groups) -> tuple[float, list]:
    start = time.perf_counter()
    rewards = [naive.score_group(prepared, [t])[0] for prepared, texts in groups for t in texts]
    return time.perf_counter() - start, rewards


def time_batched(scorer: RewardScorer, groups, cached: bool = False) -> tuple[float, list]:
    """Batched scoring of ``groups``: from a cold feature cache for each group (as the naive
    side), or with ``cached`` from the features an earlier pass left (every group's volume
    scored before on this worker)."""
    if cached:
        for prepared, texts in groups:
            scorer.score_group(prepared, texts)  # the features, not timed
    start = time.perf_counter()
    rewards = []
    for prepared, texts in groups:
        if not cached:
            scorer.propagator.clear_features()
        rewards += scorer.score_group(prepared, texts)
    return time.perf_counter() - start, rewards


def time_pool(pool, requests: list[ScoreRequest]) -> float:
    start = time.perf_counter()
    pool.score(requests)
    return time.perf_counter() - start


@command()
def main(argv: list[str] | None = None) -> int:
    set_default_environment()
    parser = ArgumentParser(
        prog="python -m bench.reward_server", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--image-size", type=int, default=256, help="SAM2 input side in px (MedSAM2: 512)"
    )
    parser.add_argument("--groups", type=int, default=4, help="groups (prompts) per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per side")
    add_device_argument(parser, "MedSAM2")
    parser.add_argument("--no-workers", action="store_true", help="skip the Ray comparison")
    args = parser.parse_args(argv)
    args.device = resolve_device(args.device)
    import torch

    if args.device == "cpu":
        torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cases = (args.repeats + 1) * args.groups // 3 + 2  # a case holds 3-5 samples
        manifest = write_phantoms(
            tmp / "data", n=cases, seed=0, shape=PHANTOM_SHAPE, progress=False
        )
        data_cfg = DataConfig(cache_dir=tmp / "cache")
        ds = VolumeDataset(manifest, data_cfg)
        usable, _ = anchorable(ds)  # prepares every sample into the shared cache
        need = (args.repeats + 1) * args.groups
        if len(usable) < need:
            raise RuntimeError(f"{len(usable)} usable phantom samples, {need} needed")
        groups = [(ds[i][1], make_group(ds[i][1], rng)) for i in usable[:need]]
        cfg = RewardConfig(
            propagator="medsam2", random_weights=True, image_size=args.image_size, delta=5
        )
        frame = ds[usable[0]][1].slices.shape
        print(
            f"shape: volumes {frame[0]} slices x {frame[1]}x{frame[2]} px (paper frame), "
            f"MedSAM2 = SAM2.1 Hiera-tiny, random weights, {args.image_size} px input "
            f"(paper: 512), window +-{cfg.delta}, G = {G} distinct anchors per group "
            f"(same key slice, boxes nudged), {args.groups} groups per measurement, "
            f"{args.repeats} repeats"
        )

        scorer = RewardScorer(cfg, device=args.device)
        naive = copy.copy(scorer)
        naive.propagator = OneByOne(scorer.propagator)
        core_groups = groups[: args.groups]
        time_batched(scorer, core_groups[:1])  # first-call costs out of the figures
        time_naive(naive, core_groups[:1])
        core, on_cache = [], []
        for rep in range(args.repeats):
            sides = ("naive", "batched", "cached")
            took, rewards = {}, {}
            for side in sides if rep % 2 == 0 else sides[::-1]:
                if side == "naive":
                    took[side], rewards[side] = time_naive(naive, core_groups)
                else:
                    took[side], rewards[side] = time_batched(
                        scorer, core_groups, cached=side == "cached"
                    )
            # The sides batch frames and objects differently, and float rounding can move a
            # mask's edge by a voxel: every side's rewards must be the naive ones to 1e-3.
            gap = max(
                abs(a.total - b.total)
                for side in ("batched", "cached")
                for a, b in zip(rewards["naive"], rewards[side])
            )
            if gap > 1e-3:
                raise RuntimeError(f"the batched paths moved a reward by {gap:.4f} from the naive")
            core.append(took["naive"] / took["batched"])
            on_cache.append(took["naive"] / took["cached"])
            n = G * len(core_groups)
            print(
                f"  repeat {rep + 1}: naive {n / took['naive']:.2f} completions/s, "
                f"batched {n / took['batched']:.2f}, batched on cached features "
                f"{n / took['cached']:.2f} (rewards within {gap:.1e})"
            )
        print(f"batched / naive per repeat: {spread(core)}")
        print(f"batched on cached features / naive per repeat: {spread(on_cache)}")

        six = [
            prepared for _, prepared in VolumeDataset(six_target_manifest(manifest, rng), data_cfg)
        ]
        one_each = [(p, [evidence_target(p, top_k=1, rng=rng)]) for p in six]
        whole = compare_scan(scorer.propagator, one_each, None, args.repeats, "whole volume")
        print(f"per-scan features / per-target per repeat: {spread(whole)}")
        groups_each = [(p, group_anchors(p, rng)) for p in six]
        rc = compare_scan(scorer.propagator, groups_each, cfg.delta, args.repeats, "Rc window")
        print(f"per-scan features / per-target, Rc window, per repeat: {spread(rc)}")
        if args.no_workers:
            print(f"batched on cached features / naive: {np.median(on_cache):.2f}x")
            print(f"batched / naive: {np.median(core):.2f}x")
            print(f"per-scan features / per-target, Rc window: {np.median(rc):.2f}x")
            print(f"per-scan features / per-target: {np.median(whole):.2f}x")
            return 0

        import ray

        from reward_server.pool import RewardPool

        # 3 logical CPUs for 3 replicas of one CPU each; only one pool works at a time.
        ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
        try:
            pools = {
                n: RewardPool(str(manifest), data_cfg, cfg, cpus_per_worker=1.0, name=f"bench{n}")
                for n in (1, 2)
            }
            pools[2].scale(2)
            warm = [
                ScoreRequest(p.sample_id, t) for p, texts in groups[: args.groups] for t in texts
            ]
            for pool in pools.values():
                pool.score(warm)  # first-call costs out of the figures, on every worker
            scaling = []
            for rep in range(args.repeats):
                fresh = groups[(rep + 1) * args.groups : (rep + 2) * args.groups]
                requests = [ScoreRequest(p.sample_id, t) for p, texts in fresh for t in texts]
                order = (1, 2) if rep % 2 == 0 else (2, 1)
                took = {n: time_pool(pools[n], requests) for n in order}
                scaling.append(took[1] / took[2])
                print(
                    f"  repeat {rep + 1}: 1 worker {len(requests) / took[1]:.2f} completions/s, "
                    f"2 workers {len(requests) / took[2]:.2f} completions/s"
                )
            for pool in pools.values():
                pool.shutdown()
        finally:
            ray.shutdown()
        print(f"2 workers / 1 worker per repeat: {spread(scaling)}")
        print(f"batched on cached features / naive: {np.median(on_cache):.2f}x")
        print(f"batched / naive: {np.median(core):.2f}x")
        print(f"per-scan features / per-target, Rc window: {np.median(rc):.2f}x")
        print(f"per-scan features / per-target: {np.median(whole):.2f}x")
        print(f"2 workers / 1 worker: {np.median(scaling):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
