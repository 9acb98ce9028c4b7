"""Which window for M3D-Seg: oracle-anchor DSC of phantoms stored as M3D-Seg stores its scans.

    python -m bench.m3d_window [--cases 24] [--seed 0] [--slices 32] [--slice-size 128]

Phantom CTs (``data.phantoms``, true HU) are written in M3D-Seg's layout, each image through
M3D's published normalisation (foreground = voxels above the volume mean; clip to its 0.05 and
99.95 percentiles; subtract its mean, divide by its standard deviation), each mask as its
subset's channels (CT-ORG 0012, AbdomenCT-1k 0003, KiTS23 0004). Every target is then scored
with the oracle anchor (the evaluation's oracle row: the largest slice and its component boxes)
and the baseline propagator, three ways:

- ``unit``: the z-scores min-max scaled to 0..1, the ``unit`` window (M3D's own input);
- ``hu``: approximate HU from each scan's fat and soft-tissue peaks (``data.m3d_intensity=hu``),
  the ``abdomen`` window;
- ``true HU``: the same scans and targets as NIfTI in true HU, the ``abdomen`` window (what the
  recovery aims at).

Prints the mean DSC per suite and over suites, with the scan-level 95% CI of the paired
difference hu - unit.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import sparse

from common.cli import ArgumentParser, command
from common.config import DataConfig
from data.dataset import VolumeDataset
from data.m3dseg import read_subset, write_manifest
from data.phantoms import LABELS, SMALL_SHAPE, canonical_to_ras, make_case, ras_affine
from evaluation.evaluate import SUITE_NAMES, oracle_jobs
from evaluation.metrics import dsc
from evaluation.stats import paired_difference_ci

KIDNEY = [LABELS[f"{side} kidney"] for side in ("right", "left")]
TUMOUR = [LABELS[f"{side} kidney tumour"] for side in ("right", "left")]
CYST = [LABELS[f"{side} kidney cyst"] for side in ("right", "left")]
# Each subset's channels as phantom label values (no bladder or brain in an abdominal phantom;
# CT-ORG's "bone" is the vertebrae; KiTS23's "kidney" excludes its lesions, as M3D's does).
CHANNELS = {
    "0012": [
        [LABELS["liver"]],
        [],
        [LABELS["lungs"]],
        KIDNEY + TUMOUR + CYST,
        [LABELS["vertebrae"]],
        [],
    ],
    "0003": [[LABELS["liver"]], KIDNEY + TUMOUR + CYST, [LABELS["spleen"]], [LABELS["pancreas"]]],
    "0004": [KIDNEY, TUMOUR, CYST],
}


def m3d_normalise(hu: np.ndarray) -> np.ndarray:
    """M3D's published normalisation (see the module docstring)."""
    foreground = hu[hu > hu.mean()]
    low, high = np.percentile(foreground, 0.05), np.percentile(foreground, 99.95)
    return ((np.clip(hu, low, high) - foreground.mean()) / foreground.std()).astype(np.float32)


def write_scans(root: Path, n: int, seed: int) -> tuple[Path, Path]:
    """``n`` phantoms, dealt to the three subsets in turn, as an M3D-Seg folder and as NIfTI
    in true HU with label maps of the same channels; the two manifests' rows match one to one."""
    rng = np.random.default_rng(seed)
    codes = list(CHANNELS)
    index: dict[str, list] = {code: [] for code in codes}
    for i in range(n):
        code = codes[i % len(codes)]
        case = make_case(rng, SMALL_SHAPE, lesion_odds=1.0 if code == "0004" else 0.3)
        hu, labels = case.image.astype(np.float32), case.labels  # canonical (z, y, x)
        channels = np.stack([np.isin(labels, values) for values in CHANNELS[code]]).astype(np.int32)
        folder = root / "m3d" / code / f"case_{i:03d}"
        folder.mkdir(parents=True)
        # stored (H, W, D) = the canonical array read back by M3D's swapaxes: depth last
        np.save(folder / "image.npy", m3d_normalise(hu).transpose(2, 1, 0)[None])
        dense = channels.transpose(0, 3, 2, 1)
        sparse.save_npz(
            folder / f"mask_{dense.shape}", sparse.csr_matrix(dense.reshape(len(dense), -1))
        )
        entry = {
            "image": f"{code}/case_{i:03d}/image.npy",
            "label": f"{code}/case_{i:03d}/mask_{dense.shape}.npz",
        }
        index[code].append((entry, i))
        label_map = (channels * np.arange(1, len(channels) + 1)[:, None, None, None]).sum(0)
        affine = ras_affine(hu.shape)
        for kind, array in (("image", hu.astype(np.int16)), ("mask", label_map.astype(np.uint8))):
            nib.save(
                nib.Nifti1Image(canonical_to_ras(array), affine), str(folder / f"{kind}.nii.gz")
            )
    rows = []
    for code, entries in index.items():
        # every fourth case is a test case, as in the phantoms; the oracle scores both splits
        split = {
            "train": [e for e, i in entries if i % 4 != 3],
            "test": [e for e, i in entries if i % 4 == 3],
        }
        (root / "m3d" / code / f"{code}.json").write_text(json.dumps(split))
        rows += read_subset(root / "m3d", code)
    m3d = write_manifest(rows, root / "m3d" / "manifest.jsonl")
    nifti_rows = []
    for row in rows:
        folder = Path(row["image"]).parent
        nifti = {k: v for k, v in row.items() if k != "m3d_axes"}
        nifti_rows.append(
            {**nifti, "image": str(folder / "image.nii.gz"), "mask": str(folder / "mask.nii.gz")}
        )
    return m3d, write_manifest(nifti_rows, root / "m3d" / "nifti.jsonl")


def oracle_dsc(manifest: Path, cfg: DataConfig) -> dict[str, dict[str, float]]:
    """{suite: {case id: oracle-anchor DSC}} with the baseline propagator on the source grid."""
    from data.preprocess import to_source_grid
    from data.volume import load_volume
    from reward_server.propagation import BaselinePropagator

    dataset = VolumeDataset(manifest, cfg)
    samples = [dataset[i] for i in range(len(dataset))]
    propagator = BaselinePropagator()
    scores: dict[str, dict[str, float]] = {}
    for job, (sample, prepared) in zip(oracle_jobs("oracle", samples, cfg.min_box_area), samples):
        truth = np.isin(
            load_volume(sample.mask, "mask", sample.m3d_axes).array,
            dataset.label_values(sample.id),
        )
        if job.key_slice is None:
            pred = np.zeros_like(truth)
        else:
            mask = propagator.propagate(
                sample.id, np.asarray(prepared.slices), job.key_slice, job.boxes, None
            )
            pred = to_source_grid(mask, prepared)
        scores.setdefault(sample.suite, {})[sample.id] = dsc(pred, truth)
    return scores


@command()
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m bench.m3d_window", description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=24, help="phantom scans (dealt to 3 subsets)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the phantoms")
    parser.add_argument("--slices", type=int, default=32, help="sampled slices per volume")
    parser.add_argument("--slice-size", type=int, default=128, help="side of a slice in px")
    args = parser.parse_args(argv)
    base = DataConfig(num_slices=args.slices, slice_size=args.slice_size)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        m3d, nifti = write_scans(Path(tmp), args.cases, args.seed)
        ways = {
            "unit": (m3d, replace(base, window="unit", m3d_intensity="unit")),
            "hu": (m3d, replace(base, window="abdomen", m3d_intensity="hu")),
            "true HU": (nifti, replace(base, window="abdomen")),
        }
        results = {name: oracle_dsc(manifest, cfg) for name, (manifest, cfg) in ways.items()}
        elapsed = time.perf_counter() - start
    suites = list(results["unit"])
    print(
        f"oracle-anchor DSC x100, baseline propagator, {args.cases} phantom scans "
        f"(seed {args.seed}), {args.slices} slices of {args.slice_size} px ({elapsed:.0f} s)"
    )
    print("| window | " + " | ".join(SUITE_NAMES.get(s, s) for s in suites) + " | mean |")
    print("|---" * (len(suites) + 2) + "|")
    for name, scores in results.items():
        means = [100 * np.mean(list(scores[s].values())) for s in suites]
        cells = " | ".join(f"{m:.2f}" for m in means)
        print(f"| {name} | {cells} | {np.mean(means):.2f} |")
    mean, low, high, cases = paired_difference_ci(results["unit"], results["hu"])
    print(
        f"hu - unit: {100 * mean:+.2f} DSC per target, 95% CI [{100 * low:+.2f}, "
        f"{100 * high:+.2f}] over {cases} targets (paired, scans resampled)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
