"""What the tools that re-read an evaluation's ``cases.jsonl`` share: the file's records with
the rows asked for checked by name, and their command line (--config, --cases-file, --row,
--print-config, key=value overrides, a manifest to read the cases from)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from common.cli import (
    ArgumentParser,
    UsageError,
    add_config_arguments,
    command_config,
    existing_file,
)
from common.config import RunConfig


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
    """--cases-file, --row, --config, --print-config and key=value overrides; a tool adds its own
    options."""
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--cases-file",
        type=existing_file,
        required=True,
        metavar="FILE",
        help="an evaluation's cases.jsonl",
    )
    parser.add_argument("--row", action="append", help="a row of cases.jsonl (default: all)")
    add_config_arguments(parser)
    return parser


def cases_config(args) -> RunConfig:
    """The run's config from parsed ``cases_parser`` arguments (``--print-config`` ends the
    command here); it must name a manifest."""
    cfg = command_config(args)
    if cfg.data.manifest is None:
        raise UsageError("data.manifest: not set (in the config or as data.manifest=PATH)")
    return cfg
