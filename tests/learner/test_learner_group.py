"""The learner group on a local Ray instance: two DeepSpeed ranks (gloo, ZeRO-2) make the same
update as one rank on the same batch (SFT term included: each rank takes its share of the
targets), and a checkpoint of two ranks resumes exactly."""

import os
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from cluster.placement import plan
from common.config import load_run_config
from learner.grpo_learner import GRPOExample, SFTExample
from rollout.records import FolderBytes
from tests.rollout.conftest import make_prompt

pytestmark = pytest.mark.slow

# Relative tolerance of the 2-rank step against the 1-rank one (fp32; only the order of the
# gradient all-reduce's additions differs).
RTOL = 1e-5


@pytest.fixture(scope="module")
def ray_local():
    ray.init(
        num_cpus=3,
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=f"/tmp/medvol-lg-{os.getpid()}",
    )
    yield
    ray.shutdown()


def group(tiny_model, sft_adapter, ranks: int):
    from cluster.learner_group import LearnerGroup

    cfg = load_run_config(
        None,
        [
            f"grpo.num_learners={ranks}",
            "grpo.batch_size=2",
            "grpo.zero_stage=2",
            "grpo.precision=fp32",
            "grpo.gradient_checkpointing=false",
            "grpo.lora.rank=8",
            "grpo.lora.alpha=16",
            "grpo.warmup_ratio=0",
            "grpo.lr=0.01",
            "grpo.beta=0.05",
            "grpo.grad_clip=1e9",
            "grpo.sft_coef=0.5",
            # the whole batch's token count divides the loss: a rank must not use its own
            "grpo.loss_agg=token_mean",
            "cluster.learner_cpus=1",
            "rollout.max_tokens=16",
        ],
    )
    return LearnerGroup(cfg, plan(cfg), None, tiny_model, 10, FolderBytes.read(sft_adapter))


def batch() -> list[GRPOExample]:
    """Two prompts of four completions; the second group has twice the first's tokens."""
    prompts = [make_prompt("a", seed=0), make_prompt("b", seed=1)]
    lengths = [[3, 1, 2, 2], [6, 4, 5, 1]]
    rng = np.random.default_rng(0)
    out = []
    for prompt, group_lengths in zip(prompts, lengths):
        for n in group_lengths:
            ids = tuple(int(t) for t in rng.integers(20, 900, n))
            out.append(GRPOExample(prompt.messages, ids, (-6.0,) * n, float(rng.normal())))
    return out


def sft_targets() -> list[SFTExample]:
    """One cold-start target per prompt of the batch, on prompts of their own."""
    from tests.learner.test_learner import SFT_TARGET

    return [
        SFTExample(make_prompt(name, seed=s).messages, SFT_TARGET)
        for name, s in (("c", 2), ("d", 3))
    ]


def adapter(learners, version: int) -> dict[str, torch.Tensor]:
    update = ray.get(learners.export(version))
    # tensors in memory, neither a path nor a folder's bytes
    assert update.adapter_tensors is not None and update.adapter_dir is None
    assert update.adapter is None
    return {name: t.clone() for name, t in update.adapter_tensors.tensors.items()}


def assert_same_step(one, two, rtol=RTOL):
    names = ("loss", "kl", "grad_norm", "entropy", "logprob_gap_mean", "ratio_mean", "sft_loss")
    for name in names:
        assert getattr(two, name) == pytest.approx(getattr(one, name), rel=rtol), name
    assert two.tokens == one.tokens and two.clip_fraction == one.clip_fraction
    assert two.logprob_gap_max == pytest.approx(one.logprob_gap_max, rel=rtol)


@pytest.fixture(scope="module")
def two_steps(ray_local, tiny_model, sft_adapter, tmp_path_factory):
    """One rank and two ranks, two steps each on the same batch; a checkpoint of the two ranks
    after the first step; the adapters after the second."""
    examples, sft = batch(), sft_targets()
    one, two = group(tiny_model, sft_adapter, 1), group(tiny_model, sft_adapter, 2)
    out = {"ckpt": tmp_path_factory.mktemp("group-ckpt") / "learner"}
    out["first"] = (one.step(examples, sft), two.step(examples, sft))
    two.save_checkpoint(out["ckpt"], "ckpt", {"step": 1})
    out["second"] = (one.step(examples, sft), two.step(examples, sft))
    out["adapters"] = (adapter(one, 2), adapter(two, 2))
    # Negative control: rank shares that each divide by their own token count instead.
    shares = [examples[:4], examples[4:]]
    wrong = ray.get(
        [
            w.step.remote(s, sum(len(e.completion_ids) for e in s), t)
            for w, s, t in zip(two.workers, shares, ([sft[0]], [sft[1]]))
        ]
    )
    out["wrong"] = (one.step(examples, sft), wrong)
    one.close()
    two.close()
    return out


def test_two_ranks_make_the_same_update_as_one(two_steps):
    from learner.grpo_learner import combine_metrics

    (one1, two1), (one2, two2) = two_steps["first"], two_steps["second"]
    assert one1.tokens == 24 and one1.grad_norm > 0 and one1.sft_loss > 1.0
    assert_same_step(one1, two1)
    assert_same_step(one2, two2)
    assert one2.kl > 0  # the second step starts away from the reference: a real KL term
    a, b = two_steps["adapters"]
    assert a.keys() == b.keys() and len(a) > 0
    worst = max(float((a[k] - b[k]).abs().max() / a[k].abs().max()) for k in a)
    assert worst < RTOL, worst
    # Had each rank divided by its own tokens, the loss and the gradient would differ.
    reference, wrong = two_steps["wrong"]
    wrong = combine_metrics(wrong)
    assert abs(wrong.grad_norm / reference.grad_norm - 1) > 0.05
    assert abs(wrong.loss - reference.loss) > 1e3 * RTOL * abs(reference.loss)


def test_two_rank_checkpoint_holds_each_shard_and_resumes_exactly(
    two_steps, tiny_model, sft_adapter
):
    folder: Path = two_steps["ckpt"]
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    shards = [n for n in names if "optim_states" in n]
    assert shards == [
        "ckpt/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "ckpt/zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ], names
    fresh = group(tiny_model, sft_adapter, 2)
    state = fresh.load_checkpoint(folder, "ckpt")
    assert state["step"] == 1
    metrics = fresh.step(batch(), sft_targets())
    assert_same_step(two_steps["second"][1], metrics, rtol=1e-6)
    resumed, expected = adapter(fresh, 2), two_steps["adapters"][1]
    assert all(torch.allclose(resumed[k], expected[k], rtol=1e-6, atol=0) for k in expected)
    fresh.close()


def test_a_non_finite_share_on_one_rank_skips_the_update_on_every_rank(
    ray_local, tiny_model, sft_adapter
):
    """Rank 1's share carries an advantage of 1e300 (infinite in fp32), rank 0's is finite: both
    ranks skip the update (a rank stepping alone would part the replicas), and the next batch
    trains on both."""
    import dataclasses
    import math

    two = group(tiny_model, sft_adapter, 2)
    examples, sft = batch(), sft_targets()
    poisoned = [*examples[:5], dataclasses.replace(examples[5], advantage=1e300), *examples[6:]]
    tokens = sum(len(e.completion_ids) for e in poisoned)
    shares = [poisoned[:4], poisoned[4:]]
    parts = ray.get([w.step.remote(s, tokens, [t]) for w, s, t in zip(two.workers, shares, sft)])
    assert [p.skipped_updates for p in parts] == [1, 1]
    assert math.isfinite(parts[0].loss) and not math.isfinite(parts[1].loss)
    after = two.step(examples, sft)
    assert after.skipped_updates == 0 and math.isfinite(after.loss) and after.grad_norm > 0
    two.close()
