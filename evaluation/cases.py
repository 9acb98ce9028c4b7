"""What the tools that re-read an evaluation's ``cases.jsonl`` share: the file's records with
the rows asked for checked by name, and their command line (--config, --cases, --row, key=value
overrides, a manifest to read the cases from)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from common.cli import ArgumentParser, UsageError, existing_file
from common.config import RunConfig, load_run_config


def read_cases(
    cases_file: Path, rows: list[str] | None, default: Callable[[str], bool] = lambda row: True
) -> tuple[list[dict], list[str]]:
    """The file's records and the rows to read: ``rows``, each of which must be in the file, or
    when none are given every row of the file that ``default`` keeps, in the file's order."""
    records = [json.loads(line) for line in Path(cases_file).read_text().splitlines()]
    present = list(dict.fromkeys(r["row"] for r in records))
    rows = rows or [r for r in present if default(r)]
    missing = [r for r in rows if r not in present]
    if missing:
        raise UsageError(
            f"{cases_file}: no row {', '.join(map(repr, missing))}; it holds {present}"
        )
    return records, rows


def cases_parser(prog: str, description: str) -> ArgumentParser:
    """--config, --cases, --row and key=value overrides; a tool adds its own options."""
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", type=existing_file)
    parser.add_argument("--cases", type=existing_file, required=True, help="an eval cases.jsonl")
    parser.add_argument("--row", action="append", help="a row of cases.jsonl (default: all)")
    parser.add_argument("overrides", nargs="*")
    return parser


def cases_config(args) -> RunConfig:
    """The run's config from parsed ``cases_parser`` arguments; it must name a manifest."""
    cfg = load_run_config(args.config, args.overrides)
    if cfg.data.manifest is None:
        raise UsageError("data.manifest: not set (in the config or as data.manifest=PATH)")
    return cfg
