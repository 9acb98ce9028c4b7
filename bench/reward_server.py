"""Rc throughput of the reward server for groups of G = 4 completions.

Compares, in one run: fresh predictor state and image features per completion (the naive way)
against the cached path (features once per volume slice, shared by the group), and 1 against 2
reward workers on Ray. MedSAM2 = SAM2.1 Hiera-tiny with random weights (speed does not depend on
the weights). Run from the repository root:

    python -m bench.reward_server [--image-size 256] [--groups 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from cluster.runtime import set_default_environment
from data.answer import EvidenceAnchor, format_answer
from data.config import DataConfig
from data.dataset import VolumeDataset
from data.phantoms import write_phantoms
from data.targets import evidence_target
from reward_server.config import RewardConfig
from reward_server.propagation import write_random_checkpoint
from reward_server.scorer import RewardScorer, ScoreRequest

G = 4


def make_groups(ds: VolumeDataset, groups: int) -> list[tuple[str, list[str]]]:
    """G distinct well-formed answers per prompt: the true anchor, with boxes nudged."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(groups):
        sample, prepared = ds[i]
        anchor = evidence_target(prepared, top_k=3, rng=rng)
        texts = []
        for g in range(G):
            boxes = tuple((max(0, x1 - g), y1, x2, y2) for x1, y1, x2, y2 in anchor.boxes)
            texts.append(format_answer(EvidenceAnchor(anchor.key_slice, boxes), f"try {g}"))
        out.append((sample.id, texts))
    return out


def time_core(ds, cfg, groups, naive: bool) -> float:
    scorer = RewardScorer(cfg)
    start = time.perf_counter()
    for sample_id, texts in groups:
        _, prepared = ds.by_id(sample_id)
        if naive:
            for text in texts:
                scorer.propagator._volumes.clear()  # fresh state and features per completion
                scorer.score_group(prepared, [text])
        else:
            scorer.score_group(prepared, texts)
    return time.perf_counter() - start


def time_pool(manifest, data_cfg, cfg, groups, workers: int) -> float:
    from reward_server.pool import RewardPool

    pool = RewardPool(str(manifest), data_cfg, cfg, cpus_per_worker=2 / workers)
    pool.scale(workers)
    requests = [ScoreRequest(sid, t) for sid, texts in groups for t in texts]
    pool.score(requests[:G])  # warm the workers
    start = time.perf_counter()
    pool.score(requests)
    elapsed = time.perf_counter() - start
    pool.shutdown()
    return elapsed


def main() -> None:
    set_default_environment()
    parser = argparse.ArgumentParser()
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--groups", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = write_phantoms(
            tmp / "data", n=args.groups, seed=0, shape=(64, 192, 192), progress=False
        )
        data_cfg = DataConfig(cache_dir=tmp / "cache")
        ds = VolumeDataset(manifest, data_cfg)
        ckpt = write_random_checkpoint(tmp / "sam2.pt", args.image_size)
        cfg = RewardConfig(propagator="medsam2", checkpoint=ckpt, image_size=args.image_size)
        groups = make_groups(ds, args.groups)
        n = G * len(groups)
        naive = time_core(ds, cfg, groups, naive=True)
        cached = time_core(ds, cfg, groups, naive=False)
        print(
            f"MedSAM2 (random weights) {args.image_size} px, delta {cfg.delta}, "
            f"{len(groups)} groups of G={G}"
        )
        print(f"  naive (fresh features per completion): {n / naive:.2f} completions/s")
        print(f"  cached (features once per volume):     {n / cached:.2f} completions/s")
        print(f"  cached / naive: {naive / cached:.2f}x")
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            one = time_pool(manifest, data_cfg, cfg, groups, 1)
            two = time_pool(manifest, data_cfg, cfg, groups, 2)
        finally:
            ray.shutdown()
        print(f"  Ray pool, 1 worker:  {n / one:.2f} completions/s")
        print(
            f"  Ray pool, 2 workers: {n / two:.2f} completions/s  ({one / two:.2f}x of 1 worker;"
            f" this machine has 2 cores, so workers share them)"
        )


if __name__ == "__main__":
    main()
