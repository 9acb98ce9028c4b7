"""Wall time of one GRPO step (generate, reward, learn, weight sync) on the tiny config, ours
against TRL's ``GRPOTrainer`` doing the same work: same tiny Qwen3-VL checkpoint, same
multi-image prompts, G = 4, batch of 1 prompt, LoRA rank 16, and our four reward terms passed to
TRL as its reward function. Run from the repository root:

    python -m bench.grpo_step [--shape tiny|paper] [--steps 3] [--slices S] [--slice-size PX]
                              [--max-tokens T]

``--shape paper`` is the paper's prompt: 64 slices of 256 px (4,096 image tokens) and up to 256
new tokens; ``tiny`` (default) is 16 slices of 128 px and 64 tokens.

Ours runs the Ray-free cores in one process (vLLM engine, reward scorer, DeepSpeed learner with
the grouped pass, LoRA push to vLLM); TRL generates with transformers in the training process
(its default). The two alternate step by step (each of our steps runs right after one of TRL's,
from TRL's step callback), the first step of each is a warm-up, and the output ends with the
median per-step ratio, its min-max spread and the line ``TRL / ours: N.NNx``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common.cli import ArgumentParser, UsageError, command

G = 4  # completions per prompt
SHAPES = {"tiny": (16, 128, 64), "paper": (64, 256, 256)}  # slices, slice size, max tokens


def parse_args(argv: list[str] | None):
    parser = ArgumentParser(prog="python -m bench.grpo_step", description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=tuple(SHAPES), default="tiny")
    parser.add_argument("--steps", type=int, default=3, help="measured steps (>= 3)")
    parser.add_argument("--slices", type=int, help="slices per prompt (default: the shape's)")
    parser.add_argument(
        "--slice-size", type=int, help="side of a slice in px (default: the shape's)"
    )
    parser.add_argument("--max-tokens", type=int, help="new tokens at most (default: the shape's)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        raise UsageError(f"--steps {args.steps}: must be at least 1")
    slices, size, tokens = SHAPES[args.shape]
    args.slices = args.slices or slices
    args.slice_size = args.slice_size or size
    args.max_tokens = args.max_tokens or tokens
    return args


@command()
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from common.runtime import set_default_environment

    set_default_environment()
    from common.config import LoraSettings, RewardConfig
    from reward_server.scorer import RewardScorer
    from rollout.tiny_model import build_tiny_qwen3vl

    tmp = Path(tempfile.mkdtemp())
    model = build_tiny_qwen3vl(tmp / "tiny", "test")
    samples = phantom_samples(tmp, args)
    scorer = RewardScorer(RewardConfig(propagator="baseline"))
    lora = LoraSettings(rank=16, alpha=32, dropout=0.0)
    our_step, ours = our_grpo_step(model, samples, scorer, lora, tmp, args)
    trl_steps, phases = trl_grpo_steps(model, samples, scorer, lora, tmp, args, our_step)
    print_comparison(args, np.array(ours[1:]), trl_steps, phases)
    return 0


def phantom_samples(tmp: Path, args) -> list:
    """One training sample per step (and one to warm up), at the prompt shape asked for."""
    from common.config import DataConfig
    from data.dataset import VolumeDataset
    from data.phantoms import write_phantoms

    side = max(128, args.slice_size)
    manifest = write_phantoms(
        tmp / "data", n=4, seed=0, shape=(max(48, args.slices + 16), side, side), progress=False
    )
    data = DataConfig(num_slices=args.slices, slice_size=args.slice_size, cache_dir=tmp / "cache")
    ds = VolumeDataset(manifest, data, split="train")
    return [ds[i] for i in range(args.steps + 1)]


def our_grpo_step(model: Path, samples: list, scorer, lora, tmp: Path, args):
    """Ours: the cores of one GRPO step in one process (vLLM engine, reward scorer, DeepSpeed
    learner with the grouped pass, LoRA push to vLLM). Returns the step function and the list
    its (generate, reward, learn, sync) times go to."""
    import torch

    from common.config import GRPOConfig, RolloutConfig
    from data.prompts import build_messages
    from learner.grpo import group_advantages
    from learner.grpo_learner import GRPOExample, GRPOLearner
    from rollout.records import RolloutPrompt
    from rollout.vllm_engine import VLLMEngine

    max_len = 1024 + args.slices * (args.slice_size // 32) ** 2 + args.max_tokens
    rollout = RolloutConfig(
        max_tokens=args.max_tokens,
        in_process=True,
        max_model_len=max_len,
        max_lora_rank=16,
        max_images=args.slices,
    )
    engine = VLLMEngine(model, rollout)
    cfg = GRPOConfig(
        lr=1e-4, zero_stage=0, precision="fp32", gradient_checkpointing=False, lora=lora
    )
    learner = GRPOLearner(model, cfg, group_size=G, total_steps=args.steps + 1)
    ours: list[tuple[float, float, float, float]] = []

    def step(n: int) -> None:
        sample, prepared = samples[n]
        prompt = RolloutPrompt(sample.id, build_messages(np.asarray(prepared.slices), sample.query))
        t0 = time.perf_counter()
        (group,) = engine.generate([prompt], seed=n)
        t1 = time.perf_counter()
        rewards = scorer.score_group(prepared, [c.text for c in group.completions])
        t2 = time.perf_counter()
        adv = group_advantages(torch.tensor([[r.total for r in rewards]]))[0]
        learner.step(
            [
                GRPOExample(
                    prompt.messages,
                    c.token_ids,
                    c.logprobs,
                    float(a),
                    prompt_token_ids=group.prompt_token_ids,
                )
                for c, a in zip(group.completions, adv)
            ]
        )
        t3 = time.perf_counter()
        engine.update_weights(learner.export(tmp / "weights", n + 1))
        t4 = time.perf_counter()
        ours.append((t1 - t0, t2 - t1, t3 - t2, t4 - t3))

    return step, ours


def trl_grpo_steps(model: Path, samples: list, scorer, lora, tmp: Path, args, after_each):
    """TRL's ``GRPOTrainer`` on the same model, prompts, G and rewards, generating with
    transformers in the training process (its default); ``after_each(step)`` runs right after
    each of its steps. Returns its step times and its generate and reward phase times, each
    without the first (warm-up) step."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration, TrainerCallback
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    from data.prompts import build_messages

    by_id = {s.id: p for s, p in samples}

    def our_reward(prompts, completions, sample_id, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        texts = [t if isinstance(t, str) else "".join(p.get("text", "") for p in t) for t in texts]
        return [scorer.score_group(by_id[sid], [t])[0].total for sid, t in zip(sample_id, texts)]

    rows = []
    for sample, prepared in samples:
        messages = build_messages(np.asarray(prepared.slices), sample.query)
        images = [p.pop("image") for m in messages for p in m["content"] if p["type"] == "image"]
        rows.append({"prompt": messages, "images": images, "sample_id": sample.id})
    dataset = Dataset.from_list(rows)
    phases = {"generate": [], "reward": []}

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], 0.0

        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.start)
            after_each(len(self.times) - 1)  # ours right after TRL's step on the same prompt

    timer = StepTimer()
    trl_args = TRLConfig(
        output_dir=str(tmp / "trl"),
        per_device_train_batch_size=G,
        num_generations=G,
        max_completion_length=args.max_tokens,
        learning_rate=1e-4,
        max_steps=len(samples),
        beta=0.01,
        epsilon=0.2,
        temperature=1.0,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        gradient_checkpointing=False,
        shuffle_dataset=False,
        seed=0,
    )
    trainer = GRPOTrainer(
        model=Qwen3VLForConditionalGeneration.from_pretrained(model, dtype=torch.float32),
        reward_funcs=our_reward,
        args=trl_args,
        train_dataset=dataset,
        processing_class=AutoProcessor.from_pretrained(model),
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=lora.target_modules),
        callbacks=[timer],
    )
    for name, method in (("generate", "_generate"), ("reward", "_calculate_rewards")):
        real = getattr(trainer, method)

        def timed(*a, _real=real, _name=name, **k):
            t = time.perf_counter()
            out = _real(*a, **k)
            phases[_name].append(time.perf_counter() - t)
            return out

        setattr(trainer, method, timed)
    trainer.train()
    # The first step of each side warms every part up.
    return np.array(timer.times[1:]), {k: np.array(v[1:]) for k, v in phases.items()}


def print_comparison(args, ours: np.ndarray, trl_steps: np.ndarray, phases: dict) -> None:
    """Per phase, the median seconds of both sides; then the per-step ratio TRL / ours."""
    o = np.median(ours, axis=0)
    ratios = trl_steps / ours.sum(axis=1)
    t_total = float(np.median(trl_steps))
    t_gen, t_rew = float(np.median(phases["generate"])), float(np.median(phases["reward"]))
    t_learn = float(np.median(trl_steps - phases["generate"] - phases["reward"]))
    tokens = args.slices * (args.slice_size // 32) ** 2
    print(
        f"one GRPO step, tiny Qwen3-VL, 1 prompt x G={G}, {args.slices} slices of "
        f"{args.slice_size} px ({tokens} image tokens), max {args.max_tokens} new tokens, CPU "
        f"(median of {len(ratios)} interleaved steps, seconds)"
    )
    print(f"  {'phase':12s} {'ours':>8s} {'TRL':>8s}")
    print(f"  {'generate':12s} {o[0]:8.2f} {t_gen:8.2f}")
    print(f"  {'reward':12s} {o[1]:8.2f} {t_rew:8.2f}")
    print(f"  {'learn':12s} {o[2]:8.2f} {t_learn:8.2f}")
    print(f"  {'weight sync':12s} {o[3]:8.2f} {'(none)':>8s}")
    print(f"  {'total':12s} {float(np.median(ours.sum(axis=1))):8.2f} {t_total:8.2f}")
    print(
        f"TRL / ours per step: median {np.median(ratios):.2f}x, "
        f"spread {ratios.min():.2f}x-{ratios.max():.2f}x"
    )
    print(f"TRL / ours: {np.median(ratios):.2f}x")


if __name__ == "__main__":
    sys.exit(main())
