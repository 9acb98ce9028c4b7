"""The GRPO run on Ray: what ``ray job submit -- python -m cluster.grpo`` executes.

    python -m cluster.grpo --config configs/<run>.yaml [key=value ...] [--resume] [--dry-run]

Each step: prompts -> G completions each (vLLM rollout actors) -> the four rewards (the reward
pool) -> group advantages -> a DeepSpeed update (the learner actor) -> new adapter weights
pushed to the rollout actors. Every step's metrics go to MLflow; every ``checkpoint_every``
steps a checkpoint is written atomically under ``<output_dir>/grpo/checkpoints``; ``--resume``
continues from the latest one in the same MLflow run.

Scaling reward workers while the run goes on: write the wanted count into the file named by
``cluster.scale_file`` (``echo 3 > runs/x/reward_workers``); the driver applies it before the
next step. Or call Serve's scaling endpoint on the Ray dashboard:
``curl -X POST http://127.0.0.1:8265/api/v1/applications/reward_server/deployments/
RewardWorker/scale -H 'Content-Type: application/json' -d '{"target_num_replicas": 3}'``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from cluster.config import RunConfig, load_run_config, to_dict
from cluster.placement import describe, plan
from cluster.runtime import set_default_environment

log = logging.getLogger("cluster.grpo")


class LearnerWorker:
    """The GRPO learner inside a Ray actor (one GPU on a cluster)."""

    def __init__(
        self, model_path: str, cfg, group_size: int, total_steps: int, adapter: str | None
    ):
        set_default_environment()
        from learner.grpo_learner import GRPOLearner

        self.learner = GRPOLearner(
            Path(model_path), cfg, group_size, total_steps, Path(adapter) if adapter else None
        )

    def step(self, batch):
        return self.learner.step(batch)

    def export(self, out_dir: str, version: int):
        return self.learner.export(Path(out_dir), version)

    def save_checkpoint(self, folder: str, tag: str, state: dict) -> None:
        self.learner.save_checkpoint(Path(folder), tag, state)

    def load_checkpoint(self, folder: str, tag: str) -> dict:
        return self.learner.load_checkpoint(Path(folder), tag)


def prompt_order(n: int, epochs: int, seed: int) -> list[int]:
    """Sample indices for every epoch, shuffled per epoch with the run's seed."""
    order = []
    for epoch in range(epochs):
        idx = list(range(n))
        random.Random(seed * 7919 + epoch).shuffle(idx)
        order += idx
    return order


def evidence_picture(
    path: Path, slices: np.ndarray, mask: np.ndarray, text: str, title: str
) -> Path | None:
    """The key slice with predicted (yellow) and true (green) boxes, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from data.answer import ParsedAnswer, parse_answer
    from data.targets import boxes_on_slice

    parsed = parse_answer(text, slices.shape[0], slices.shape[-1])
    if not isinstance(parsed, ParsedAnswer):
        return None
    k = parsed.anchor.key_slice
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(slices[k - 1], cmap="gray")
    for boxes, color in ((boxes_on_slice(mask[k - 1]), "lime"), (parsed.anchor.boxes, "yellow")):
        for x1, y1, x2, y2 in boxes:
            ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color=color))
    ax.set_title(f"{title}\nkey slice {k} (true boxes green, predicted yellow)", fontsize=7)
    ax.axis("off")
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path


class Checkpoints:
    """Atomic run checkpoints: ``step-N/`` folders written as ``.step-N.partial`` then renamed,
    and a ``latest`` file replaced atomically once the folder is complete."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def latest(self) -> Path | None:
        marker = self.root / "latest"
        if not marker.exists():
            return None
        folder = self.root / marker.read_text().strip()
        return folder if (folder / "state.json").exists() else None

    def save(self, step: int, learner, state: dict) -> Path:
        import ray

        name = f"step-{step}"
        tmp = self.root / f".{name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        ray.get(learner.save_checkpoint.remote(str(tmp / "learner"), "ckpt", state))
        (tmp / "state.json").write_text(json.dumps(state))
        final = self.root / name
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        marker = self.root / ".latest.partial"
        marker.write_text(name)
        marker.replace(self.root / "latest")
        return final


def rng_state(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state


def run(cfg: RunConfig, resume: bool = False) -> dict:
    """The GRPO loop; returns the last step's metrics."""
    import ray
    from ray.util.placement_group import placement_group

    from cluster.tracking import Tracker, flatten
    from data.dataset import VolumeDataset
    from data.prompts import build_messages
    from learner.grpo import group_advantages, zero_std_groups
    from learner.grpo_learner import GRPOExample
    from learner.sft import model_path
    from reward_server.pool import RewardPool
    from reward_server.scorer import ScoreRequest
    from rollout.actor import RolloutFleet
    from rollout.records import RolloutPrompt, WeightUpdate

    out = Path(cfg.output_dir) / "grpo"
    out.mkdir(parents=True, exist_ok=True)
    placement = plan(cfg)
    dataset = VolumeDataset(cfg.data.manifest, cfg.data, split="train")
    base = model_path(cfg)
    order = prompt_order(len(dataset), cfg.grpo.epochs, cfg.seed)
    steps = len(order) // cfg.grpo.batch_size
    if cfg.steps is not None:
        steps = min(steps, cfg.steps)
    if cfg.grpo.max_steps is not None:
        steps = min(steps, cfg.grpo.max_steps)

    if not ray.is_initialized():
        if cfg.cluster.address or os.environ.get("RAY_ADDRESS"):
            ray.init(address=cfg.cluster.address, log_to_driver=False)
        else:  # a local instance sized to the plan (logical CPUs may exceed the cores)
            need = int(np.ceil(placement.total().get("CPU", 1))) + 1
            ray.init(
                num_cpus=max(need, os.cpu_count() or 1),
                include_dashboard=False,
                log_to_driver=False,
            )
    group = placement_group(placement.bundles, strategy=placement.strategy)
    ray.get(group.ready(), timeout=600)
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    checkpoints = Checkpoints(out / "checkpoints")
    state = {
        "step": 0,
        "position": 0,
        "mlflow_run_id": None,
        "version": 0,
        "rng": rng_state(np.random.default_rng(cfg.seed)),
    }
    latest = checkpoints.latest() if resume else None
    if latest is not None:
        state = json.loads((latest / "state.json").read_text())
        log.info("resuming from %s (step %d)", latest, state["step"])
    learner = (
        ray.remote(LearnerWorker)
        .options(
            num_cpus=placement.learner["CPU"],
            num_gpus=placement.learner.get("GPU", 0),
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, 0),
        )
        .remote(
            str(base),
            cfg.grpo,
            cfg.rollout.group_size,
            max(steps, 1),
            str(cfg.sft_adapter) if cfg.sft_adapter else None,
        )
    )
    if latest is not None:
        ray.get(learner.load_checkpoint.remote(str(latest / "learner"), "ckpt"))
    fleet = RolloutFleet(
        base,
        cfg.rollout,
        cfg.model,
        cpus_per_actor=cfg.cluster.rollout_cpus,
        placement_group=group,
        bundle_offset=1,
    )
    if latest is not None or cfg.sft_adapter is not None:
        update = ray.get(learner.export.remote(str(out / "weights"), state["version"]))
        fleet.update_weights(update)
    pool = RewardPool(
        str(cfg.data.manifest), cfg.data, cfg.reward, cpus_per_worker=cfg.cluster.reward_cpus
    )
    tracker = Tracker(
        cfg.tracking.tracking_uri,
        cfg.tracking.experiment,
        cfg.tracking.run_name or f"{Path(cfg.output_dir).name}-grpo",
        state["mlflow_run_id"],
    )
    if state["mlflow_run_id"] is None:
        tracker.log_params(flatten(to_dict(cfg)))
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
        tracker.log_artifact(out / "config.json")
    state["mlflow_run_id"] = tracker.run_id
    rng = np.random.default_rng()
    rng.bit_generator.state = state["rng"]
    from tqdm import tqdm

    bar = tqdm(total=steps, initial=state["step"], desc="GRPO")
    metrics: dict = {}
    while state["step"] < steps:
        step = state["step"] + 1
        _apply_scale_file(cfg, pool)
        idx = order[state["position"] : state["position"] + cfg.grpo.batch_size]
        samples = [dataset[i] for i in idx]
        prompts = [
            RolloutPrompt(s.id, build_messages(np.asarray(p.slices), s.query)) for s, p in samples
        ]
        t0 = time.perf_counter()
        groups = fleet.generate(prompts, seed=int(rng.integers(2**31)))
        t1 = time.perf_counter()
        requests = [ScoreRequest(g.sample_id, c.text) for g in groups for c in g.completions]
        rewards = pool.score(requests)
        t2 = time.perf_counter()
        g_size = cfg.rollout.group_size
        totals = np.array([r.total for r in rewards]).reshape(len(groups), g_size)
        import torch

        adv = group_advantages(torch.tensor(totals), cfg.grpo.adv_eps).numpy()
        batch = [
            GRPOExample(prompts[i].messages, c.token_ids, c.logprobs, float(adv[i, j]))
            for i, g in enumerate(groups)
            for j, c in enumerate(g.completions)
        ]
        learned = ray.get(learner.step.remote(batch))
        t3 = time.perf_counter()
        update: WeightUpdate = ray.get(learner.export.remote(str(out / "weights"), step))
        fleet.update_weights(update)
        t4 = time.perf_counter()
        lengths = [len(c.token_ids) for g in groups for c in g.completions]
        metrics = {
            "reward/format": float(np.mean([r.format for r in rewards])),
            "reward/axial": float(np.mean([r.axial for r in rewards])),
            "reward/spatial": float(np.mean([r.spatial for r in rewards])),
            "reward/consistency": float(np.mean([r.consistency for r in rewards])),
            "reward/total": float(totals.mean()),
            "reward/group_std": float(totals.std(axis=1).mean()),
            "reward/format_failure_rate": float(np.mean([r.failure is not None for r in rewards])),
            "advantage/mean": float(adv.mean()),
            "advantage/std": float(adv.std()),
            "advantage/min": float(adv.min()),
            "advantage/max": float(adv.max()),
            "advantage/zero_std_share": zero_std_groups(torch.tensor(totals)) / len(groups),
            "learner/loss": learned.loss,
            "learner/kl": learned.kl,
            "learner/clip_fraction": learned.clip_fraction,
            "learner/entropy": learned.entropy,
            "learner/grad_norm": learned.grad_norm,
            "learner/lr": learned.lr,
            "rollout/response_length": float(np.mean(lengths)),
            "time/generate_s": t1 - t0,
            "time/reward_s": t2 - t1,
            "time/learn_s": t3 - t2,
            "time/weight_sync_s": t4 - t3,
            "time/step_s": t4 - t0,
            "throughput/completions_per_s": len(lengths) / (t4 - t0),
            "throughput/tokens_per_s": sum(lengths) / (t4 - t0),
            "reward/workers": pool.num_workers,
        }
        tracker.log_metrics(metrics, step)
        if step % cfg.tracking.evidence_every == 0 or step == 1:
            sample, prepared = samples[0]
            picture = evidence_picture(
                out / f"evidence-step{step}.png",
                np.asarray(prepared.slices),
                np.asarray(prepared.mask),
                groups[0].completions[0].text,
                f"step {step}: {sample.query}",
            )
            if picture is not None:
                tracker.log_artifact(picture, "evidence")
        state.update(
            step=step, position=state["position"] + len(idx), version=step, rng=rng_state(rng)
        )
        if step % cfg.checkpoint_every == 0 or step == steps:
            checkpoints.save(step, learner, state)
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward/total']:.3f}")
    bar.close()
    final = ray.get(learner.export.remote(str(out), state["version"]))
    if final.adapter_dir is not None:
        shutil.rmtree(out / "adapter", ignore_errors=True)
        shutil.copytree(final.adapter_dir, out / "adapter")
    tracker.end()
    pool.shutdown()
    fleet.shutdown()
    return metrics


def _apply_scale_file(cfg: RunConfig, pool) -> None:
    if not cfg.cluster.scale_file:
        return
    path = Path(cfg.cluster.scale_file)
    try:
        wanted = int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return
    if wanted != pool.num_workers and wanted >= 1:
        log.info("scaling reward workers %d -> %d (%s)", pool.num_workers, wanted, path)
        pool.scale(wanted)


def main(argv: list[str] | None = None) -> int:
    set_default_environment()
    parser = argparse.ArgumentParser(
        prog="python -m cluster.grpo", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the config, print the placement, start nothing",
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_run_config(args.config, args.overrides)
    if cfg.data.manifest is None:
        parser.error("data.manifest is not set")
    placement = plan(cfg)
    if args.dry_run:
        print(describe(placement))
        print(
            f"model: {cfg.model.path or 'tiny Qwen3-VL (' + cfg.model.tiny_size + ')'}; "
            f"rollout: {cfg.rollout.engine} x{cfg.rollout.num_actors}, G={cfg.rollout.group_size}"
            f"; reward: {cfg.reward.propagator} x{cfg.reward.num_workers}"
        )
        return 0
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    metrics = run(cfg, resume=args.resume)
    print(json.dumps({k: round(v, 4) for k, v in metrics.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
