"""Score a file of completions offline: the reward terms of each line, in input order.

    python -m reward_server.score --manifest M --completions C.jsonl --out-file S.jsonl
        [--workers 2] [--address RAY] [--config FILE] [--print-config] [key=value ...]

Input lines: ``{"id": sample id, "completion": text}``. Output lines: ``{"id", "format",
"axial", "spatial", "consistency", "total"}`` (plus ``"failure"`` for a malformed answer).
``--workers N >= 1`` (default 2) starts a local Ray instance (or joins ``--address``) with N
reward workers; ``--workers 0`` scores in this process without Ray. Reward settings come from
``--config`` (its ``reward`` and ``data`` sections) and ``key=value`` overrides such as
``reward.delta=3``; ``--print-config`` prints those two sections, merged, and exits.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from common.cli import (
    ArgumentParser,
    UsageError,
    add_config_arguments,
    command,
    command_config,
    existing_file,
)
from common.config import DataConfig, RewardConfig, load_config
from common.runtime import set_default_environment
from data.dataset import VolumeDataset
from reward_server.propagation import CheckpointError
from reward_server.scorer import RewardScorer, ScoreRequest, breakdown_row


@dataclass
class ScoreConfig:
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)

    def __post_init__(self) -> None:
        # As in a run config: the reward drops the components and reads the box frame of data.
        self.reward.min_box_area = self.data.min_box_area
        self.reward.box_coords = self.data.box_coords


class CompletionsError(ValueError):
    """A completions file line that cannot be scored; names the file, line and field."""


def read_completions(path: Path, known_ids: set[str]) -> list[ScoreRequest]:
    requests = []
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise CompletionsError(f"completions file not found: {path}") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise CompletionsError(f"{path}, line {n}: not JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("id"), str):
            raise CompletionsError(f"{path}, line {n}: needs a string field 'id'")
        if row["id"] not in known_ids:
            raise CompletionsError(f"{path}, line {n}: id {row['id']!r} is not in the manifest")
        completion = row.get("completion")
        # A non-string completion is model output like any other: it scores 0, it does not fail.
        requests.append(
            ScoreRequest(
                row["id"], completion if isinstance(completion, str) else json.dumps(completion)
            )
        )
    return requests


def score_in_process(
    dataset: VolumeDataset, cfg: RewardConfig, requests: list[ScoreRequest]
) -> list:
    scorer = RewardScorer(cfg)
    with tqdm(total=len(requests), desc=f"rewards ({scorer.propagator.name})") as bar:
        return scorer.score_requests(requests, lambda i: dataset.by_id(i)[1], bar.update)


def load_score_config(path: Path | None, overrides: list[str]) -> ScoreConfig:
    """The ``data`` and ``reward`` sections of a run config file, with overrides."""
    return load_config(ScoreConfig, path, overrides, sections=("data", "reward"))


@command(CheckpointError)
def main(argv: list[str] | None = None) -> int:
    set_default_environment()
    parser = ArgumentParser(
        prog="python -m reward_server.score", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--manifest", required=True, type=existing_file)
    parser.add_argument("--completions", required=True, type=existing_file)
    parser.add_argument("--out-file", required=True, type=Path, help="reward lines (JSONL)")
    parser.add_argument(
        "--workers", type=int, default=2, help="reward workers on Ray (0: in this process, no Ray)"
    )
    parser.add_argument("--address", help="Ray address to join (default: a local instance)")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    if args.workers < 0:
        raise UsageError(f"--workers {args.workers}: must be 0 (in this process) or more")
    cfg = command_config(args, load=load_score_config)
    if args.out_file.is_dir():
        raise UsageError(f"--out-file {args.out_file}: is a folder, give a file name")

    dataset = VolumeDataset(args.manifest, cfg.data)
    requests = read_completions(args.completions, {s.id for s in dataset.samples})
    if args.workers <= 0:
        results = score_in_process(dataset, cfg.reward, requests)
    else:
        import ray

        from reward_server.pool import RewardPool

        ray.init(address=args.address, include_dashboard=False, log_to_driver=False)
        try:
            pool = RewardPool(str(args.manifest), cfg.data, cfg.reward)
            pool.scale(args.workers)
            results = pool.score(requests, progress=True)
            pool.shutdown()
        finally:
            ray.shutdown()
    args.out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out_file.with_name(f".{args.out_file.name}.partial")
    tmp.write_text(
        "".join(
            json.dumps(breakdown_row(r.sample_id, res)) + "\n" for r, res in zip(requests, results)
        )
    )
    tmp.replace(args.out_file)
    print(f"scored {len(requests)} completions -> {args.out_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
