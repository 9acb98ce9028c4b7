"""Scoring completions against a prepared volume: every reward term, identical answers once."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from data.answer import AnswerFailure, EvidenceAnchor, ParsedAnswer, parse_answer
from data.records import PreparedVolume
from data.targets import boxes_on_slice
from reward_server.config import RewardConfig
from reward_server.propagation import build_propagator
from reward_server.rewards import (
    RewardBreakdown,
    axial_reward,
    consistency_reward,
    format_reward,
    match_boxes,
    spatial_reward,
    total_reward,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreRequest:
    """One completion to score: the sample it answers (the volume is looked up by id) and text."""

    sample_id: str
    completion: str


class RewardScorer:
    """The reward server's core, without Ray: a propagator plus the reward terms."""

    def __init__(self, cfg: RewardConfig, device: str = "cpu"):
        self.cfg = cfg
        self.propagator = build_propagator(
            cfg.propagator,
            cfg.checkpoint,
            cfg.image_size,
            cfg.feature_batch,
            cfg.volume_cache,
            device,
        )
        self.weights = (cfg.w_format, cfg.w_axial, cfg.w_spatial, cfg.w_consistency)
        log.info("reward scorer ready, propagator: %s", self.propagator.name)

    def score_anchor(self, prepared: PreparedVolume, anchor: EvidenceAnchor) -> RewardBreakdown:
        """All terms for a well-formed anchor on a prepared volume."""
        k = anchor.key_slice
        ra = axial_reward(prepared.areas, k)
        true_boxes = boxes_on_slice(prepared.mask[k - 1], min_area=self.cfg.min_box_area)
        rs = spatial_reward(anchor.boxes, true_boxes)
        # The matched predicted boxes prompt propagation (paper: "the matched boxes prompt
        # MedSAM2"); unmatched extras already cost in Rs.
        matched = [
            anchor.boxes[p] for p, _, iou in match_boxes(anchor.boxes, true_boxes) if iou > 0
        ]
        rc = 0.0
        if matched:
            propagated = self.propagator.propagate(
                prepared.sample_id, prepared.slices, k, tuple(matched), self.cfg.delta
            )
            rc = consistency_reward(propagated, prepared.mask, k, self.cfg.delta)
        return RewardBreakdown(1.0, ra, rs, rc, total_reward(1.0, ra, rs, rc, self.weights))

    def score_group(
        self, prepared: PreparedVolume, completions: list[str]
    ) -> list[RewardBreakdown]:
        """Score the completions of one prompt; identical anchors are scored once."""
        done: dict[EvidenceAnchor, RewardBreakdown] = {}
        out = []
        for text in completions:
            parsed = parse_answer(text, prepared.num_slices, prepared.size)
            if isinstance(parsed, AnswerFailure):
                out.append(RewardBreakdown(0.0, 0.0, 0.0, 0.0, 0.0, failure=parsed.reason))
                continue
            assert isinstance(parsed, ParsedAnswer) and format_reward(parsed) == 1.0
            if parsed.anchor not in done:
                done[parsed.anchor] = self.score_anchor(prepared, parsed.anchor)
            out.append(done[parsed.anchor])
        return out

    def score_requests(
        self,
        requests: list[ScoreRequest],
        prepared_by_id: Callable[[str], PreparedVolume],
        on_group: Callable[[int], None] | None = None,
    ) -> list[RewardBreakdown]:
        """Score requests of any samples, in request order: one group per sample, so a sample's
        completions share its volume and identical answers are scored once. ``on_group`` is
        called with each group's size (progress bars)."""
        out: list[RewardBreakdown | None] = [None] * len(requests)
        for sample_id, indices in group_by_sample(requests).items():
            rewards = self.score_group(
                prepared_by_id(sample_id), [requests[i].completion for i in indices]
            )
            for i, reward in zip(indices, rewards):
                out[i] = reward
            if on_group is not None:
                on_group(len(indices))
        return out  # type: ignore[return-value]


def breakdown_row(sample_id: str, reward: RewardBreakdown) -> dict:
    """The JSON line of one scored completion."""
    row = {
        "id": sample_id,
        "format": reward.format,
        "axial": reward.axial,
        "spatial": reward.spatial,
        "consistency": reward.consistency,
        "total": reward.total,
    }
    if reward.failure is not None:
        row["failure"] = reward.failure
    return row


def group_by_sample(requests: list[ScoreRequest]) -> dict[str, list[int]]:
    """Indices of the requests of each sample id, in first-seen order."""
    groups: dict[str, list[int]] = {}
    for i, request in enumerate(requests):
        groups.setdefault(request.sample_id, []).append(i)
    return groups
