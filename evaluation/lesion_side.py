"""Does the policy box the kidney that holds the lesion? For the queries that name a kidney by
its lesion ("tumour kidney", "cyst kidney"), each answer of an evaluation's cases.jsonl is put
on the target kidney's side of the body, the other side, both, or none.

    python -m evaluation.lesion_side --config configs/<run>.yaml --cases-file <eval>/cases.jsonl
        [--row NAME ...] [key=value ...]

The query does not say the side: only the image does (the lesion). A policy that does not find
the lesion picks the side at chance, and the Wilson 95% interval of its share on the target's
side then holds 0.5. The midline is the slice's middle column, where the phantoms put it; a box
across it counts as both sides.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from common.cli import UsageError, command
from common.config import RunConfig
from common.runtime import set_default_environment
from evaluation.cases import cases_config, cases_parser, read_cases
from evaluation.stats import wilson

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


def lesion_side(cfg: RunConfig, cases_file: Path, rows: list[str] | None = None) -> list[dict]:
    """One line per row: the counts of SIDES over its lesion-kidney cases, and the share on the
    target's side of the answers that pick one side, with its Wilson 95% interval."""
    from data.dataset import VolumeDataset

    records, rows = read_cases(cases_file, rows)
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


@command()
def main(argv: list[str] | None = None) -> int:
    set_default_environment()
    parser = cases_parser("python -m evaluation.lesion_side", __doc__.split("\n")[0])
    args = parser.parse_args(argv)
    print(report(lesion_side(cases_config(args), args.cases_file, args.row)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
