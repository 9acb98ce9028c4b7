"""The run's typed configuration: one dataclass per part, loaded from YAML plus ``key=value``.

Every field is declared here with a one-line comment and the paper's value as its default
(``configs/reference.yaml`` lists them all, generated from these dataclasses). The parts are
data (slices, window, Top-K), model and rollout, reward, SFT and GRPO, and the run around them.

The intensity window is chosen per dataset (suite), never per target label: every target of a
scan must be asked about on the same picture, or the picture itself tells which organ is wanted.
SFT, GRPO, the reward server and evaluation all prepare volumes through one ``DataConfig``, so
they see the same slices; ``python -m evaluation.predict --window`` takes the same presets.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import math
import re
import sys
import textwrap
import tokenize
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

NSD_TOLERANCE_MM = 2.0  # default surface-Dice tolerance (evaluation.nsd_tolerance_mm), mm

# --- data: slices, resizing, the intensity window, Top-K and the cache

# Named windows [low, high]: level L and width W give [L - W/2, L + W/2] in HU.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "abdomen": (-160.0, 240.0),  # L 40, W 400: abdominal soft tissue (the paper's suites)
    "soft_tissue": (-125.0, 225.0),  # L 50, W 350
    "lung": (-1350.0, 150.0),  # L -600, W 1500
    "bone": (-500.0, 1300.0),  # L 400, W 1800
    "brain": (0.0, 80.0),  # L 40, W 80
    "unit": (0.0, 1.0),  # arrays already normalised to 0..1, not HU (possibly M3D-Seg's .npy)
}

MIN_BOX_AREA = 4  # pixels; data.min_box_area's default


def derived(source: str, default: Any) -> Any:
    """A field of a part's config that the run config sets from its key ``source`` (one value,
    one key); a YAML file or override that sets it is refused, naming ``source``."""
    return field(default=default, metadata={"derived_from": source})


class WindowError(ValueError):
    """A window setting that is neither a known preset nor [low, high] with low < high."""


def resolve_window(value: str | Sequence[float], field: str) -> tuple[float, float]:
    """``(low, high)`` of a preset name or a ``[low, high]`` pair; ``field`` names the setting
    (``data.window``, ``data.suite_windows.kits23``, ``--window``) in the error."""
    if isinstance(value, str):
        if value not in WINDOW_PRESETS:
            raise WindowError(
                f"{field}: unknown window preset {value!r}; use one of "
                f"{sorted(WINDOW_PRESETS)} or [low, high]"
            )
        return WINDOW_PRESETS[value]
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise WindowError(
            f"{field}: {value!r} is neither a window preset nor [low, high]"
        ) from None
    if not low < high:
        raise WindowError(f"{field}: window [{low}, {high}] needs low below high")
    return low, high


@dataclass
class DataConfig:
    manifest: Path | None = None  # JSONL manifest of the dataset (paths relative to it)
    num_slices: int = 64  # axial slices sampled uniformly from each volume (paper: 64)
    slice_size: int = 256  # slices are resized to slice_size x slice_size (paper: 256)
    # SFT key slice drawn from the K slices of largest target area, K given for 64 slices (the
    # paper samples one of a Top-K without giving K; 5 here) and scaled to num_slices: the
    # same share of the volume, at least 1 (see key_slice_top_k).
    top_k: int = 5
    # Components smaller than this (pixels) give no box, in SFT targets as in the reward's true
    # boxes (the reward server is given the same value); a slice with none at least this big is
    # never an SFT key slice.
    min_box_area: int = MIN_BOX_AREA
    # Frame of the boxes in prompts, SFT targets and answers (data.answer): "pixels" of the slice,
    # or "relative1000", Qwen3-VL's grounding convention (0..1000 across the image)
    box_coords: str = "pixels"
    # Intensity window of every suite without its own entry: a preset name from WINDOW_PRESETS or
    # [low, high] (paper's suites are abdominal CT: "abdomen", level 40 width 400).
    window: str | list[float] = "abdomen"
    # Per-suite window (suite name -> preset name or [low, high]), e.g. {"ctorg": "unit"} for
    # arrays stored normalised to 0..1. Never per label: the picture must not depend on the target.
    suite_windows: dict[str, str | list[float]] = field(default_factory=dict)
    # M3D-Seg images (foreground z-scores, not HU): "unit" reads them min-max scaled to 0..1, M3D's
    # own input, for the `unit` window; "hu" maps them to approximate HU from their fat and
    # soft-tissue histogram peaks (data.volume.m3d_hu_map), for an HU window such as `abdomen`.
    # Other formats are in HU already and ignore it.
    m3d_intensity: str = "unit"
    cache_dir: Path | None = None  # preprocessed samples (memory-mappable); None = no cache
    # Training samples are asked with a phrasing drawn anew each time they are used (each SFT
    # epoch, each GRPO draw) from their target's training phrasings (data.queries), as
    # M3D-Seg's loaders draw a question per access; False: the manifest's one fixed query.
    resample_queries: bool = False
    queries_file: Path | None = None  # YAML adding to data/phrasings.yaml's targets; None: it alone

    def key_slice_top_k(self, top_k: int | None = None) -> int:
        """K of the Top-K key-slice draw at this slice count: ``top_k`` (default ``self.top_k``),
        given for 64 slices, times num_slices / 64, rounded, at least 1 (5 of 64 -> 1 of 8)."""
        k = self.top_k if top_k is None else top_k
        return max(1, round(k * self.num_slices / 64))

    def __post_init__(self) -> None:
        # Resolve every window now, so a typo fails when the config loads, not mid-run.
        resolve_window(self.window, "data.window")
        for suite, value in self.suite_windows.items():
            resolve_window(value, f"data.suite_windows.{suite}")
        if self.m3d_intensity not in ("unit", "hu"):
            raise ValueError(
                f"data.m3d_intensity must be 'unit' or 'hu', got {self.m3d_intensity!r}"
            )
        if self.min_box_area < 1:
            raise ValueError(f"data.min_box_area must be >= 1, got {self.min_box_area}")
        if self.box_coords not in ("pixels", "relative1000"):
            raise ValueError(
                f"data.box_coords must be 'pixels' or 'relative1000', got {self.box_coords!r}"
            )
        if self.box_coords == "relative1000" and self.slice_size > 1000:
            raise ValueError(
                f"data.box_coords relative1000: data.slice_size {self.slice_size} is over 1000, "
                "so pixel edges would not round-trip through 0-1000 coordinates"
            )

    def window_for(self, suite: str) -> tuple[float, float]:
        """The (low, high) window of every volume of ``suite``: its own entry, else the default."""
        if suite in self.suite_windows:
            return resolve_window(self.suite_windows[suite], f"data.suite_windows.{suite}")
        return resolve_window(self.window, "data.window")


# --- model and rollout: the policy checkpoint, sampling G completions per prompt


@dataclass
class ModelConfig:
    path: Path | None = None  # HF checkpoint folder (Qwen3-VL); None = build the tiny one here
    tiny_size: str = "test"  # tiny Qwen3-VL built when path is None: test | medium | small
    dtype: str = "auto"  # "auto": bfloat16 on GPU, float32 on CPU; or float32 / bfloat16
    # Tiny model only: epochs of the full-parameter grounding stage that stands for pretraining
    # (learner.grounding; 0: none, the random model is the base). Not part of the paper.
    grounding_epochs: int = 0
    grounding_lr: float = 1e-3  # AdamW peak lr of that stage (cosine decay to 0)
    grounding_cases: int = 100  # phantoms of the stage's own corpus (never a run's phantoms)
    # seeds the tiny model's init, the corpus and the stage: which stand-in, not the run's seed
    grounding_seed: int = 0
    grounding_cache: Path | None = None  # where it is kept; None: ~/.cache/medvol-r1/pretrained


@dataclass
class RolloutConfig:
    engine: str = "vllm"  # "vllm" or "transformers" (for machines without vLLM)
    group_size: int = 4  # G completions per prompt (paper: 4)
    temperature: float = 1.0  # sampling temperature for GRPO rollouts
    top_p: float = 1.0  # nucleus sampling mass
    max_tokens: int = 256  # max generation length (paper: 256)
    logprobs: bool = True  # return the sampled tokens' logprobs (pi_old for the clipped ratio)
    enable_prefix_caching: bool = True  # the G samples of a prompt share its prefill
    max_model_len: int = 6144  # 64 slices x 64 visual tokens + text + 256 generated
    max_images: int = 64  # images per prompt the engine accepts
    enable_lora: bool = True  # take LoRA adapters live (the learner trains LoRA)
    max_lora_rank: int = 128  # paper: LoRA rank 128
    num_actors: int = 1  # rollout actors, data-parallel over prompts (one GPU each on a cluster)
    gpus_per_actor: float = 0.0  # 1 on a GPU cluster; 0 runs actors on CPU
    in_process: bool = False  # vLLM engine core in this process (fast start; tests, one CPU)
    enforce_eager: bool = True  # no graph compilation: reproducible sampling, quick start on CPU
    chunked_prefill: bool | None = None  # None: on GPU only (CPU seeded sampling breaks on chunks)
    gpu_memory_utilization: float = 0.5  # share of a GPU vLLM may take (learner may share it)
    seed: int = derived("seed", 0)  # the vLLM engine's seed
    # Every image encoded at exactly slice_size^2 pixels ((slice_size / 32)^2 tokens) by vLLM and
    # the processors; None (a config built outside a run) keeps the checkpoint's own limits.
    slice_size: int | None = derived("data.slice_size", None)

    def __post_init__(self) -> None:
        if self.engine not in ("vllm", "transformers"):
            raise ValueError(
                f"rollout.engine must be 'vllm' or 'transformers', got {self.engine!r}"
            )
        if self.group_size < 1:
            raise ValueError(f"rollout.group_size must be >= 1, got {self.group_size}")


# --- reward: term weights, the window, the propagator and the worker pool


@dataclass
class RewardConfig:
    w_format: float = 1.0  # weight of Rf in R (paper: 1.0)
    w_axial: float = 1.0  # weight of Ra (paper: 1.0)
    w_spatial: float = 1.0  # weight of Rs (paper: 1.0)
    w_consistency: float = 1.0  # weight of Rc (paper: 1.0)
    delta: int = 5  # Rc window: slices within +-delta of the predicted key slice (paper: 5)
    propagator: str = "baseline"  # "medsam2" (SAM2.1 Hiera-tiny) or "baseline" (scikit-image)
    checkpoint: Path | None = None  # MedSAM2 checkpoint {'model': state_dict}; medsam2 needs one
    # true: medsam2 with no checkpoint runs on random weights (tests and timing benches only)
    random_weights: bool = False
    image_size: int = 512  # MedSAM2 input size (MedSAM2: 512; CPU tests use 256)
    feature_batch: int = 8  # slices per batched image-encoder pass
    volume_cache: int = 4  # volumes whose image features a worker keeps (LRU)
    # true-box components smaller than this (pixels) are ignored, as in SFT targets
    min_box_area: int = derived("data.min_box_area", 4)
    box_coords: str = derived("data.box_coords", "pixels")  # the frame answers' boxes are read in
    num_workers: int = 1  # reward worker replicas (one GPU each on a GPU cluster)
    # 1 on a GPU cluster; a share below 1 packs workers on a GPU (0.25: four per GPU); 0: CPU
    gpus_per_worker: float = 0.0
    request_retries: int = 3  # times a request is retried on another worker after a failure
    request_timeout_s: float = 300.0  # a request unanswered this long after its start scores 0

    def __post_init__(self) -> None:
        if self.propagator not in ("medsam2", "baseline"):
            raise ValueError(
                f"reward.propagator must be 'medsam2' or 'baseline', got {self.propagator!r}"
            )
        if self.propagator == "medsam2" and self.checkpoint is None and not self.random_weights:
            raise ValueError(
                "reward.checkpoint: not set, and reward.propagator is 'medsam2': give the MedSAM2 "
                "checkpoint (MedSAM2_latest.pt), or reward.random_weights=true for a random-weight "
                "SAM2 (tests, timing)"
            )
        if self.delta < 0:
            raise ValueError(f"reward.delta must be >= 0, got {self.delta}")
        if not self.request_timeout_s > 0:
            raise ValueError(
                f"reward.request_timeout_s must be > 0 seconds, got {self.request_timeout_s}"
            )
        if self.image_size % 16:
            raise ValueError(f"reward.image_size must be a multiple of 16, got {self.image_size}")


# --- learner: the LoRA cold start (SFT) and the GRPO update

LOSS_AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_sum_norm")
KL_ESTIMATORS = ("k3", "none")
SCALES = ("group", "batch", "none")  # what the centred rewards are divided by


@dataclass
class LoraSettings:
    rank: int = 128  # LoRA rank on all linear layers of the language model (paper: 128)
    alpha: int = 256  # LoRA scaling numerator (alpha / rank = 2)
    # Dropout on the LoRA branch; None: 0.05 for SFT, 0 for GRPO (whose pi must equal pi_old, so
    # GRPO refuses any other value).
    dropout: float | None = None
    # Linear layers that get LoRA: every projection of the language model. The vision tower and
    # merger stay frozen, as vLLM serves LoRA on the language model only.
    target_modules: str = (
        r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|"
        r"down_proj)"
    )


@dataclass
class SFTConfig:
    lr: float = 2e-5  # AdamW peak learning rate (paper: 2e-5)
    epochs: int = 1  # passes over the training samples (paper: 1, a cold start)
    batch_size: int = 2  # sequences per optimizer step per GPU (paper: 2)
    warmup_ratio: float = 0.1  # share of the steps with linear lr warm-up (paper: 0.1), then cosine
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # gradient norm clip
    precision: str = "auto"  # "auto": bf16 where the hardware has it, else fp32; or bf16 | fp32
    gradient_checkpointing: bool = True  # recompute activations in the backward pass (paper: on)
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0-3
    max_steps: int | None = None  # stop early after this many optimizer steps (smoke runs)
    checkpoint_every: int = 50  # optimizer steps between resumable checkpoints
    # An SFT adapter to start from and keep training (its own rank and layers; sft.lora is then
    # unused), e.g. the cold start continued for as many sample passes as GRPO made (the default
    # run's "SFT (equal updates)" control); null: a fresh adapter (the paper's cold start)
    init_adapter: str | None = None
    lora: LoraSettings = None  # type: ignore[assignment]  # the cold start's adapter

    def __post_init__(self) -> None:
        if self.lora is None:
            self.lora = LoraSettings()
        if self.lora.dropout is None:
            self.lora.dropout = 0.05


@dataclass
class GRPOConfig:
    lr: float = 2e-6  # AdamW peak learning rate (paper: 2e-6)
    epochs: int = 3  # passes over the training prompts (paper: 3)
    batch_size: int = 1  # prompts per update per GPU (paper: 1); each brings G completions
    updates_per_batch: int = 1  # optimizer updates on one batch of rollouts (mu)
    clip_eps: float = 0.2  # PPO clip range eps (the paper gives none; PPO's and GRPO's usual)
    # Upper clip range eps_high (DAPO's clip-higher); None: eps_high = clip_eps (the paper's form)
    clip_eps_high: float | None = None
    beta: float = 0.01  # KL weight (paper: 0.01); 0 drops the KL term and the reference pass
    kl_estimator: str = "k3"  # per-token KL estimate: k3 (paper), or none (no reference pass)
    # Loss aggregation: seq_mean_token_mean (paper: 1/G sum_i 1/|o_i| sum_t), token_mean (DAPO),
    # seq_sum_norm (Dr. GRPO: each completion's token sum over rollout.max_tokens)
    loss_agg: str = "seq_mean_token_mean"
    # How the learner runs a group: "grouped" packs the prompt once with its G completions (one
    # pass per group, vision tower once per step); "per_completion" runs prompt + completion
    # for each completion (the reference path, and the fallback for flash attention).
    learner_pass: str = "grouped"
    adv_eps: float = 1e-6  # added to the group std in A_i = (r_i - mean) / (std + eps)
    # What A_i's centred reward is divided by: group (the group's std, the paper), batch (the
    # std of the whole batch's rewards) or none (Dr. GRPO: A_i = r_i - mean)
    scale_rewards: str = "group"
    warmup_ratio: float = 0.1  # share of the steps with linear lr warm-up, then cosine decay
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # gradient norm clip
    precision: str = "auto"  # "auto": bf16 where the hardware has it, else fp32; or bf16 | fp32
    gradient_checkpointing: bool = True  # recompute activations in the backward pass
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0-3
    # stop after this many GRPO steps (None: grpo.epochs over the training prompts)
    max_steps: int | None = None
    export: str = "adapter"  # weights pushed to rollout: "adapter" (LoRA) or "merged"
    # Truncated importance sampling for the sampler/learner gap: each token's surrogate times
    # min(pi_old_learner / pi_vllm, tis_cap). None: off (the paper has no such correction).
    tis_cap: float | None = None
    # One-step off-policy overlap (a deviation from the paper, off by default): the rollout of
    # batch t+1 runs on the previous weights while the learner learns on batch t; staleness is
    # at most one version (logged as rollout/staleness). Needs tis_cap, which corrects for it.
    overlap: bool = False
    # Dynamic sampling (DAPO; off by default): drop groups whose rewards are all equal (zero
    # advantage) and draw more prompts to refill the batch, at most this many extra rounds; a
    # batch still short is topped up with dropped groups. Logged as data/dropped_group_share.
    dynamic_sampling: bool = False
    dynamic_sampling_rounds: int = 3  # extra rounds of prompts dynamic sampling draws at most
    # An SFT term in every update (InstructGPT's PPO-ptx; 0, the paper's GRPO, by default): the
    # loss adds sft_coef x the token-mean cross-entropy of cold-start target answers (the mask's
    # evidence anchor) of grpo.batch_size training samples drawn at random each step, so the
    # answers of targets a batch does not ask about are held where SFT put them.
    sft_coef: float = 0.0
    lora: LoraSettings = None  # type: ignore[assignment]  # GRPO's adapter (over the SFT policy)
    # The learner's processor pins images as the rollout engines do (rollout.slice_size)
    slice_size: int | None = derived("data.slice_size", None)

    def __post_init__(self) -> None:
        if self.lora is None:
            self.lora = LoraSettings()
        if self.lora.dropout is None:
            self.lora.dropout = 0.0
        if self.overlap and self.tis_cap is None:
            raise ValueError(
                "grpo.overlap samples each batch with the previous weights: set grpo.tis_cap "
                "(e.g. 2.0) so truncated importance sampling corrects for it"
            )
        if self.dynamic_sampling_rounds < 0:
            raise ValueError(
                f"grpo.dynamic_sampling_rounds must be >= 0, got {self.dynamic_sampling_rounds}"
            )
        if self.lora.dropout != 0.0:
            raise ValueError(
                f"grpo.lora.dropout must be 0 (pi must equal pi_old), got {self.lora.dropout}"
            )
        if not self.sft_coef >= 0:
            raise ValueError(f"grpo.sft_coef must be >= 0, got {self.sft_coef}")
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ValueError(f"grpo.tis_cap must be > 0 or null, got {self.tis_cap}")
        if self.loss_agg not in LOSS_AGGREGATIONS:
            raise ValueError(
                f"grpo.loss_agg must be one of {', '.join(LOSS_AGGREGATIONS)}, "
                f"got {self.loss_agg!r}"
            )
        if self.scale_rewards not in SCALES:
            raise ValueError(
                f"grpo.scale_rewards must be one of {', '.join(SCALES)}, got {self.scale_rewards!r}"
            )
        if self.kl_estimator == "k1":
            raise ValueError(
                "grpo.kl_estimator k1: not a regulariser inside the loss (the expected gradient "
                "of log pi - log pi_ref under samples of pi is 0); use k3 or none"
            )
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(
                f"grpo.kl_estimator must be one of {', '.join(KL_ESTIMATORS)}, "
                f"got {self.kl_estimator!r}"
            )
        if self.clip_eps_high is not None and self.clip_eps_high < self.clip_eps:
            raise ValueError(
                f"grpo.clip_eps_high ({self.clip_eps_high}) must be >= grpo.clip_eps "
                f"({self.clip_eps})"
            )
        if self.learner_pass not in ("grouped", "per_completion"):
            raise ValueError(
                f"grpo.learner_pass must be 'grouped' or 'per_completion', "
                f"got {self.learner_pass!r}"
            )
        if self.export not in ("adapter", "merged"):
            raise ValueError(f"grpo.export must be 'adapter' or 'merged', got {self.export!r}")


# --- the run


class ConfigError(ValueError):
    """A config file or override that does not fit the typed config; names the field."""


def _coerce(value: Any, hint: Any, field: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, field)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{field}: {value!r} fits none of {hint}")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{field}: expected a mapping for {hint.__name__}, got {value!r}")
        return _build(hint, value, field)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{field}: expected a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{field}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{field}: expected {len(args)} items, got {value!r}")
            return tuple(
                _coerce(v, a, f"{field}[{i}]") for i, (v, a) in enumerate(zip(args, value))
            )
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{field}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{field}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, field): _coerce(v, vt, f"{field}.{k}") for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{field}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{field}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 2e-6 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                if math.isfinite(number):
                    return number
        raise ConfigError(f"{field}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{field}: expected a string, got {value!r}")
    if hint is Path:
        if isinstance(value, str | Path):
            return Path(value)
        raise ConfigError(f"{field}: expected a path, got {value!r}")
    return value


# Keys that were merged into another: a file that still sets one is told where it went.
MOVED = {
    "steps": "grpo.max_steps",
    "checkpoint_every": "grpo.checkpoint_every",
    "data.seed": "seed",
    "sft.top_k": "data.top_k",
}


def _build(cls: type[T], values: dict, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in values:
        key = f"{prefix}.{name}" if prefix else name
        if key in MOVED:
            raise ConfigError(f"{key}: merged into {MOVED[key]}; set that instead")
        if name in fields and "derived_from" in fields[name].metadata:
            source = fields[name].metadata["derived_from"]
            raise ConfigError(f"{key}: set from {source}, not a key of its own; set {source}")
    unknown = set(values) - set(fields)
    if unknown:
        where = f" in {prefix}" if prefix else ""
        raise ConfigError(f"unknown field{where}: {', '.join(sorted(unknown))}")
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name)
    return cls(**kwargs)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: typing.Iterable[str] = (),
    sections: typing.Iterable[str] | None = None,
) -> T:
    """Build ``cls`` (a dataclass, possibly nested) from a YAML file and ``key=value`` overrides.

    Overrides use dotted keys (``grpo.lr=2e-6``); values are parsed as YAML scalars, so
    ``true``, ``3``, ``[1, 2]`` and ``null`` mean what they look like. Unknown keys and values of
    the wrong type raise :class:`ConfigError` naming the field. ``sections`` keeps only those
    top-level sections of the file (a tool that needs part of a run config reads the same file).
    """
    tree: dict = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        tree = loaded or {}
        if sections is not None:
            keep = set(sections)
            tree = {k: v for k, v in tree.items() if k in keep}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_path(tree, key.strip(), value)
    try:
        return _build(cls, tree)
    except ConfigError as err:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{err}") from None


def to_dict(config: Any, keys_only: bool = False) -> dict:
    """The resolved config as plain data (paths as strings), for logging with a run;
    ``keys_only`` leaves out the fields set from another key (what a YAML file may hold)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {
                f.name: plain(getattr(value, f.name))
                for f in dataclasses.fields(value)
                if not (keys_only and "derived_from" in f.metadata)
            }
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


def to_yaml(config: Any) -> str:
    """The resolved config as YAML that :func:`load_config` reads back to an equal config (what
    ``--print-config`` prints)."""
    return yaml.safe_dump(to_dict(config, keys_only=True), sort_keys=False)


# The run config: one section per part, each part's own typed config.


@dataclass
class GRPORunConfig(GRPOConfig):
    """The GRPO section of a run: the learner's settings plus how many ranks learn."""

    # DeepSpeed ranks of the learner, one Ray actor each (one GPU each on a cluster), data-
    # parallel over the batch's groups: each takes grpo.batch_size / num_learners prompts, so
    # batch_size must divide by it (the paper's "batch 1 per GPU": batch_size = num_learners)
    num_learners: int = 1
    # true: GRPO starts from the base model with no SFT adapter (the paper starts from SFT)
    from_base: bool = False
    checkpoint_every: int = 5  # GRPO steps between resumable checkpoints

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_learners < 1:
            raise ConfigError(f"grpo.num_learners: must be >= 1, got {self.num_learners}")
        if self.batch_size % self.num_learners:
            raise ConfigError(
                f"grpo.batch_size ({self.batch_size}) must divide by grpo.num_learners "
                f"({self.num_learners}): each learner rank takes an equal share of the prompts"
            )


@dataclass
class ClusterConfig:
    address: str | None = None  # Ray address to join; None = the job's cluster or a local one
    learner_gpus: float = 0.0  # GPUs of each learner rank (1 per rank on a GPU cluster)
    learner_cpus: float = 1.0  # CPUs of each learner rank
    rollout_cpus: float = 1.0  # CPUs per rollout actor
    reward_cpus: float = 0.5  # CPUs per reward worker
    placement_strategy: str = "PACK"  # placement group strategy: PACK | SPREAD | STRICT_PACK
    scale_file: str | None = None  # a file whose integer content sets the reward worker count
    # Actors' output (vLLM, DeepSpeed) to the driver, so `ray job logs` shows it; None: on when
    # joining a cluster (cluster.address or RAY_ADDRESS), off for a local instance
    log_to_driver: bool | None = None
    # Extra Ray resources of each learner rank's bundle, to pin it to nodes that advertise them
    # (`ray start --resources '{"learner_node": 1}'`); {}: any node
    learner_resources: dict[str, float] = field(default_factory=dict)
    # The same for each rollout actor's bundle
    rollout_resources: dict[str, float] = field(default_factory=dict)
    # Node-local folder for the actors' temporary files (adapters they are pushed, checkpoint
    # shards on their way to the driver, the merged policy base); a node's own $MEDVOL_SCRATCH
    # wins; None: the system's temporary folder. Never shared between nodes.
    scratch_dir: str | None = None
    # A weight push (object store or weight group) that takes longer fails the step with an
    # error naming this field instead of hanging
    weight_sync_timeout_s: float = 600.0
    # How grpo.export=merged weights travel: "collective" (learner rank 0 broadcasts to every
    # engine over NCCL on GPUs, gloo on CPU) or "object_store" (bytes of a checkpoint folder)
    merged_sync: str = "collective"
    weight_bucket_mb: float = 512.0  # tensors per collective of a full-weight broadcast, in MiB

    def __post_init__(self) -> None:
        if self.merged_sync not in ("collective", "object_store"):
            raise ConfigError(
                f"cluster.merged_sync must be 'collective' or 'object_store', "
                f"got {self.merged_sync!r}"
            )
        if not self.weight_sync_timeout_s > 0:
            raise ConfigError(
                f"cluster.weight_sync_timeout_s: must be > 0, got {self.weight_sync_timeout_s}"
            )
        if not self.weight_bucket_mb > 0:
            raise ConfigError(f"cluster.weight_bucket_mb: must be > 0, got {self.weight_bucket_mb}")


@dataclass
class TrackingConfig:
    tracking_uri: str = "sqlite:///mlflow.db"  # MLflow store or server (http://127.0.0.1:5000)
    experiment: str = "medvol-r1"  # MLflow experiment name
    run_name: str | None = None  # MLflow run name (default: the run's folder name)
    evidence_every: int = 5  # steps between evidence pictures logged as artifacts


@dataclass
class EvaluationConfig:
    # Surface-Dice (NSD) tolerance in mm of every suite without its own entry (2 mm: the usual
    # choice for abdominal organs on CT); on a scan of unknown voxel size (an M3D-Seg array with
    # no manifest spacing) the same number counts voxels
    nsd_tolerance_mm: float = NSD_TOLERANCE_MM
    # Per-suite tolerance (suite name -> mm), e.g. {"kits23": 1.0} for small lesions
    suite_nsd_tolerance_mm: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        tolerances = {"evaluation.nsd_tolerance_mm": self.nsd_tolerance_mm}
        for suite, value in self.suite_nsd_tolerance_mm.items():
            tolerances[f"evaluation.suite_nsd_tolerance_mm.{suite}"] = value
        for name, value in tolerances.items():
            if not value >= 0:
                raise ConfigError(f"{name}: NSD tolerance must be >= 0 mm, got {value}")

    def nsd_tolerance_for(self, suite: str) -> float:
        """The NSD tolerance (mm) of every case of ``suite``: its own entry, else the default."""
        return float(self.suite_nsd_tolerance_mm.get(suite, self.nsd_tolerance_mm))


@dataclass
class RunConfig:
    output_dir: Path = Path("runs/default")  # adapters, checkpoints, evaluation tables
    # The run's one seed: SFT's data order and Top-K draws, GRPO's prompt order and the generator
    # that draws each step's sampling seeds, the vLLM engine's seed (rollout.seed). Not the tiny
    # model's grounding stage (model.grounding_seed): every run starts from the same stand-in.
    seed: int = 0
    keep_checkpoints: int = 3  # the newest N GRPO checkpoints are kept, older ones deleted
    keep_adapters: int = 2  # the newest N adapters pushed to rollout are kept (one per step)
    # SFT adapter merged into the base for GRPO: the run starts from the SFT policy and its KL
    # term pulls toward it. None: <output_dir>/sft/adapter, where learner.sft writes it (so one
    # output_dir holds the whole recipe); stays None under grpo.from_base
    sft_adapter: Path | None = None
    data: DataConfig = field(default_factory=DataConfig)  # volumes -> slices, window, Top-K
    model: ModelConfig = field(default_factory=ModelConfig)  # the policy's base checkpoint
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # sampling G completions
    reward: RewardConfig = field(default_factory=RewardConfig)  # the four terms and MedSAM2
    sft: SFTConfig = field(default_factory=SFTConfig)  # the LoRA cold start
    grpo: GRPORunConfig = field(default_factory=GRPORunConfig)  # the GRPO update and its ranks
    cluster: ClusterConfig = field(default_factory=ClusterConfig)  # Ray placement, weight sync
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)  # metric settings

    def __post_init__(self) -> None:
        for name in ("keep_checkpoints", "keep_adapters"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        self.rollout.seed = self.seed
        # vLLM and the learner encode a slice into the same tokens (their prompts are compared)
        self.rollout.slice_size = self.grpo.slice_size = self.data.slice_size
        # SFT anchors and the spatial reward drop the same small components, else a correct SFT
        # anchor could score nothing.
        self.reward.min_box_area = self.data.min_box_area
        # The reward reads answers in the frame the prompt asked for and SFT taught.
        self.reward.box_coords = self.data.box_coords
        if self.grpo.from_base and self.sft_adapter is not None:
            raise ConfigError(
                f"sft_adapter ({self.sft_adapter}) and grpo.from_base: true: GRPO starts from "
                "the SFT policy or from the base model, give one"
            )
        if self.sft_adapter is None and not self.grpo.from_base:
            self.sft_adapter = Path(self.output_dir) / "sft" / "adapter"


def load_run_config(path: str | Path | None, overrides: typing.Iterable[str] = ()) -> RunConfig:
    """The run config of a YAML file plus ``key=value`` overrides."""
    return load_config(RunConfig, path, overrides)


def field_comments(cls: type) -> dict[str, str]:
    """Each field of dataclass ``cls`` (inherited ones too) with its comment in the source: the
    comment lines right above it and the one at the end of its line, joined."""
    found: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        source = textwrap.dedent(inspect.getsource(klass))
        lines = source.splitlines()
        comment_on: dict[int, str] = {}
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.COMMENT:
                text = re.sub(r"^#\s*(type: ignore\[[\w-]+\]\s*#\s*)?", "", token.string)
                comment_on[token.start[0]] = text.strip()
        names = {f.name for f in dataclasses.fields(klass)}
        for number, line in enumerate(lines, 1):
            match = re.match(r"    (\w+)\s*:", line)
            if not match or match.group(1) not in names:
                continue
            above, j = [], number - 1
            while j >= 1 and lines[j - 1].strip().startswith("#"):
                above.insert(0, comment_on[j])
                j -= 1
            inline = [comment_on[number]] if number in comment_on else []
            found[match.group(1)] = " ".join(above + inline)
    return found


def _yaml_scalar(value: Any) -> str:
    value = str(value) if isinstance(value, Path) else value
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000)
    return text.removesuffix("\n...\n").strip()


def reference_yaml() -> str:
    """``configs/reference.yaml``: every key of a run config with its default and comment, as a
    YAML file that loads back to the default config (``python -m common.config`` prints it)."""
    out = [
        "# Every key of a run config, with its default and what it does; generated from the",
        "# dataclasses of common/config.py by `python -m common.config` (tests keep it in sync).",
        "# A run's YAML sets only what differs (configs/tiny.yaml, configs/paper.yaml).",
    ]

    def emit(instance: Any, indent: int) -> None:
        pad = " " * indent
        comments = field_comments(type(instance))
        for f in dataclasses.fields(instance):
            if "derived_from" in f.metadata:
                continue
            current = getattr(instance, f.name)
            for line in textwrap.wrap(comments.get(f.name, ""), 98 - indent):
                out.append(f"{pad}# {line}")
            if dataclasses.is_dataclass(current):
                out.append(f"{pad}{f.name}:")
                emit(current, indent + 2)
                continue
            value = f.default if f.default is not dataclasses.MISSING else current
            out.append(f"{pad}{f.name}: {_yaml_scalar(value)}")

    emit(RunConfig(), 0)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Print configs/reference.yaml."""
    sys.stdout.write(reference_yaml())
    return 0


if __name__ == "__main__":
    sys.exit(main())
