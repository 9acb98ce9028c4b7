"""Does the policy box the kidney that holds the lesion? For the queries that name a kidney by
its lesion ("tumour kidney", "cyst kidney"), each answer of an evaluation's cases.jsonl is put
on the target kidney's side of the body, the other side, both, or none.

    python -m evaluation.lesion_side --config configs/<run>.yaml --cases <eval>/cases.jsonl
        [--row NAME ...] [key=value ...]

The query does not say the side: only the image does (the lesion). A policy that does not find
the lesion picks the side at chance, and the Wilson 95% interval of its share on the target's
side then holds 0.5. The midline is the slice's middle column, where the phantoms put it; a box
across it counts as both sides.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from cluster.config import RunConfig, load_run_config
from cluster.runtime import set_default_environment
from data.cli import ArgumentParser, UsageError, existing_file, run_cli

LESION_KIDNEYS = ("tumour kidney", "cyst kidney")
SIDES = ("target side", "other side", "both sides", "none")


def answer_side(boxes, target_x: float, midline: float) -> str:
    """Where an answer's boxes lie against the target kidney's centre column ``target_x``."""
    if not boxes:
        return "none"
    sides = set()
    for x1, _, x2, _ in boxes:
        if x1 < midline < x2:
            return "both sides"
        sides.add((x1 + x2) / 2 < midline)
    if len(sides) == 2:
        return "both sides"
    return "target side" if sides == {target_x < midline} else "other side"


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a share hits / n (0 to 1 when n is 0)."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def lesion_side(cfg: RunConfig, cases_file: Path, rows: list[str] | None = None) -> list[dict]:
    """One line per row: the counts of SIDES over its lesion-kidney cases, and the share on the
    target's side of the answers that pick one side, with its Wilson 95% interval."""
    from data.dataset import VolumeDataset

    records = [json.loads(line) for line in Path(cases_file).read_text().splitlines()]
    present = list(dict.fromkeys(r["row"] for r in records))
    rows = rows or present
    missing = [r for r in rows if r not in present]
    if missing:
        raise UsageError(
            f"{cases_file}: no row {', '.join(map(repr, missing))}; it holds {present}"
        )
    dataset = VolumeDataset(cfg.data.manifest, cfg.data)
    labels = {s.id: s.label for s in dataset.samples}
    target_x: dict[str, float] = {}
    lines = []
    for row in rows:
        counts = dict.fromkeys(SIDES, 0)
        for r in records:
            if r["row"] != row or labels.get(r["id"]) not in LESION_KIDNEYS:
                continue
            if r["id"] not in target_x:  # the target kidney's centre column
                target_x[r["id"]] = float(dataset.by_id(r["id"])[1].mask.nonzero()[2].mean())
            boxes = r["boxes"] if r["key_slice"] is not None else []
            counts[answer_side(boxes, target_x[r["id"]], cfg.data.slice_size / 2)] += 1
        sided = counts["target side"] + counts["other side"]
        low, high = wilson(counts["target side"], sided)
        share = counts["target side"] / sided if sided else math.nan
        lines.append({"row": row, **counts, "share": share, "ci": (low, high)})
    if not any(sum(line[s] for s in SIDES) for line in lines):
        raise UsageError(f"{cases_file}: no {' or '.join(LESION_KIDNEYS)} case in rows {rows}")
    return lines


def report(lines: list[dict]) -> str:
    out = [
        "| row | " + " | ".join(SIDES) + " | share on the target's side | Wilson 95% CI |",
        "|---|" + "---|" * (len(SIDES) + 2),
    ]
    for line in lines:
        low, high = line["ci"]
        out.append(
            f"| {line['row']} | "
            + " | ".join(str(line[s]) for s in SIDES)
            + f" | {line['share']:.2f} | [{low:.2f}, {high:.2f}] |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    set_default_environment()
    parser = ArgumentParser(
        prog="python -m evaluation.lesion_side", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", type=existing_file)
    parser.add_argument("--cases", type=existing_file, required=True, help="an eval cases.jsonl")
    parser.add_argument("--row", action="append", help="a row of cases.jsonl (default: all)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_run_config(args.config, args.overrides)
    if cfg.data.manifest is None:
        raise UsageError("data.manifest: not set (in the config or as data.manifest=PATH)")
    print(report(lesion_side(cfg, args.cases, args.row)))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
