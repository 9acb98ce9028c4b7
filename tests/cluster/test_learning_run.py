"""A short run whose learning could fail: GRPO on top of a brief SFT must raise the reward of the
policy's sampled answers on held-out cases, measured against the SFT policy on the same cases."""

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_grpo_raises_the_held_out_reward_over_sft(tmp_path):
    import ray

    from cluster.config import load_run_config
    from cluster.grpo import run
    from data.dataset import VolumeDataset
    from data.phantoms import write_phantoms
    from evaluation.evaluate import sampled_rewards, with_training_phrasing
    from evaluation.stats import paired_difference_ci
    from learner.sft import model_path, train_sft

    manifest = write_phantoms(tmp_path / "data", n=8, seed=5, shape=(40, 96, 96), progress=False)
    args = [
        f"output_dir={tmp_path}",
        f"data.manifest={manifest}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "sft.epochs=3",  # brief: answers are often malformed, the reward has room to teach
        "reward.delta=1",
        "cluster.rollout_cpus=0.5",
        "cluster.learner_cpus=0.5",
    ]
    sft = train_sft(load_run_config("configs/tiny.yaml", args), progress=False)
    cfg = load_run_config(
        "configs/tiny.yaml",
        [*args, f"sft_adapter={sft}", "steps=24", "grpo.batch_size=2", "grpo.lr=0.002"],
    )
    try:
        run(cfg)
    finally:
        ray.shutdown()
    test = VolumeDataset(cfg.data.manifest, cfg.data, split="test")
    cases = [(with_training_phrasing(s), p) for s, p in (test[i] for i in range(len(test)))]

    def rewards(adapter):
        out = {}
        for r in sampled_rewards(model_path(cfg), adapter, cfg, cases, seed=1):
            out.setdefault(r["suite"], {})[r["id"]] = r["reward"]
        return out

    before, after = rewards(sft), rewards(tmp_path / "grpo" / "adapter")
    gain, low, high, n = paired_difference_ci(before, after)
    mean_before = np.mean([v for s in before.values() for v in s.values()])
    assert n == len(cases) >= 6
    assert gain > 0.15 and low > 0, (mean_before, gain, low, high)
