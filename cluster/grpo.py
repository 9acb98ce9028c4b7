"""The GRPO run on Ray: what ``ray job submit -- python -m cluster.grpo`` executes.

    python -m cluster.grpo --config configs/<run>.yaml [key=value ...] [--resume] [--dry-run]
                           [--print-config]

The run is :class:`cluster.trainer.GRPOTrainer`'s: each step generates, scores, learns, syncs
the new weights and logs to MLflow. ``--resume`` continues from the latest checkpoint under
``<output_dir>/grpo/checkpoints``, in the same MLflow run. Ctrl-C stops the run after the step
under way, with a checkpoint of it; a second Ctrl-C stops at once.

No disk is shared between nodes: the actors write only to their node's scratch folder
(``cluster.scratch_dir``), weights reach the rollout actors through Ray's object store or the
weight group (``cluster.weight_sync``), and checkpoints (every rank's DeepSpeed state) and the
final adapter come back to the driver as bytes and are written under its ``output_dir``. Every
node needs the base checkpoint (``model.path``) and the data; only the driver needs
``output_dir`` and the SFT adapter.

Scaling reward workers while the run goes on: write the wanted count into the file named by
``cluster.scale_file`` (``echo 3 > runs/x/reward_workers``); the driver applies it before the
next step. Or call Serve's scaling endpoint on the Ray dashboard:
``curl -X POST http://127.0.0.1:8265/api/v1/applications/reward_server/deployments/
RewardWorker/scale -H 'Content-Type: application/json' -d '{"target_num_replicas": 3}'``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from cluster.placement import assign, describe, describe_assignment, parse_cluster, plan
from cluster.trainer import run, sft_start
from common.cli import (
    ArgumentParser,
    UsageError,
    add_config_arguments,
    command,
    command_config,
    log_to_file,
)
from common.runtime import set_default_environment


@command()
def main(argv: list[str] | None = None) -> int:
    set_default_environment()
    parser = ArgumentParser(prog="python -m cluster.grpo", description=__doc__.split("\n")[0])
    add_config_arguments(parser)
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the config, print the placement, start nothing",
    )
    parser.add_argument(
        "--cluster",
        metavar="GPUS[:CPUS],...",
        help="with --dry-run: a cluster to place the run on, GPUs (and CPUs) per node, e.g. "
        "8 (one node of 8 GPUs) or 4,4 (two nodes of 4); refuses a plan it cannot hold",
    )
    args = parser.parse_args(argv)
    cfg = command_config(args)
    if cfg.data.manifest is None:
        raise UsageError("data.manifest: not set (in the config or as data.manifest=PATH)")
    placement = plan(cfg)
    if args.cluster and not args.dry_run:
        raise UsageError("--cluster: only with --dry-run")
    if args.dry_run:
        print(describe(placement))
        if args.cluster:
            nodes = parse_cluster(args.cluster)
            print(describe_assignment(assign(placement, nodes), nodes))
        print(
            f"model: {cfg.model.path or 'tiny Qwen3-VL (' + cfg.model.tiny_size + ')'}; "
            f"rollout: {cfg.rollout.engine} x{cfg.rollout.num_actors}, G={cfg.rollout.group_size}"
            f"; reward: {cfg.reward.propagator} x{cfg.reward.num_workers}"
        )
        return 0
    if not Path(cfg.data.manifest).is_file():
        raise UsageError(f"data.manifest: {cfg.data.manifest}: no such file")
    sft_start(cfg)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    log_to_file(Path(cfg.output_dir) / "grpo" / "grpo.log")
    metrics = run(cfg, resume=args.resume)
    print(json.dumps({k: round(v, 4) for k, v in metrics.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
