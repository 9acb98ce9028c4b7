"""Synthetic abdominal CT phantoms: the embedded default dataset (NIfTI CT + label map + manifest).

    python -m data.phantoms --out-dir DIR --cases N --seed S [--volume-shape Z Y X] [--val-every K]

Each case is an abdominal CT in Hounsfield units — air, a body outline with subcutaneous fat and
a muscle wall, liver, spleen, both kidneys, pancreas, contrast-filled aorta, vertebrae with
discs and spinal canal, lung bases at the top — with per-case variation of position, size and
density, Gaussian noise, and in some cases an enhancing kidney tumour and/or a fluid kidney
cyst. Cases are dealt round-robin to three suites that mirror the M3D-Seg subsets:

- ``ctorg`` (CT-ORG-like): liver, kidney, vertebrae, lungs;
- ``abdomenct1k`` (AbdomenCT-1K-like): liver, kidney, spleen, pancreas;
- ``kits23`` (KiTS23-like): kidney, kidney tumour, kidney cyst, and the volume-grounded
  "tumour kidney" / "cyst kidney" (the kidney that contains the lesion).

Manifest rows (JSONL, paths relative to the manifest): ``{"id", "image", "mask", "label",
"query", "split", "suite", "label_values"}``; ``label_values`` lists the voxel values of the label
map that make up the target. Every fourth case is a test case (case i with i % 4 == 3); with
``val_every`` K, case i with i % K == 0 is a validation case, carved from the training cases and
never from test. Test and validation rows use held-out phrasings (the paper's setting: queries
the policy never trained on); which cases are drawn does not depend on the split.
Files are stored in RAS+ orientation (as most converters write them); readers reorient them.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from common.cli import ArgumentParser, UsageError, command, removed_on_failure
from data.queries import sample_query
from data.volume import MIN_SHAPE

LABELS = {
    "liver": 1,
    "spleen": 2,
    "right kidney": 3,
    "left kidney": 4,
    "pancreas": 5,
    "aorta": 6,
    "vertebrae": 7,
    "lungs": 8,
    "right kidney tumour": 9,
    "left kidney tumour": 10,
    "right kidney cyst": 11,
    "left kidney cyst": 12,
}
KIDNEY = [3, 4, 9, 10, 11, 12]  # kidneys with their lesions, as KiTS23's kidney region
SUITES = ("ctorg", "abdomenct1k", "kits23")
SUITE_TARGETS = {
    "ctorg": ("liver", "kidney", "vertebrae", "lungs"),
    "abdomenct1k": ("liver", "kidney", "spleen", "pancreas"),
    "kits23": ("kidney", "kidney tumour", "kidney cyst", "tumour kidney", "cyst kidney"),
}
DEFAULT_SHAPE = (80, 192, 192)  # (z, y, x): 2.5 mm slices, ~2 mm pixels — quick to build and read
SMALL_SHAPE = (48, 128, 128)  # the embedded default's phantoms (and the grounding corpus)
SPACING_FOV_MM = (200.0, 380.0, 380.0)  # z coverage and in-plane field of view

# Mean HU per tissue (contrast-enhanced portal venous phase) and per-case spread.
HU = {
    "air": -1000,
    "fat": -100,
    "muscle": 50,
    "viscera": 20,
    "liver": 60,
    "spleen": 50,
    "kidney": 150,
    "pancreas": 45,
    "aorta": 200,
    "bone": 400,
    "cortex": 800,
    "disc": 80,
    "csf": 10,
    "lung": -850,
    "tumour": 110,
    "cyst": 5,
}


@dataclass(frozen=True)
class Case:
    image: np.ndarray  # (Z, Y, X) int16 HU, canonical orientation
    labels: np.ndarray  # (Z, Y, X) uint8 label map
    lesions: dict[str, str]  # "tumour"/"cyst" -> "left" | "right" when present


class _Painter:
    """Paints ellipsoids given in normalised body coordinates into HU and label volumes.

    u runs patient right -> left and v anterior -> posterior, both in [-1, 1] across the field
    of view; w runs inferior -> superior in [0, 1] over the volume.
    """

    def __init__(self, shape: tuple[int, int, int]):
        self.shape = shape
        self.image = np.full(shape, HU["air"], dtype=np.float32)
        self.labels = np.zeros(shape, dtype=np.uint8)

    def region(self, center, radii, within: np.ndarray | None = None):
        z_n, y_n, x_n = self.shape
        cu, cv, cw = center
        ru, rv, rw = radii
        cx, cy, cz = (cu + 1) * x_n / 2, (cv + 1) * y_n / 2, cw * (z_n - 1)
        rx, ry, rz = ru * x_n / 2, rv * y_n / 2, rw * (z_n - 1)
        lo = [max(0, int(np.floor(c - r))) for c, r in ((cz, rz), (cy, ry), (cx, rx))]
        hi = [
            min(n, int(np.ceil(c + r)) + 1)
            for c, r, n in ((cz, rz, z_n), (cy, ry, y_n), (cx, rx, x_n))
        ]
        if any(h <= low for low, h in zip(lo, hi)):
            return None, None
        zz, yy, xx = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 + ((zz - cz) / rz) ** 2 <= 1.0
        box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        if within is not None:
            inside = inside & within[box]
        return box, inside

    def paint(self, center, radii, hu: float, label: int = 0, within=None) -> np.ndarray:
        """Paint an ellipsoid; returns its full-volume boolean mask."""
        box, inside = self.region(center, radii, within)
        full = np.zeros(self.shape, dtype=bool)
        if box is None:
            return full
        self.image[box][inside] = hu
        if label:
            self.labels[box][inside] = label
        full[box] = inside
        return full


def make_case(rng: np.random.Generator, shape: tuple[int, int, int], lesion_odds: float) -> Case:
    """One phantom: anatomy with per-case jitter; a tumour/cyst with probability ``lesion_odds``."""
    z_n, y_n, x_n = shape
    p = _Painter(shape)

    def j(scale: float = 0.03) -> float:
        return float(rng.normal(0.0, scale))

    def s() -> float:
        return float(rng.uniform(0.88, 1.12))

    def hu(name: str, spread: float = 8.0) -> float:
        return HU[name] + float(rng.normal(0.0, spread))

    # Body: an elliptic cylinder with subcutaneous fat, a muscle wall and visceral tissue.
    body_a, body_b = 0.86 * s(), 0.62 * s()
    yy, xx = np.ogrid[:y_n, :x_n]
    u = (xx + 0.5) / (x_n / 2) - 1
    v = (yy + 0.5) / (y_n / 2) - 1 - 0.04
    r = np.sqrt((u / body_a) ** 2 + (v / body_b) ** 2)
    body2d = r <= 1.0
    p.image[:, body2d] = hu("fat")
    p.image[:, r <= 0.92] = hu("muscle")
    interior2d = r <= 0.85
    p.image[:, interior2d] = hu("viscera", 5)
    interior = np.broadcast_to(interior2d, shape)

    # Vertebrae: bodies with a dense rim, discs every ~30 mm, the spinal canal behind.
    vx, vy = j(0.01), 0.44 + j(0.01)
    vert = p.paint((vx, vy, 0.5), (0.13, 0.11, 0.7), hu("cortex", 30), LABELS["vertebrae"])
    p.paint((vx, vy, 0.5), (0.11, 0.09, 0.7), hu("bone", 30), LABELS["vertebrae"])
    period = max(4, int(round(30.0 / (SPACING_FOV_MM[0] / z_n))))
    disc_rows = (np.arange(z_n) % period) < max(1, period // 5)
    disc = vert & disc_rows[:, None, None]
    p.image[disc] = hu("disc")
    p.labels[disc] = 0
    p.paint((vx, vy + 0.17, 0.5), (0.045, 0.045, 0.7), hu("csf"))

    # Organs, painted from deep to superficial so later ones win overlaps.
    p.paint(
        (0.07 + j(0.01), 0.27 + j(0.01), 0.5),
        (0.05 * s(), 0.05 * s(), 0.7),
        hu("aorta", 20),
        LABELS["aorta"],
    )
    p.paint(
        (-0.36 + j(), 0.0 + j(), 0.74 + j()),
        (0.40 * s(), 0.40 * s(), 0.26 * s()),
        hu("liver"),
        LABELS["liver"],
        within=interior,
    )
    p.paint(
        (0.54 + j(), 0.26 + j(), 0.72 + j()),
        (0.14 * s(), 0.19 * s(), 0.14 * s()),
        hu("spleen"),
        LABELS["spleen"],
        within=interior,
    )
    p.paint(
        (0.08 + j(), 0.14 + j(), 0.56 + j()),
        (0.34 * s(), 0.06 * s(), 0.07 * s()),
        hu("pancreas"),
        LABELS["pancreas"],
        within=interior,
    )
    kidneys = {}
    for side, cu, cw in (("right", -0.33, 0.44), ("left", 0.33, 0.49)):
        center = (cu + j(0.02), 0.42 + j(0.02), cw + j())
        radii = (0.10 * s(), 0.13 * s(), 0.17 * s())
        kidneys[side] = (center, radii)
        p.paint(center, radii, hu("kidney", 15), LABELS[f"{side} kidney"], within=interior)

    # Lesions at the kidney's lateral edge (partly exophytic, as they often are).
    lesions: dict[str, str] = {}
    for kind in ("tumour", "cyst"):
        if rng.random() >= lesion_odds:
            continue
        side = "right" if rng.random() < 0.5 else "left"
        (cu, cv, cw), (ru, rv, rw) = kidneys[side]
        outward = -1.0 if side == "right" else 1.0
        radius = (
            float(rng.uniform(0.06, 0.10)) if kind == "tumour" else float(rng.uniform(0.04, 0.07))
        )
        center = (cu + outward * ru * 0.7, cv + j(0.02), cw + float(rng.uniform(-0.5, 0.5)) * rw)
        value = hu(kind, 10 if kind == "tumour" else 4)
        # A sphere: w is a fraction of the z coverage, u and v of half the field of view.
        radius_w = radius * (SPACING_FOV_MM[2] / 2) / SPACING_FOV_MM[0]
        p.paint(
            center,
            (radius, radius, radius_w),
            value,
            LABELS[f"{side} kidney {kind}"],
            within=interior,
        )
        lesions[kind] = side

    # Lung bases above the diaphragm, cutting the liver and spleen domes.
    for cu in (-0.45, 0.45):
        p.paint(
            (cu + j(0.02), 0.15, 1.1 + j(0.02)),
            (0.34, 0.48, 0.22),
            hu("lung", 20),
            LABELS["lungs"],
            within=interior,
        )

    p.image += rng.standard_normal(shape, dtype=np.float32) * 12.0
    image = np.clip(np.rint(p.image), -1024, 3071).astype(np.int16)
    return Case(image=image, labels=p.labels, lesions=lesions)


def target_values(target: str, lesions: dict[str, str]) -> list[int] | None:
    """Voxel values of a target in a case's label map, or None when the case lacks it."""
    if target == "kidney":
        return list(KIDNEY)
    if target in ("kidney tumour", "kidney cyst"):
        kind = target.split()[1]
        return (
            [LABELS[f"{side} kidney {kind}"] for side in ("right", "left")]
            if kind in lesions
            else None
        )
    if target in ("tumour kidney", "cyst kidney"):
        kind = target.split()[0]
        if kind not in lesions:
            return None
        side = lesions[kind]
        return [
            LABELS[f"{side} kidney"],
            LABELS[f"{side} kidney tumour"],
            LABELS[f"{side} kidney cyst"],
        ]
    return [LABELS[target]]


def canonical_to_ras(array: np.ndarray) -> np.ndarray:
    """(z, y, x) LPS array -> (x, y, z) RAS array, the layout the files are stored in."""
    return np.ascontiguousarray(array.transpose(2, 1, 0)[::-1, ::-1, :])


def ras_affine(shape: tuple[int, int, int]) -> np.ndarray:
    z_n, y_n, x_n = shape
    sz, sy, sx = SPACING_FOV_MM[0] / z_n, SPACING_FOV_MM[1] / y_n, SPACING_FOV_MM[2] / x_n
    affine = np.diag([sx, sy, sz, 1.0])
    affine[:3, 3] = [-sx * x_n / 2, -sy * y_n / 2, -sz * z_n / 2]
    return affine


def case_split(i: int, val_every: int = 0) -> str:
    """The split of phantom case ``i``: test every fourth case, validation every ``val_every``-th
    of the others (none when 0), train the rest."""
    if i % 4 == 3:
        return "test"
    if val_every and i % val_every == 0:
        return "val"
    return "train"


def write_phantoms(
    out: str | Path,
    n: int,
    seed: int = 0,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    progress: bool = True,
    stream: int = 0,
    val_every: int = 0,
) -> Path:
    """Write ``n`` phantom cases and ``manifest.jsonl`` under ``out``; returns the manifest path.

    Deterministic for a seed (and shape): case i is drawn from ``[seed, i]``, or with a
    ``stream`` other than 0 from ``[seed, i, stream]``, a random stream that shares no case with
    stream 0 (the grounding corpus uses one). ``val_every`` K > 0 puts case i with i % K == 0 in
    the validation split (a test case stays a test case). The manifest is written last, to a
    temporary name then renamed, so a reader never sees a manifest naming files that are not
    there yet.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if val_every < 0:
        raise ValueError(f"val_every must be >= 0, got {val_every}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    rows = []
    affine = ras_affine(shape)
    for i in tqdm(range(n), desc="phantoms", disable=not progress):
        rng = np.random.default_rng([seed, i] if stream == 0 else [seed, i, stream])
        suite = SUITES[i % len(SUITES)]
        case_id = f"{suite}_{i:04d}"
        split = case_split(i, val_every)
        case = make_case(rng, shape, lesion_odds=0.8 if suite == "kits23" else 0.2)
        if suite == "kits23" and "tumour" not in case.lesions:
            case = make_case(rng, shape, lesion_odds=1.0)
        image_rel, mask_rel = f"images/{case_id}.nii.gz", f"labels/{case_id}.nii.gz"
        nib.save(nib.Nifti1Image(canonical_to_ras(case.image), affine), str(out / image_rel))
        nib.save(nib.Nifti1Image(canonical_to_ras(case.labels), affine), str(out / mask_rel))
        for target in SUITE_TARGETS[suite]:
            values = target_values(target, case.lesions)
            if values is None or not np.isin(case.labels, values).any():
                continue
            rows.append(
                {
                    "id": f"{case_id}/{target.replace(' ', '_')}",
                    "image": image_rel,
                    "mask": mask_rel,
                    "label": target,
                    "query": sample_query(target, "train" if split == "train" else "test", rng),
                    "split": split,
                    "suite": suite,
                    "label_values": values,
                }
            )
    manifest = out / "manifest.jsonl"
    tmp = out / ".manifest.jsonl.partial"
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tmp.replace(manifest)
    return manifest


@command()
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m data.phantoms", description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", required=True, type=Path, help="output folder")
    parser.add_argument("--cases", type=int, default=8, help="number of cases (scans)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--volume-shape",
        type=int,
        nargs=3,
        default=DEFAULT_SHAPE,
        metavar=("Z", "Y", "X"),
        help="volume shape (slices, rows, columns)",
    )
    parser.add_argument(
        "--val-every",
        type=int,
        default=0,
        metavar="K",
        help="case i with i %% K == 0 goes to the validation split (0: none; test: i %% 4 == 3)",
    )
    args = parser.parse_args(argv)
    if args.cases < 1:
        raise UsageError(f"--cases {args.cases}: need at least 1 case")
    if args.val_every < 0:
        raise UsageError(f"--val-every {args.val_every}: must be 0 (none) or more")
    shape = tuple(args.volume_shape)
    if any(s < m for s, m in zip(shape, MIN_SHAPE)):
        raise UsageError(
            f"--volume-shape {' '.join(map(str, shape))}: at least "
            f"{' '.join(map(str, MIN_SHAPE))} (smaller volumes cannot be sampled)"
        )
    out = args.out_dir
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out-dir {out}: exists and is not a folder")
    with removed_on_failure(out):  # a new folder half-filled by a failed run goes again
        manifest = write_phantoms(out, args.cases, args.seed, shape, val_every=args.val_every)
    lines = manifest.read_text().splitlines()
    print(f"wrote {args.cases} cases, {len(lines)} samples: {manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
