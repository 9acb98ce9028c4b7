"""A single-GPU check without Ray: time, peak memory and numerics of the learner, MedSAM2, rollout.

    bash scripts/gpu_check.sh [--model DIR] [--medsam2 CKPT] [--repeats 3] [--only learner]
    bash scripts/gpu_check.sh --smoke        # on the CPU, tiny sizes: it runs (no GPU needed)

What it measures, each at the paper's shape (64 slices of 256 px = 4,096 image tokens, G = 4):

- learner: one GRPO learner step (``GRPOLearner``, grouped pass: reference pass, policy pass,
  backward, update), 4 completions of 256 tokens, LoRA rank 128 on every language projection,
  bf16, gradient checkpointing on, ZeRO-2 (``configs/paper.yaml``); step time, peak CUDA
  memory and model FLOPs utilisation (MFU, :func:`step_flops`); then the largest and mean gap
  between the grouped pass's token log-probabilities and the per-completion pass's, in the
  learner's precision (the grouped pass is exact in fp32; bf16 is where it could drift);
- push: the GPU's ends of an in-memory push of that rank-128 adapter (528 MB in bf16 at the 4B
  architecture): gathered from the learner to host memory and packed into one buffer, then
  unpacked and copied onto the device as vLLM's worker does, and checked bit-identical;
- propagation: MedSAM2 (SAM2.1 Hiera-tiny at 512 px, bf16 autocast) propagating a group of
  G = 4 anchors over +-5 slices of a 64-slice volume, with fresh image features (cold) and with
  them cached (warm); then the batched group against MedSAM2's own per-anchor procedure
  (``propagate_reference``) under the same autocast: logit gap and mask Dice;
- rollout: the transformers engine sampling G = 4 completions of up to 256 tokens for one
  prompt of that shape; and vLLM doing the same when it imports (else the part says why not).

The policy is ``--model`` (a Qwen3-VL checkpoint folder, e.g. Qwen3-VL-4B-Instruct) or, without
it, a random Qwen3-VL of Qwen3-VL-4B's architecture built here (all 36 language layers unless
``--layers``) with the tokenizer and processor of the project's tiny Qwen3-VL
(``rollout.tiny_model``): nothing is downloaded. Random weights do not change the cost of a
pass; they only make the rollout run to its full length (no end-of-turn token comes). MedSAM2 is
``--medsam2`` (a MedSAM2 checkpoint, e.g. MedSAM2_latest.pt) or random weights written by
``write_random_checkpoint``. ``--smoke`` runs everything on the CPU with the tiny model, 8
slices of 64 px, SAM2 at 128 px and short completions, so a test can check every figure.
"""

from __future__ import annotations

import gc
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bench.learner import build_batch
from common.cli import ArgumentParser, UsageError, add_device_argument, command

G = 4  # completions per prompt (bench.learner.build_batch makes a group of 4)

# Qwen3-VL-4B-Instruct's published config.json (text_config and vision_config). transformers'
# own Qwen3VLConfig defaults are another size (text hidden 4096, 32 layers; vision depth 27,
# hidden 1152), so every field is given here. Built with all 36 layers: 4.44 B parameters.
QWEN3_VL_4B_TEXT = {
    "vocab_size": 151936,
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 262144,
    "tie_word_embeddings": True,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 5000000.0,
        "mrope_section": [24, 20, 20],
        "mrope_interleaved": True,
    },
}
QWEN3_VL_4B_VISION = {
    "depth": 24,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_heads": 16,
    "hidden_act": "gelu_pytorch_tanh",
    "out_hidden_size": 2560,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "num_position_embeddings": 2304,
    "deepstack_visual_indexes": [5, 11, 17],
}

# Dense (no sparsity) bf16 tensor-core peak in TFLOP/s from NVIDIA's data sheets, by a part of
# torch's device name; the first match wins, so specific names come before general ones.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),  # SXM; GH200 too
    ("H800", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("RTX A6000", 154.8),
    ("L4", 121.0),
    ("A10", 125.0),
)


def peak_tflops(device_name: str) -> float | None:
    """The table's dense bf16 peak for a device name, or None when the table has no entry."""
    for part, tflops in PEAK_BF16_TFLOPS:
        if part in device_name:
            return tflops
    return None


def qwen3vl_4b_config(token_ids: dict[str, int], layers: int):
    """Qwen3-VL-4B's architecture with ``layers`` language layers; the special token ids are the
    tokenizer's (image, video, vision start, vision end)."""
    from transformers import Qwen3VLConfig

    if not 1 <= layers <= QWEN3_VL_4B_TEXT["num_hidden_layers"]:
        raise ValueError(f"--layers must be 1..36 (Qwen3-VL-4B has 36), got {layers}")
    return Qwen3VLConfig(
        text_config={**QWEN3_VL_4B_TEXT, "num_hidden_layers": layers},
        vision_config=QWEN3_VL_4B_VISION,
        tie_word_embeddings=True,
        **token_ids,
    )


TOKEN_ID_FIELDS = (
    "image_token_id",
    "video_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
)


def build_qwen3vl_4b_like(out_dir: Path, layers: int, device: str, seed: int = 0) -> Path:
    """A checkpoint folder of a random Qwen3-VL-4B-architecture model (``layers`` language
    layers, bf16) with the tiny model's tokenizer, processor and generation settings."""
    from transformers import (
        AutoProcessor,
        GenerationConfig,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
    )

    from rollout.tiny_model import build_tiny_qwen3vl

    tiny = build_tiny_qwen3vl(out_dir / "tiny", "test")
    tiny_config = Qwen3VLConfig.from_pretrained(tiny)
    config = qwen3vl_4b_config({k: getattr(tiny_config, k) for k in TOKEN_ID_FIELDS}, layers)
    config.text_config.pad_token_id = tiny_config.text_config.pad_token_id
    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it runs: seconds on a GPU, minutes on a CPU
        model = Qwen3VLForConditionalGeneration(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig.from_pretrained(tiny)
    folder = out_dir / f"qwen3vl-4b-arch-{layers}-layers"
    model.save_pretrained(folder)
    AutoProcessor.from_pretrained(tiny).save_pretrained(folder)
    del model
    return folder


def parameter_count(model_dir: Path) -> int:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    with torch.device("meta"):  # shapes only, no memory
        model = Qwen3VLForConditionalGeneration(Qwen3VLConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class StepShape:
    """What one learner step pushes through the model: tokens, kept logits and image patches."""

    tokens: int  # T: the packed group, prompt once plus every completion
    kept: int  # K: positions whose logits are computed (logits_to_keep of the packed group)
    patches: int  # P: vision-tower patches of the prompt's images
    merge: int  # patches per merged image token (spatial_merge_size ** 2)


@dataclass(frozen=True)
class StepParameters:
    """Parameters a step's tokens pass through, grouped by what they run on."""

    text: int  # language layers and final norm (frozen base and LoRA), on every token
    lora: int  # the LoRA part of ``text`` (not run by the reference pass, adapter disabled)
    head: int  # lm_head (vocab x hidden; tied to the embeddings in the 4B), on kept positions
    vision: int  # vision blocks and patch embedding, on every patch
    merger: int  # patch mergers (the final one and DeepStack's), on every merged token


def step_parameters(model) -> StepParameters:
    """Sort a (peft-wrapped) Qwen3-VL's parameters by what they run on; embedding tables are
    lookups (no FLOPs) and the head is counted from the config (a tied head has no parameter
    of its own)."""
    text = lora = vision = merger = 0
    for name, param in model.named_parameters():
        n = param.numel()
        if ".visual." in name or name.startswith("visual."):
            if "merger" in name:
                merger += n
            elif "pos_embed" not in name:
                vision += n
        elif "embed_tokens" in name or "lm_head" in name:
            continue
        else:
            text += n
            lora += n if "lora_" in name else 0
    config = model.config.text_config
    return StepParameters(text, lora, config.vocab_size * config.hidden_size, vision, merger)


def step_flops(params: StepParameters, shape: StepShape, reference: bool) -> dict[str, float]:
    """Model FLOPs of one grouped learner step, by the usual 6·N·T for forward + backward and
    2·N·T for a forward alone (attention's T² terms and checkpointing's recompute not counted):

        policy    = 6 · (N_text · T + N_head · K)
        reference = 2 · ((N_text - N_lora) · T + N_head · K)       (when KL is on)
        vision    = 2 · (N_vision · P + N_merger · P / merge)      (once per prompt, frozen)
    """
    text = params.text * shape.tokens + params.head * shape.kept
    base = (params.text - params.lora) * shape.tokens + params.head * shape.kept
    flops = {
        "policy": 6.0 * text,
        "reference": 2.0 * base if reference else 0.0,
        "vision": 2.0
        * (params.vision * shape.patches + params.merger * shape.patches / shape.merge),
    }
    flops["total"] = sum(flops.values())
    return flops


def step_shape(processor, batch, merge: int) -> StepShape:
    from learner.encoding import encode_prompt

    prompt = encode_prompt(processor, batch[0].messages)
    lengths = [len(ex.completion_ids) for ex in batch]
    return StepShape(
        tokens=int(prompt["input_ids"].shape[1]) + sum(lengths),
        # the prompt's last position, then every completion position but its last (pack_group)
        kept=1 + sum(n - 1 for n in lengths),
        patches=int(prompt["image_grid_thw"].prod(-1).sum()),
        merge=merge,
    )


def reset_peak(device: str) -> float:
    """Free what is unreferenced and restart the peak count; the GiB still allocated."""
    gc.collect()
    if device != "cuda":
        return 0.0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated() / 2**30


def peak_memory(device: str, held: float) -> str:
    """The peak since :func:`reset_peak`, which found ``held`` GiB allocated (the part's
    weights and state: the rest of the peak is what the timed runs added)."""
    if device == "cuda":
        allocated = torch.cuda.max_memory_allocated() / 2**30
        reserved = torch.cuda.max_memory_reserved() / 2**30
        return (
            f"peak CUDA memory {allocated:.2f} GiB allocated ({held:.2f} GiB held when the "
            f"timed runs began), {reserved:.2f} GiB reserved"
        )
    # ru_maxrss is in KiB on Linux and only grows: the process's peak so far
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return f"peak RSS of the process so far {rss:.2f} GiB (no CUDA device)"


def timed(device: str, fn, *args, **kwargs):
    """(seconds, result) of one call, with the GPU's queued work finished on both ends."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def spread(seconds: list[float], unit: str = "s") -> str:
    scale = {"s": 1, "ms": 1e3}[unit]
    low, mid, high = (scale * v for v in (min(seconds), statistics.median(seconds), max(seconds)))
    runs = f"{len(seconds)} runs" if len(seconds) > 1 else "1 run"
    return f"median {mid:.3f} {unit} (min {low:.3f}, max {high:.3f}, {runs} after a warm-up)"


def si(value: float, unit: str) -> str:
    """``value`` with the largest SI prefix that keeps it at 1 or more: 612.34 GFLOP."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.2f} {unit}"


def say(part: str, text: str) -> None:
    print(f"[{part}] {text}", flush=True)


def check_learner(model_dir: Path, args, peak: float | None) -> None:
    from common.config import GRPOConfig, LoraSettings
    from learner.grpo_learner import GRPOLearner

    batch = build_batch(args.slices, args.slice_size, args.tokens)
    cfg = GRPOConfig(
        zero_stage=args.zero_stage,
        gradient_checkpointing=True,
        precision=args.precision,
        learner_pass="grouped",
        lora=LoraSettings(rank=128, alpha=256),
    )
    learner = GRPOLearner(model_dir, cfg, group_size=G, total_steps=args.repeats + 1)
    merge = learner.engine.module.config.vision_config.spatial_merge_size**2
    shape = step_shape(learner.processor, batch, merge)
    params = step_parameters(learner.engine.module)
    flops = step_flops(params, shape, reference=cfg.beta != 0 and cfg.kl_estimator != "none")
    say(
        "learner",
        f"GRPO step, {learner.learner_pass} pass, ZeRO-{args.zero_stage}, {learner.precision}, "
        f"checkpointing on, LoRA r=128 ({params.lora / 1e6:.1f} M trainable): {args.slices} "
        f"slices of {args.slice_size} px ({shape.patches // merge} image tokens), {shape.tokens} "
        f"tokens packed (prompt once + G = {G} x {args.tokens})",
    )
    learner.step(batch)  # warm-up: kernels, allocator, optimizer state
    held = reset_peak(args.device)
    times = [timed(args.device, learner.step, batch)[0] for _ in range(args.repeats)]
    say("learner", f"step time {spread(times)}")
    say("learner", peak_memory(args.device, held))
    say(
        "learner",
        f"model FLOPs per step {si(flops['total'], 'FLOP')}: policy 6·N·T "
        f"{si(flops['policy'], 'FLOP')} + reference 2·N·T {si(flops['reference'], 'FLOP')} + "
        f"vision 2·N·P {si(flops['vision'], 'FLOP')} (N_text {params.text / 1e9:.3f} B, "
        f"N_head {params.head / 1e9:.3f} B on K = {shape.kept}, N_vision "
        f"{(params.vision + params.merger) / 1e9:.3f} B on P = {shape.patches} patches; "
        "attention T² terms and recompute not counted)",
    )
    achieved = flops["total"] / statistics.median(times)
    if peak is None:
        say(
            "learner",
            f"MFU unknown: {si(achieved, 'FLOP/s')} achieved, no peak for this device "
            "(give --peak-tflops)",
        )
    else:
        say(
            "learner",
            f"MFU {100 * achieved / (peak * 1e12):.2f}% ({si(achieved, 'FLOP/s')} achieved of "
            f"{si(peak * 1e12, 'FLOP/s')} peak)",
        )
    largest, mean, tokens = logprob_gap(learner, batch)
    say(
        "learner",
        f"grouped vs per-completion pass, {learner.precision}: token log-probabilities differ "
        f"by at most {largest:.2e} nats (mean {mean:.2e}) over {tokens} tokens",
    )
    check_push(learner, args)
    del learner
    reset_peak(args.device)


def check_push(learner, args) -> None:
    """The two ends of an in-memory adapter push, which touch the GPU: the learner's trained
    adapter gathered to host memory and packed into the one buffer a push sends
    (``adapter_tensors``, ``pack_tensors``), then unpacked and copied onto the device, as vLLM's
    worker does before it builds its LoRA model. What lies between them (Ray's object store,
    vLLM's engine-core socket) runs on the CPU and is timed by ``bench.rollout --push-only``."""
    from learner.adapters import adapter_tensors
    from rollout.vllm_engine import pack_tensors, unpack_tensors

    def send():
        adapter = adapter_tensors(learner.engine)
        return adapter, pack_tensors(adapter.tensors)

    def receive(specs, payload):
        return [t.to(args.device, copy=True) for t in unpack_tensors(specs, payload).values()]

    adapter, (specs, payload) = send()  # warm-up
    arrived = receive(specs, payload)
    same = all(
        torch.equal(a.cpu(), b) for a, b in zip(arrived, adapter.tensors.values(), strict=True)
    )
    sent = [timed(args.device, send)[0] for _ in range(args.repeats)]
    received = [timed(args.device, receive, specs, payload)[0] for _ in range(args.repeats)]
    dtype = str(next(iter(adapter.tensors.values())).dtype).removeprefix("torch.")
    say(
        "push",
        f"LoRA r={adapter.rank} adapter, {len(adapter.tensors)} tensors, "
        f"{adapter.nbytes / 1e6:.1f} MB {dtype}: learner side (gathered to host memory, packed "
        f"into one buffer) {spread(sent, 'ms')}",
    )
    say(
        "push",
        f"worker side (unpacked, copied onto the {args.device}) {spread(received, 'ms')}; "
        f"{'bit-identical to' if same else 'DIFFERENT from'} the learner's adapter; between them "
        "Ray's object store and vLLM's socket (python -m bench.rollout --push-only)",
    )


def logprob_gap(learner, batch) -> tuple[float, float, int]:
    """The largest and mean |grouped - per-completion| token log-probability (nats) of one
    group (``batch``) under the learner's current policy, in its precision, and the token
    count: the grouped pass packs the prompt once, so only its numerics can differ."""
    from learner.encoding import (
        completion_logits,
        encode_prompt,
        group_completion_logits,
        pack_group,
        token_logprobs,
        with_completion,
    )

    model = learner.engine.module
    prompt = encode_prompt(learner.processor, batch[0].messages)
    completions = [list(ex.completion_ids) for ex in batch]
    gaps = []
    with torch.no_grad():
        packed = pack_group(model, prompt, completions)
        grouped = group_completion_logits(model, packed, learner.device)
        for completion, logits in zip(completions, grouped):
            seq = with_completion(prompt, completion)
            alone = completion_logits(model, seq, learner.device)
            ids = seq.completion_ids
            gaps.append((token_logprobs(logits, ids) - token_logprobs(alone, ids)).abs())
    gap = torch.cat(gaps)
    return float(gap.max()), float(gap.mean()), gap.numel()


def check_propagation(work: Path, args) -> None:
    import numpy as np

    from data.answer import EvidenceAnchor
    from reward_server.propagation import MedSAM2Propagator, write_random_checkpoint

    if args.medsam2 is not None:
        checkpoint, weights = args.medsam2, f"checkpoint {args.medsam2.name}"
    else:
        checkpoint = write_random_checkpoint(
            work / f"medsam2-random-{args.image_size}.pt", args.image_size
        )
        weights = "random weights"
    propagator = MedSAM2Propagator(checkpoint, args.image_size, device=args.device)
    rng = np.random.default_rng(0)
    key = args.slices // 2
    s = args.slice_size
    # G distinct anchors on one key slice, the box nudged per completion (bench.reward_server)
    anchors = [
        EvidenceAnchor(key, ((s * 5 // 16 - g, s * 3 // 8, s * 11 // 16, s * 3 // 4),))
        for g in range(G)
    ]
    precision = "bf16 autocast" if args.device == "cuda" else "fp32"
    say(
        "propagation",
        f"MedSAM2 (SAM2.1 Hiera-tiny, {weights}) at {args.image_size} px, "
        f"{precision}: G = {G} anchors on slice {key} of {args.slices} slices of {s} px, "
        f"window +-{args.delta}",
    )

    def volume():
        return (rng.random((args.slices, s, s)) * 255).astype(np.uint8)

    window = args.delta
    propagator.propagate_group("warm-up", volume(), anchors, window)
    held = reset_peak(args.device)
    cold, warm, encoded = [], [], []
    for rep in range(args.repeats):
        slices, before = volume(), propagator.encoded_frames
        # a new volume (new slices): its image features are computed in this call
        seconds, _ = timed(
            args.device, propagator.propagate_group, f"v{rep}", slices, anchors, window
        )
        cold.append(seconds)
        encoded.append(propagator.encoded_frames - before)
        # the same volume again: features cached, tracking only
        seconds, _ = timed(
            args.device, propagator.propagate_group, f"v{rep}", slices, anchors, window
        )
        warm.append(seconds)
    say("propagation", f"group, features computed ({encoded[0]} slices encoded): {spread(cold)}")
    say("propagation", f"group, features cached: {spread(warm)}")
    say("propagation", peak_memory(args.device, held))
    largest, dice = batched_vs_reference(propagator, volume(), anchors, window)
    say(
        "propagation",
        f"batched group vs MedSAM2's per-anchor procedure, {precision}: logits differ by at "
        f"most {largest:.2e}, masks agree with Dice >= {dice:.4f} over the G = {G} anchors",
    )
    del propagator
    reset_peak(args.device)


def batched_vs_reference(propagator, slices, anchors, window: int) -> tuple[float, float]:
    """The largest |logit| gap between the batched group (``propagate_group``'s logits) and
    MedSAM2's own procedure for each anchor (``propagate_reference``), and the smallest Dice
    between their masks, on one volume."""
    from evaluation.metrics import dsc

    grouped = propagator.group_logits("compare", slices, anchors, window)
    masks = propagator.propagate_group("compare", slices, anchors, window)
    largest, dice = 0.0, 1.0
    for anchor, mask in zip(anchors, masks):
        key = anchor.key_slice - 1
        reference = propagator.reference_logits(
            "compare", slices, anchor.key_slice, anchor.boxes, window
        )
        for box, frames in reference.items():
            for frame, logits in frames.items():
                gap = float((grouped[key, box][frame] - logits).abs().max())
                largest = max(largest, gap)
        alone = propagator.propagate_reference(
            "compare", slices, anchor.key_slice, anchor.boxes, window
        )
        dice = min(dice, dsc(mask, alone))
    return largest, dice


def check_rollout(model_dir: Path, args) -> None:
    from common.config import ModelConfig, RolloutConfig
    from rollout.hf_engine import TransformersEngine
    from rollout.records import RolloutPrompt

    image_tokens = args.slices * (args.slice_size // 32) ** 2
    cfg = RolloutConfig(
        engine="transformers",
        group_size=G,
        max_tokens=args.max_tokens,
        max_model_len=image_tokens + 1024 + args.max_tokens,
        max_images=args.slices,
        slice_size=args.slice_size,
    )
    engine = TransformersEngine(model_dir, cfg, ModelConfig(dtype="auto"), device=args.device)
    prompt = RolloutPrompt("gpu-check", build_batch(args.slices, args.slice_size, 1)[0].messages)
    engine.cfg = replace(cfg, max_tokens=4)  # warm-up: a short answer
    engine.generate([prompt], seed=0)
    engine.cfg = cfg
    held = reset_peak(args.device)
    times, tokens = [], []
    for rep in range(args.repeats):
        seconds, (group,) = timed(args.device, engine.generate, [prompt], seed=rep)
        times.append(seconds)
        tokens.append(sum(len(c.token_ids) for c in group.completions))
    say(
        "rollout",
        f"transformers engine, {str(engine.dtype).removeprefix('torch.')}: G = {G} completions of "
        f"up to {args.max_tokens} tokens for one prompt of {len(group.prompt_token_ids)} tokens "
        f"({args.slices} slices of {args.slice_size} px)",
    )
    say("rollout", f"generate time {spread(times)}")
    rate = statistics.median(t / s for t, s in zip(tokens, times))
    say("rollout", f"{statistics.median(tokens):.0f} tokens per group, {rate:.1f} tokens/s")
    say("rollout", peak_memory(args.device, held))
    del engine
    reset_peak(args.device)


def check_vllm(model_dir: Path, args) -> None:
    """The rollout part on vLLM, when vLLM imports (a bare GPU box may have only torch)."""
    try:
        import vllm  # noqa: F401
    except Exception as error:  # not installed, or a build that cannot load on this machine
        say("vllm", f"skipped: vLLM does not import here ({type(error).__name__}: {error})")
        return
    from common.config import ModelConfig, RolloutConfig
    from rollout.records import RolloutPrompt
    from rollout.vllm_engine import VLLMEngine

    image_tokens = args.slices * (args.slice_size // 32) ** 2
    cfg = RolloutConfig(
        engine="vllm",
        group_size=G,
        max_tokens=args.max_tokens,
        max_model_len=image_tokens + 1024 + args.max_tokens,
        max_images=args.slices,
        slice_size=args.slice_size,
        enable_lora=False,
        in_process=True,
    )
    started, engine = timed(args.device, VLLMEngine, model_dir, cfg, ModelConfig(dtype="auto"))
    prompt = RolloutPrompt("gpu-check", build_batch(args.slices, args.slice_size, 1)[0].messages)
    engine.generate([prompt], seed=0)  # warm-up
    times, tokens = [], []
    for rep in range(args.repeats):
        seconds, (group,) = timed(args.device, engine.generate, [prompt], seed=rep + 1)
        times.append(seconds)
        tokens.append(sum(len(c.token_ids) for c in group.completions))
    say(
        "vllm",
        f"vLLM {vllm.__version__} engine (started in {started:.1f} s): G = {G} completions of up "
        f"to {args.max_tokens} tokens for one prompt of {len(group.prompt_token_ids)} tokens",
    )
    say("vllm", f"generate time {spread(times)}")
    rate = statistics.median(t / s for t, s in zip(tokens, times))
    say("vllm", f"{statistics.median(tokens):.0f} tokens per group, {rate:.1f} tokens/s")
    del engine
    reset_peak(args.device)


PARTS = ("learner", "propagation", "rollout", "vllm")
# Defaults of the size options: the paper's shape, and the CPU smoke run's
PAPER_SIZES = {
    "slices": 64,
    "slice_size": 256,
    "tokens": 256,
    "max_tokens": 256,
    "image_size": 512,
    "delta": 5,
    "repeats": 3,
}
SMOKE_SIZES = {
    "slices": 8,
    "slice_size": 64,
    "tokens": 16,
    "max_tokens": 16,
    "image_size": 128,
    "delta": 2,
    "repeats": 1,
}


def parse_args(argv: list[str] | None):
    parser = ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model and sizes, on the CPU unless --device"
    )
    add_device_argument(parser, "every part")
    parser.add_argument(
        "--model",
        type=Path,
        help="a Qwen3-VL checkpoint folder for the policy (default: a random Qwen3-VL-4B-"
        "architecture model built here)",
    )
    parser.add_argument(
        "--medsam2",
        type=Path,
        help="a MedSAM2 checkpoint (e.g. MedSAM2_latest.pt; default: random weights)",
    )
    parser.add_argument(
        "--layers",
        type=int,
        default=36,
        help="language layers of the random 4B-architecture model (of 36; without --model)",
    )
    parser.add_argument("--slices", type=int, help="slices per volume (default 64)")
    parser.add_argument("--slice-size", type=int, help="side of a slice in px (default 256)")
    parser.add_argument("--tokens", type=int, help="tokens per learner completion (default 256)")
    parser.add_argument("--max-tokens", type=int, help="rollout max new tokens (default 256)")
    parser.add_argument("--image-size", type=int, help="MedSAM2 input size (default 512)")
    parser.add_argument("--delta", type=int, help="propagation window +-Delta (default 5)")
    parser.add_argument("--repeats", type=int, help="timed runs per part (default 3)")
    parser.add_argument("--zero-stage", type=int, default=2, choices=(0, 1, 2, 3))
    parser.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "bf16", "fp32"),
        help="learner precision (auto: bf16 on a GPU that has it)",
    )
    parser.add_argument("--peak-tflops", type=float, help="the device's peak for MFU (TFLOP/s)")
    parser.add_argument("--only", action="append", choices=PARTS, help="run only this part")
    parser.add_argument("--work-dir", type=Path, help="where models are written (default: temp)")
    args = parser.parse_args(argv)
    sizes = SMOKE_SIZES if args.smoke else PAPER_SIZES
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device is None:
        args.device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device cuda: torch {torch.__version__} sees no CUDA device")
    if not 1 <= args.layers <= QWEN3_VL_4B_TEXT["num_hidden_layers"]:
        raise UsageError(f"--layers {args.layers}: Qwen3-VL-4B has 36 language layers; give 1..36")
    if args.model is not None and not (args.model / "config.json").is_file():
        raise UsageError(
            f"--model {args.model}: no config.json there (a Qwen3-VL checkpoint folder)"
        )
    if args.medsam2 is not None and not args.medsam2.is_file():
        raise UsageError(f"--medsam2 {args.medsam2}: no such file (a MedSAM2 checkpoint, .pt)")
    if args.slice_size % 32:
        raise UsageError(
            f"--slice-size {args.slice_size}: must be a multiple of 32 (patch 16, merge 2)"
        )
    if args.repeats < 1:
        raise UsageError(f"--repeats {args.repeats}: must be at least 1")
    return args


@command()
def main(argv: list[str] | None = None) -> int:
    from common.runtime import set_default_environment

    set_default_environment()
    args = parse_args(argv)
    parts = args.only or PARTS
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    peak = args.peak_tflops if args.peak_tflops is not None else peak_tflops(name)
    source = "--peak-tflops" if args.peak_tflops is not None else "table"
    print(
        f"gpu_check: {name}, torch {torch.__version__} (CUDA {torch.version.cuda}), peak bf16 "
        + (f"{peak:g} TFLOP/s ({source})" if peak is not None else "unknown"),
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if {"learner", "rollout", "vllm"} & set(parts):
            seconds, model_dir = timed(args.device, build_model, work, args)
            print(
                f"model: {model_description(args)}, {parameter_count(model_dir) / 1e9:.3f} B "
                f"parameters, written in {seconds:.1f} s",
                flush=True,
            )
        if "learner" in parts:
            check_learner(model_dir, args, peak)
        if "propagation" in parts:
            check_propagation(work, args)
        if "rollout" in parts:
            check_rollout(model_dir, args)
        if "vllm" in parts:
            check_vllm(model_dir, args)
    return 0


def build_model(work: Path, args) -> Path:
    if args.model is not None:
        return args.model
    if args.smoke:
        from rollout.tiny_model import build_tiny_qwen3vl

        return build_tiny_qwen3vl(work / "tiny", "test")
    return build_qwen3vl_4b_like(work, args.layers, args.device)


def model_description(args) -> str:
    if args.model is not None:
        return f"the Qwen3-VL checkpoint {args.model}"
    if args.smoke:
        return "the tiny test Qwen3-VL (random weights)"
    return (
        f"random Qwen3-VL of Qwen3-VL-4B's architecture with {args.layers} of its 36 language "
        "layers, bf16"
    )


if __name__ == "__main__":
    sys.exit(main())
