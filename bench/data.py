"""Time to preprocess one 512x512x200 phantom to 64x256x256, against loading it from the cache.

Run from the repository root: ``python -m bench.data``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common.cli import ArgumentParser, command
from common.config import DataConfig
from data.dataset import VolumeDataset
from data.phantoms import write_phantoms


@command()
def main(argv: list[str] | None = None) -> int:
    ArgumentParser(prog="python -m bench.data", description=__doc__.split("\n")[0]).parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        manifest = write_phantoms(tmp / "data", n=1, seed=0, shape=(200, 512, 512), progress=False)
        build = time.perf_counter() - t0
        cfg = DataConfig(cache_dir=tmp / "cache")
        ds = VolumeDataset(manifest, cfg)
        sample = ds.samples[0]
        t0 = time.perf_counter()
        _, prepared = ds.by_id(sample.id)
        cold = time.perf_counter() - t0
        warm = []
        for _ in range(5):
            t0 = time.perf_counter()
            _, again = ds.by_id(sample.id)
            np.asarray(again.slices).sum()  # touch every page of the memory map
            warm.append(time.perf_counter() - t0)
        print(f"phantom 200x512x512 written in {build:.2f} s")
        print(f"preprocess to {tuple(prepared.slices.shape)}: {cold:.3f} s")
        print(f"load from cache (memory map, all pages read): {np.median(warm) * 1000:.1f} ms")
        print(f"ratio preprocess / cached load: {cold / np.median(warm):.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
