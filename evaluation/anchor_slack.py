"""Is there one better anchor rule than the answers given? An evaluation's anchors re-scored
with every box grown or shrunk by a few pixels, and the true anchor moved from the largest slice
to the next largest ones (with that slice's true boxes).

    python -m evaluation.anchor_slack --config configs/<run>.yaml --cases-file <eval>/cases.jsonl
        [--row NAME ...] [--pad -2 --pad 2 --pad 4] [--top-slices 3] [key=value ...]

If no such change beats the anchors as given, what a policy can still gain over the SFT
targets (the largest slice and its true boxes) is case by case, by reading the image, not by
learning one rule such as "draw the boxes larger". Rows default to the oracle's and every
checkpoint's of ``cases.jsonl``; means are the evaluation table's (the mean over suites of each
suite's mean DSC, x100), on the propagator of ``reward.propagator``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from common.cli import UsageError, command
from common.config import RunConfig
from common.runtime import set_default_environment
from evaluation.cases import cases_config, cases_parser, read_cases


def grown(boxes, pad: int, size: int) -> tuple:
    """Every box grown by ``pad`` pixels on each side (shrunk when negative), kept inside the
    size x size slice and at least one pixel wide and high."""
    out = []
    for x1, y1, x2, y2 in boxes:
        a, b = max(0, x1 - pad), max(0, y1 - pad)
        c, d = min(size, x2 + pad), min(size, y2 + pad)
        if c <= a:
            a = c = (x1 + x2) // 2
            c += 1
        if d <= b:
            b = d = (y1 + y2) // 2
            d += 1
        out.append((a, b, c, d))
    return tuple(out)


def _suite_mean(results: list[tuple[str, float]]) -> float:
    from evaluation.stats import suite_mean

    by_suite: dict[str, list[float]] = {}
    for suite, value in results:
        by_suite.setdefault(suite, []).append(value)
    return 100 * suite_mean(by_suite)


def anchor_slack(
    cfg: RunConfig,
    cases_file: Path,
    rows: list[str] | None = None,
    pads: tuple[int, ...] = (-2, 2, 4),
    slices: int = 3,
    progress: bool = True,
) -> list[dict]:
    """One line per (row, anchor change): {"row", "anchor", "dsc"} with ``dsc`` the table's
    mean. The slice changes are lines of the row "true anchor", over every case id of the file;
    its "slice 1 by area" is the oracle's anchor (the largest slice that can anchor one)."""
    from tqdm import tqdm

    from data.targets import anchor_slices, boxes_on_slice
    from evaluation.evaluate import CaseJob, CaseScorer

    records, rows = read_cases(cases_file, rows, lambda row: "held-out phrasings" not in row)
    if slices < 1:
        raise UsageError(f"--top-slices {slices}: must be at least 1")
    scorer = CaseScorer(cfg.data.manifest, cfg.data, cfg.reward, cfg.reward.propagator)
    size = cfg.data.slice_size
    lines = []
    for row in rows:
        cases = [r for r in records if r["row"] == row]
        variants: dict[str, list[tuple[str, float]]] = {"as answered": []}
        for pad in pads:
            variants[f"boxes {'grown' if pad > 0 else 'shrunk'} by {abs(pad)} px"] = []
        for r in tqdm(cases, desc=row, disable=not progress):
            for name, pad in zip(variants, (0, *pads)):
                if r["key_slice"] is None:  # a malformed answer: an empty mask, whatever the pad
                    score = 0.0
                else:
                    boxes = grown(r["boxes"], pad, size)
                    score = scorer.score(CaseJob(row, r["id"], r["key_slice"], boxes))["dsc"]
                variants[name].append((r["suite"], score))
        lines += [{"row": row, "anchor": k, "dsc": _suite_mean(v)} for k, v in variants.items()]
    # The true anchor on the k-th largest slice that can anchor an answer, and the best of them.
    ids = list(dict.fromkeys(r["id"] for r in records))
    ranked: dict[str, list[tuple[str, float]]] = {
        f"slice {k} by area": [] for k in range(1, slices + 1)
    }
    best: list[tuple[str, float]] = []
    for sample_id in tqdm(ids, desc="true anchor", disable=not progress):
        sample, prepared = scorer.dataset.by_id(sample_id)
        usable = sorted(
            anchor_slices(prepared, cfg.data.min_box_area), key=lambda k: -prepared.areas[k - 1]
        )
        scores = [0.0] * slices  # no slice can anchor it: an empty mask, as the oracle row has
        for rank in range(slices if usable else 0):
            k = int(usable[min(rank, len(usable) - 1)])  # fewer slices: the smallest repeats
            boxes = boxes_on_slice(prepared.mask[k - 1], cfg.data.min_box_area)
            scores[rank] = scorer.score(CaseJob("true anchor", sample_id, k, boxes))["dsc"]
        for name, score in zip(ranked, scores):
            ranked[name].append((sample.suite, score))
        best.append((sample.suite, max(scores)))
    lines += [{"row": "true anchor", "anchor": k, "dsc": _suite_mean(v)} for k, v in ranked.items()]
    lines.append(
        {"row": "true anchor", "anchor": f"best of the {slices} per case", "dsc": _suite_mean(best)}
    )
    return lines


def report(lines: list[dict]) -> str:
    """The lines as a table; each change is against the first line of its row."""
    out = ["| row | anchor | mean DSC | change |", "|---|---|---|---|"]
    first: dict[str, float] = {}
    for line in lines:
        change = ""
        if line["row"] in first:
            change = f"{line['dsc'] - first[line['row']]:+.2f}"
        else:
            first[line["row"]] = line["dsc"]
        out.append(f"| {line['row']} | {line['anchor']} | {line['dsc']:.2f} | {change} |")
    return "\n".join(out)


@command()
def main(argv: list[str] | None = None) -> int:
    set_default_environment()
    parser = cases_parser("python -m evaluation.anchor_slack", __doc__.split("\n")[0])
    parser.add_argument(
        "--pad", action="append", type=int, help="grow boxes by this many px (negative: shrink)"
    )
    parser.add_argument(
        "--top-slices",
        type=int,
        default=3,
        metavar="K",
        help="the true anchor on each of the K slices of largest target area",
    )
    args = parser.parse_args(argv)
    cfg = cases_config(args)
    pads = tuple(args.pad) if args.pad else (-2, 2, 4)
    if 0 in pads:
        raise UsageError("--pad 0: the anchors as answered are always scored")
    print(report(anchor_slack(cfg, args.cases_file, args.row, pads, args.top_slices)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
