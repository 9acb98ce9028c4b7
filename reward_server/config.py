"""Settings of the reward server: term weights, the window, the propagator and the worker pool."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
    min_box_area: int = 4  # true-box components smaller than this (pixels) are ignored
    num_workers: int = 1  # reward worker replicas (one GPU each on a GPU cluster)
    gpus_per_worker: float = 0.0  # 1 on a GPU cluster; 0 runs workers on CPU
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
