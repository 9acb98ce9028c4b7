"""The DeepSpeed GRPO learner and the SFT cold start on the tiny Qwen3-VL, for real."""

import json
import math

import numpy as np
import pytest
import torch

from common.config import GRPOConfig, LoraSettings
from learner.encoding import completion_logits, encode, token_logprobs
from learner.grpo_learner import BatchError, GRPOExample, GRPOLearner
from tests.rollout.conftest import make_prompt

pytestmark = pytest.mark.slow


def learner(
    tiny_model, zero_stage=0, lr=1e-2, group_size=4, sft_adapter=None, max_tokens=None, **grpo
):
    cfg = GRPOConfig(
        lr=lr,
        zero_stage=zero_stage,
        warmup_ratio=0.0,
        precision="fp32",
        gradient_checkpointing=True,
        lora=LoraSettings(rank=8, alpha=16),
        **grpo,
    )
    return GRPOLearner(
        tiny_model,
        cfg,
        group_size=group_size,
        total_steps=20,
        sft_adapter=sft_adapter,
        max_tokens=max_tokens,
    )


def logprobs_of(model, processor, messages, ids):
    seq = encode(processor, messages, ids)
    with torch.no_grad():
        return token_logprobs(completion_logits(model, seq, "cpu"), seq.completion_ids)


def current_logprobs(lrn, messages, ids):
    seq = encode(lrn.processor, messages, ids)
    with torch.no_grad():
        return token_logprobs(
            completion_logits(lrn.engine.module, seq, lrn.device), seq.completion_ids
        ).tolist()


def lora_params(lrn):
    return {
        n: p.detach().clone() for n, p in lrn.engine.module.named_parameters() if p.requires_grad
    }


@pytest.fixture(scope="module")
def grpo(tiny_model):
    return learner(tiny_model)


def test_on_policy_loss_equals_minus_mean_advantage_and_only_the_adapter_learns(grpo):
    prompt = make_prompt("a")
    completions = [(20, 31, 40), (21, 30), (22, 33, 44, 55), (23,)]
    advantages = [1.5, -0.5, 0.5, 0.0]
    batch = [
        GRPOExample(
            prompt.messages, ids, tuple(current_logprobs(grpo, prompt.messages, list(ids))), a
        )
        for ids, a in zip(completions, advantages)
    ]
    frozen = {
        n: p.detach().clone()
        for n, p in grpo.engine.module.named_parameters()
        if not p.requires_grad
    }
    trainable = {n for n, p in grpo.engine.module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = lora_params(grpo)
    metrics = grpo.step(batch)
    # rho = 1 and pi = pi_ref (fresh adapter): loss = -(1/G) sum_i A_i = -(1.5 - 0.5 + 0.5) / 4
    assert metrics.loss == pytest.approx(-0.375, abs=1e-5)
    assert metrics.kl == pytest.approx(0.0, abs=1e-6) and metrics.clip_fraction == 0.0
    assert metrics.tokens == 10 and metrics.grad_norm > 0 and metrics.entropy > 0
    after = lora_params(grpo)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    for n, p in grpo.engine.module.named_parameters():
        if not p.requires_grad:
            assert torch.equal(frozen[n], p.detach()), n


def test_bad_batches_raise_before_any_weight_changes(grpo):
    prompt = make_prompt("a")
    good = GRPOExample(prompt.messages, (20, 21), (-1.0, -1.0), 1.0)
    before = lora_params(grpo)
    cases = [
        ([], "empty batch"),
        ([good] * 3, "3 completions, the learner was built for 4"),
        (
            [good] * 3 + [GRPOExample(prompt.messages, (20, 21), (-1.0,), 1.0)],
            "2 tokens but 1 sampler logprobs",
        ),
        ([good] * 3 + [GRPOExample(prompt.messages, (20, 21), (-1.0, float("nan")), 1.0)], "NaN"),
        (
            [good] * 3 + [GRPOExample(prompt.messages, (20, 21), (-1.0, -1.0), float("nan"))],
            "advantage nan is not finite",
        ),
        ([good] * 3 + [GRPOExample(prompt.messages, (), (), 1.0)], "no tokens"),
    ]
    for batch, message in cases:
        with pytest.raises(BatchError, match=message):
            grpo.step(batch)
    after = lora_params(grpo)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_exported_adapter_loads_in_peft_and_matches_the_learner(grpo, tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import Qwen3VLForConditionalGeneration

    update = grpo.export(tmp_path, version=7)
    assert update.version == 7 and (update.adapter_dir / "adapter_config.json").exists()
    base = Qwen3VLForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(update.adapter_dir)).eval()
    prompt = make_prompt("a")
    seq = encode(grpo.processor, prompt.messages, [20, 31, 40])
    with torch.no_grad():
        ours = completion_logits(grpo.engine.module, seq, grpo.device)
        theirs = completion_logits(loaded, seq, "cpu")
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_checkpoint_round_trip(grpo, tmp_path):
    grpo.save_checkpoint(tmp_path, "step3", {"step": 3, "position": 12})
    before = lora_params(grpo)
    with torch.no_grad():
        for p in grpo.engine.module.parameters():
            if p.requires_grad:
                p.add_(1.0)
    state = grpo.load_checkpoint(tmp_path)
    assert state["step"] == 3 and state["position"] == 12
    after = lora_params(grpo)
    assert all(torch.equal(before[n], after[n]) for n in before)


def adapter_gradients(lrn, batch, **step_args) -> tuple:
    """One step's metrics and the adapter gradients the optimizer received (seen by wrapping
    the optimizer's step; ZeRO-0 keeps them on the parameters)."""
    seen = {}
    optimizer_step = lrn.engine.optimizer.step

    def step_and_keep(*args, **kwargs):
        for n, p in lrn.engine.module.named_parameters():
            if p.requires_grad:
                seen[n] = p.grad.detach().clone()
        return optimizer_step(*args, **kwargs)

    lrn.engine.optimizer.step = step_and_keep
    metrics = lrn.step(batch, **step_args)
    lrn.engine.optimizer.step = optimizer_step
    return metrics, seen


@pytest.mark.parametrize("loss_agg", ["seq_mean_token_mean", "token_mean", "seq_sum_norm"])
def test_grouped_pass_gives_the_per_completion_loss_and_gradients(tiny_model, loss_agg):
    """The packed group (prompt once, G completions after it, vision tower once) against one
    prompt + completion sequence per completion: loss and every adapter gradient equal to 1e-5
    relative in fp32, over two prompts of four completions of different lengths, with a KL
    term against a non-trivial reference (the adapters' B are not zero). One update: a second
    one would start from Adam steps that amplify fp32 rounding of near-zero gradients. Each
    learner is seen to run its own pass: the LM head runs once per group on the grouped pass
    (reference pass and update: 2 x 2 prompts), once per completion otherwise (2 x 8)."""
    prompts = [make_prompt("a", seed=0), make_prompt("b", seed=1)]
    lengths = [3, 1, 6, 2, 4, 5, 2, 7]
    rng = np.random.default_rng(0)
    batch = []
    for i, n in enumerate(lengths):
        ids = tuple(int(t) for t in rng.integers(20, 900, n))
        batch.append(GRPOExample(prompts[i // 4].messages, ids, (-6.0,) * n, float(rng.normal())))
    results = {}
    for learner_pass in ("per_completion", "grouped"):
        lrn = learner(
            tiny_model,
            batch_size=2,
            grad_clip=1e9,
            beta=0.05,
            learner_pass=learner_pass,
            loss_agg=loss_agg,
            max_tokens=8,
        )
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for _, p in sorted(lrn.engine.module.named_parameters(), key=lambda kv: kv[0]):
                if p.requires_grad:  # the same adapter in both learners, B not zero
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        forwards: list[int] = []  # the rows of logits of each LM head call
        lm_head = lrn.engine.module.get_base_model().lm_head
        hook = lm_head.register_forward_hook(
            lambda m, args, out, rows=forwards: rows.append(out.shape[1])
        )
        results[learner_pass] = adapter_gradients(lrn, batch)
        hook.remove()
        assert lrn.learner_pass == learner_pass
        if learner_pass == "grouped":  # per group: the prompt's last position + T_i - 1 each
            assert forwards == [1 + sum(lengths[:4]) - 4, 1 + sum(lengths[4:]) - 4] * 2
        else:
            assert forwards == lengths * 2
        del lrn
    (metrics_a, grads_a), (metrics_b, grads_b) = results["per_completion"], results["grouped"]
    assert metrics_a.loss == pytest.approx(metrics_b.loss, rel=1e-5)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    assert sum(float(g.abs().sum()) for g in grads_a.values()) > 0
    # relative to each gradient's norm (elementwise, entries near 0 carry fp32 rounding)
    worst = max(float((grads_b[n] - grads_a[n]).norm() / grads_a[n].norm()) for n in grads_a)
    assert worst < 1e-5, worst


def test_grouped_pass_refuses_a_batch_that_is_not_whole_groups(tiny_model):
    lrn = learner(tiny_model, batch_size=2, group_size=2)
    a, b = make_prompt("a", seed=0), make_prompt("b", seed=1)
    batch = [GRPOExample(m, (20, 21), (-1.0, -1.0), 1.0) for m in (a.messages,) * 3]
    batch.append(GRPOExample(b.messages, (20, 21), (-1.0, -1.0), 1.0))
    with pytest.raises(BatchError, match=r"needs 2 prompts .* got \[3, 1\]"):
        lrn.step(batch)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stages_train(tiny_model, stage):
    lrn = learner(tiny_model, zero_stage=stage)
    prompt = make_prompt("z")
    ids = [(20, 31), (21, 30), (22, 33), (23, 34)]
    batch = [
        GRPOExample(prompt.messages, i, tuple(current_logprobs(lrn, prompt.messages, list(i))), a)
        for i, a in zip(ids, (1.0, -1.0, 0.5, -0.5))
    ]
    before = {
        n: p.detach().clone() for n, p in lrn.engine.module.named_parameters() if p.requires_grad
    }
    metrics = lrn.step(batch)
    assert np.isfinite(metrics.loss) and metrics.grad_norm > 0
    del lrn, before


COMPLETIONS = [(20, 31, 40), (21, 30), (22, 33, 44, 55), (23,)]
ADVANTAGES = [1.5, -0.5, 0.5, 0.0]


@pytest.fixture(scope="module")
def from_sft(tiny_model, sft_adapter):
    return learner(tiny_model, sft_adapter=sft_adapter)


def test_reference_is_the_sft_policy_and_the_first_step_has_zero_kl(
    from_sft, tiny_model, sft_adapter
):
    from peft import PeftModel
    from transformers import Qwen3VLForConditionalGeneration

    prompt = make_prompt("a")
    base = Qwen3VLForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32)
    base_lp = logprobs_of(base, from_sft.processor, prompt.messages, [20, 31, 40])
    sft = PeftModel.from_pretrained(base, str(sft_adapter)).eval()
    sft_lp = logprobs_of(sft, from_sft.processor, prompt.messages, [20, 31, 40])
    assert (sft_lp - base_lp).abs().max() > 1e-3  # the SFT adapter changes the policy
    with from_sft.engine.module.disable_adapter():
        ref_lp = logprobs_of(
            from_sft.engine.module, from_sft.processor, prompt.messages, [20, 31, 40]
        )
    torch.testing.assert_close(ref_lp, sft_lp, atol=1e-5, rtol=1e-5)
    # Sampler logprobs from the SFT policy itself: step 1 starts at pi = pi_old = pi_ref.
    batch = [
        GRPOExample(
            prompt.messages,
            ids,
            tuple(logprobs_of(sft, from_sft.processor, prompt.messages, list(ids)).tolist()),
            a,
        )
        for ids, a in zip(COMPLETIONS, ADVANTAGES)
    ]
    metrics = from_sft.step(batch)
    assert metrics.kl == pytest.approx(0.0, abs=1e-6)
    assert metrics.loss == pytest.approx(-0.375, abs=1e-5)  # -(1/G) sum_i A_i
    assert metrics.logprob_gap_max < 1e-4


def test_tokens_are_scored_at_the_sampling_temperature(tiny_model):
    """With rollout.temperature T the learner's pi_old is log softmax(logits / T): the sampler's
    tempered logprobs match it (gap ~0), the untempered ones do not."""
    cfg = GRPOConfig(
        lr=1e-3,
        zero_stage=0,
        precision="fp32",
        gradient_checkpointing=False,
        lora=LoraSettings(rank=4, alpha=8),
    )
    lrn = GRPOLearner(tiny_model, cfg, group_size=4, total_steps=4, temperature=0.5)
    prompt = make_prompt("a")
    raw = [
        logprobs_of(lrn.engine.module, lrn.processor, prompt.messages, list(c)) for c in COMPLETIONS
    ]
    tempered = []
    for ids in COMPLETIONS:
        seq = encode(lrn.processor, prompt.messages, list(ids))
        with torch.no_grad():
            logits = completion_logits(lrn.engine.module, seq, "cpu") / 0.5
        tempered.append(token_logprobs(logits, seq.completion_ids))
    assert max(float((a - b).abs().max()) for a, b in zip(raw, tempered)) > 0.05
    batch = [
        GRPOExample(prompt.messages, ids, tuple(lp.tolist()), a)
        for ids, lp, a in zip(COMPLETIONS, tempered, ADVANTAGES)
    ]
    assert lrn.step(batch).logprob_gap_max < 1e-4
    with pytest.raises(ValueError, match="temperature must be > 0"):
        GRPOLearner(tiny_model, cfg, group_size=4, total_steps=4, temperature=0.0)
    del lrn


def test_policy_base_and_stacked_adapter_reproduce_the_trained_policy(
    from_sft, tiny_model, tmp_path
):
    from peft import PeftModel
    from transformers import Qwen3VLForConditionalGeneration

    prompt = make_prompt("b", seed=3)
    ids = [20, 31, 40, 41]
    ours = logprobs_of(from_sft.engine.module, from_sft.processor, prompt.messages, ids)
    with from_sft.engine.module.disable_adapter():
        ref = logprobs_of(from_sft.engine.module, from_sft.processor, prompt.messages, ids)
    assert (ours - ref).abs().max() > 1e-4  # the GRPO adapter has moved (previous test's step)
    # The rollout engines' weights: base with SFT merged, plus the pushed GRPO adapter.
    folder = from_sft.write_policy_base(tmp_path / "policy-base")
    assert from_sft.write_policy_base(tmp_path / "policy-base") == folder  # kept, not redone
    merged = Qwen3VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    torch.testing.assert_close(
        logprobs_of(merged, from_sft.processor, prompt.messages, ids), ref, atol=1e-5, rtol=1e-5
    )
    update = from_sft.export(tmp_path / "weights", version=1)
    served = PeftModel.from_pretrained(merged, str(update.adapter_dir)).eval()
    torch.testing.assert_close(
        logprobs_of(served, from_sft.processor, prompt.messages, ids), ours, atol=1e-5, rtol=1e-5
    )
    # The final export: one adapter (rank 4 + 8) on the original base gives the same policy.
    final = from_sft.export_final(tmp_path / "adapter")
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["r"] == 12 and config["lora_alpha"] == 12
    base = Qwen3VLForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32)
    stacked = PeftModel.from_pretrained(base, str(final)).eval()
    torch.testing.assert_close(
        logprobs_of(stacked, from_sft.processor, prompt.messages, ids), ours, atol=1e-5, rtol=1e-5
    )


def test_pi_old_comes_from_the_learner_and_the_sampler_gap_is_reported(tiny_model):
    lrn = learner(tiny_model)
    prompt = make_prompt("c", seed=4)
    true = [
        logprobs_of(lrn.engine.module, lrn.processor, prompt.messages, list(i)) for i in COMPLETIONS
    ]
    # A sampler that disagrees with the learner by 0.3 nats on every token.
    batch = [
        GRPOExample(prompt.messages, ids, tuple((lp + 0.3).tolist()), a)
        for ids, lp, a in zip(COMPLETIONS, true, ADVANTAGES)
    ]
    metrics = lrn.step(batch)
    # rho = pi / pi_old = 1 exactly on the first update: nothing is clipped, loss = -mean A.
    assert metrics.ratio_mean == pytest.approx(1.0, abs=1e-6)
    assert metrics.clip_fraction == 0.0
    assert metrics.loss == pytest.approx(-0.375, abs=1e-5)
    assert metrics.logprob_gap_mean == pytest.approx(0.3, abs=1e-4)
    assert metrics.logprob_gap_max == pytest.approx(0.3, abs=1e-4)


def test_truncated_importance_sampling_weights_each_token(tiny_model):
    lrn = learner(tiny_model, tis_cap=1.2)
    prompt = make_prompt("d", seed=5)
    true = [
        logprobs_of(lrn.engine.module, lrn.processor, prompt.messages, list(i)) for i in COMPLETIONS
    ]
    # sampler logprobs lower by 0.1 (w = e^0.1 = 1.105) on completion 0, by 1 on completion 2
    # (w = e = 2.72, capped at 1.2), equal elsewhere (w = 1)
    shifts = [0.1, 0.0, 1.0, 0.0]
    batch = [
        GRPOExample(prompt.messages, ids, tuple((lp - d).tolist()), a)
        for ids, lp, d, a in zip(COMPLETIONS, true, shifts, ADVANTAGES)
    ]
    metrics = lrn.step(batch)
    expected = -(1.5 * math.exp(0.1) - 0.5 * 1.0 + 0.5 * 1.2 + 0.0) / 4
    assert metrics.loss == pytest.approx(expected, abs=1e-5)


def saved_activation_bytes(lrn, messages, ids) -> int:
    """Bytes autograd keeps for backward during one forward pass of the policy."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    seq = encode(lrn.processor, messages, ids)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        completion_logits(lrn.engine.module, seq, lrn.device)
    return total


def test_the_learner_trains_in_training_mode_so_checkpointing_saves_memory(tiny_model):
    lrn = learner(tiny_model)  # gradient_checkpointing=True
    assert lrn.engine.module.training
    prompt = make_prompt("e", slices=8, seed=6)
    kept = saved_activation_bytes(lrn, prompt.messages, list(range(20, 84)))
    lrn.engine.module.eval()  # transformers checkpoints only in training mode
    full = saved_activation_bytes(lrn, prompt.messages, list(range(20, 84)))
    lrn.engine.module.train()
    assert kept < 0.5 * full, (kept, full)


def test_a_new_engine_survives_the_torch_world_being_torn_down_under_deepspeed():
    """vLLM's in-process engine destroys the torch process group on shutdown; DeepSpeed keeps
    its cached groups of that world. The next learner in the same process must still build and
    step (without the fix: "Group ... is not registered"). Own process: it tears down a world."""
    import subprocess
    import sys

    script = """
import torch, torch.distributed as dist
from learner.engine import build_engine, deepspeed_config
config = deepspeed_config(1e-2, 0.0, 1.0, 0, "fp32", 1)
first = build_engine(torch.nn.Linear(4, 4), config, 10, 0.0)
dist.destroy_process_group()
second = build_engine(torch.nn.Linear(4, 4), config, 10, 0.0)
before = second.module.weight.detach().clone()
second.backward(second(torch.ones(1, 4)).sum())
second.step()
print("moved", float((second.module.weight - before).abs().max()))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    moved = float(done.stdout.split("moved")[-1])
    assert moved > 1e-4, done.stdout


SFT_TARGET = (
    '<think>The query refers to the liver.</think><answer>{"key_slice": 2, '
    '"bbox_2d_list": [[3, 5, 30, 41]]}</answer>'
)


@pytest.mark.parametrize("learner_pass", ["grouped", "per_completion"])
def test_the_sft_term_adds_sft_coef_times_the_targets_cross_entropy(tiny_model, learner_pass):
    """grpo.sft_coef: with zero advantages and no KL an update is the SFT term alone. Its loss
    is the target's token-mean cross-entropy at temperature 1 (rollouts are scored at 0.5 here),
    computed by hand; its gradient is sft_coef times that cross-entropy's on either learner pass
    (one micro-batch per group, or one per completion); the update lowers it. Without the
    targets the step refuses."""
    from learner.encoding import target_ids
    from learner.grpo_learner import SFTExample

    cfg = GRPOConfig(
        lr=1e-2,
        zero_stage=0,
        warmup_ratio=0.0,
        precision="fp32",
        gradient_checkpointing=False,
        grad_clip=1e9,
        beta=0.0,
        sft_coef=0.5,
        learner_pass=learner_pass,
        lora=LoraSettings(rank=4, alpha=8),
    )
    lrn = GRPOLearner(tiny_model, cfg, group_size=4, total_steps=4, temperature=0.5)
    prompt, other = make_prompt("a", seed=0), make_prompt("b", seed=1)
    batch = [GRPOExample(prompt.messages, ids, (-6.0,) * len(ids), 0.0) for ids in COMPLETIONS]
    seq = encode(lrn.processor, other.messages, target_ids(lrn.processor, SFT_TARGET))
    names = [n for n, p in lrn.engine.module.named_parameters() if p.requires_grad]
    params = [p for p in lrn.engine.module.parameters() if p.requires_grad]

    def cross_entropy():
        logits = completion_logits(lrn.engine.module, seq, lrn.device)  # temperature 1
        return -token_logprobs(logits, seq.completion_ids).mean()

    before = cross_entropy()
    by_hand = dict(zip(names, torch.autograd.grad(before, params)))
    with pytest.raises(BatchError, match=r"needs one SFT target per prompt \(1\), got none"):
        lrn.step(batch)
    metrics, seen = adapter_gradients(
        lrn, batch, sft_batch=[SFTExample(other.messages, SFT_TARGET)]
    )
    assert metrics.loss == pytest.approx(0.0, abs=1e-7)  # the GRPO part: every A_i is 0
    assert metrics.sft_loss == pytest.approx(float(before.detach()), rel=1e-5)
    assert sum(float(g.abs().sum()) for g in by_hand.values()) > 0
    worst = max(
        float((seen[n] - 0.5 * by_hand[n]).norm() / by_hand[n].norm())
        for n in names
        if by_hand[n].norm() > 0
    )
    assert worst < 1e-5, worst
    with torch.no_grad():
        assert float(cross_entropy()) < float(before.detach()) - 0.05
    with pytest.raises(ValueError, match="sft_coef must be >= 0, got -1"):
        GRPOConfig(sft_coef=-1.0)


def test_the_grouped_pass_refuses_an_attention_kernel_without_4d_masks_and_unmarked_images(
    tiny_model,
):
    """No silent fallback: grpo.learner_pass grouped on a kernel that takes no 4D mask stops
    with the field, the kernel and the way out; a prompt with images but no mm_token_type_ids
    is refused rather than packed with its image tokens numbered as text."""
    from learner.encoding import check_packing, encode_prompt, pack_group

    lrn = learner(tiny_model, learner_pass="grouped")
    model = lrn.engine.module
    check_packing(model)  # sdpa: takes the mask
    config = model.get_base_model().model.config
    config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(ValueError, match=r"grpo.learner_pass: grouped .* 'flash_attention_2'"):
            check_packing(model)
    finally:
        config._attn_implementation = "sdpa"
    prompt = encode_prompt(lrn.processor, make_prompt("a").messages)
    assert "pixel_values" in prompt and "mm_token_type_ids" in prompt
    pack_group(model, prompt, [[20, 21]])
    del prompt["mm_token_type_ids"]
    with pytest.raises(ValueError, match="has images but no mm_token_type_ids"):
        pack_group(model, prompt, [[20, 21]])
    del lrn
