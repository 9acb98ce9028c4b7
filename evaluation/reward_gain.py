"""What GRPO gained on its own objective, free of the prompt order: the reward of answers sampled
as in training, from the policy before and after, on the same prompts.

    python -m evaluation.reward_gain --config configs/<run>.yaml --before NAME=ADAPTER
        --after NAME=ADAPTER [--split test] [--out-dir DIR] [--print-config] [-v] [--debug]
        [key=value ...]

A slope of GRPO's training reward over its steps mixes what the policy learned with which
prompts came when (an easy stretch of the order looks like learning). Here both checkpoints
answer the same prompts of the split (``--split train``: the prompts GRPO trained on, as the
default run asks; the default is ``test``, as in every command), each sample asked once, with
one training phrasing drawn from its id, as ``evaluate --phrasings training`` asks it; G answers
each at the rollout temperature with the same sampling seed; the reward scorer that GRPO used
scores them. Per sample the mean reward of its G answers, averaged over suites as the table
averages DSC; ``after - before`` per sample, with a 95% CI that resamples scans within each suite
(``evaluation.stats``). Writes ``rewards.jsonl`` (one row per checkpoint and sample, with the
four terms) and ``reward_gain.json`` under ``--out-dir`` (default ``<output_dir>/reward_gain``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from common.cli import (
    ArgumentParser,
    UsageError,
    add_config_arguments,
    command,
    command_config,
    log_to_file,
)
from common.config import RunConfig
from common.runtime import set_default_environment

TERMS = ("format", "axial", "spatial", "consistency")


def sampled_rewards(
    cfg: RunConfig,
    checkpoints: dict[str, Path | None],
    samples: list,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Per checkpoint (name -> adapter, None for the bare base) and sample: the mean reward and
    its terms over G answers sampled at the rollout temperature with ``seed``, from one engine
    that takes each adapter in turn."""
    from tqdm import tqdm

    from evaluation.evaluate import each_checkpoint, generate_in_chunks, policy_engine
    from learner.sft import model_path
    from reward_server.scorer import RewardScorer

    engine = policy_engine(model_path(cfg), cfg, checkpoints.values())
    groups = {
        name: generate_in_chunks(engine, samples, seed=seed, box_coords=cfg.data.box_coords)
        for name in each_checkpoint(engine, checkpoints)
    }
    del engine
    scorer = RewardScorer(cfg.reward)
    rows = []
    bar = tqdm(total=len(groups) * len(samples), desc="reward gain", disable=not progress)
    for name in checkpoints:
        for (sample, prepared), group in zip(samples, groups[name]):
            rewards = scorer.score_group(prepared, [c.text for c in group.completions])
            row = {"row": name, "id": sample.id, "suite": sample.suite}
            row["reward"] = float(np.mean([r.total for r in rewards]))
            row.update({t: float(np.mean([getattr(r, t) for r in rewards])) for t in TERMS})
            row["malformed"] = sum(r.failure is not None for r in rewards)
            rows.append(row)
            bar.update(1)
    bar.close()
    return rows


def reward_gain(
    cfg: RunConfig,
    before: tuple[str, Path],
    after: tuple[str, Path],
    out_dir: Path,
    split: str = "test",
    progress: bool = True,
) -> dict:
    """Sample, score and compare; returns the comparison (also in ``reward_gain.json``)."""
    from data.dataset import VolumeDataset, anchorable
    from evaluation.evaluate import suite_scores, with_training_phrasing
    from evaluation.stats import paired_difference_ci, suite_mean

    for flag, (name, adapter) in (("--before", before), ("--after", after)):
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise UsageError(f"{flag} {name}={adapter}: not a LoRA adapter folder")
    dataset = VolumeDataset(cfg.data.manifest, cfg.data, split=split)
    usable, _ = anchorable(dataset)  # GRPO prompts only samples that can anchor an answer
    if not usable:
        raise UsageError(f"{cfg.data.manifest}: no {split} sample can anchor an answer")
    samples = [dataset[i] for i in usable]
    samples = [(with_training_phrasing(s), p) for s, p in samples]
    rows = sampled_rewards(cfg, dict([before, after]), samples, cfg.seed, progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "rewards.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    scores = [suite_scores(rows, name, "reward") for name in (before[0], after[0])]
    mean, low, high, n = paired_difference_ci(*scores)
    result = {
        "before": before[0],
        "after": after[0],
        "split": split,
        # means over suites of each suite's mean, as the difference is
        "reward_before": suite_mean(scores[0]),
        "reward_after": suite_mean(scores[1]),
        "reward_difference": mean,
        "ci_low": low,
        "ci_high": high,
        "samples": n,
        "group_size": cfg.rollout.group_size,
    }
    for term in TERMS:
        result[f"{term}_difference"] = paired_difference_ci(
            suite_scores(rows, before[0], term), suite_scores(rows, after[0], term)
        )[0]
    (out_dir / "reward_gain.json").write_text(json.dumps(result, indent=1))
    return result


def gain_line(g: dict) -> str:
    terms = ", ".join(f"{t} {g[f'{t}_difference']:+.3f}" for t in TERMS)
    return (
        f"sampled reward on {g['samples']} {g['split']} prompts (G = {g['group_size']}), "
        f"{g['after']} - {g['before']}: {g['reward_after']:.3f} - {g['reward_before']:.3f} = "
        f"{g['reward_difference']:+.3f}, 95% CI [{g['ci_low']:+.3f}, {g['ci_high']:+.3f}] "
        f"(scans resampled; {terms})"
    )


@command()
def main(argv: list[str] | None = None) -> int:
    set_default_environment()
    parser = ArgumentParser(
        prog="python -m evaluation.reward_gain", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--before", required=True, metavar="NAME=ADAPTER", help="a LoRA adapter folder, named"
    )
    parser.add_argument(
        "--after", required=True, metavar="NAME=ADAPTER", help="a LoRA adapter folder, named"
    )
    parser.add_argument(
        "--split",
        default="test",
        choices=["train", "val", "test"],
        help="the prompts (train: those GRPO trained on)",
    )
    parser.add_argument("--out-dir", type=Path, help="default: <output_dir>/reward_gain")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    pairs = []
    for flag, item in (("--before", args.before), ("--after", args.after)):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"{flag} {item}: takes NAME=ADAPTER")
        pairs.append((name, Path(path)))
    if pairs[0][0] == pairs[1][0]:
        raise UsageError(f"--before and --after: both named {pairs[0][0]!r}; give two names")
    cfg = command_config(args)
    if cfg.data.manifest is None:
        raise UsageError("data.manifest: not set (in the config or as data.manifest=PATH)")
    out = args.out_dir or Path(cfg.output_dir) / "reward_gain"
    log_to_file(out / "reward_gain.log")
    print(gain_line(reward_gain(cfg, pairs[0], pairs[1], out, args.split)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
