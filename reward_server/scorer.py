"""Scoring completions against a prepared volume: every reward term, identical answers once."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from common.config import RewardConfig
from data.answer import AnswerFailure, EvidenceAnchor, ParsedAnswer, parse_answer
from data.records import PreparedVolume
from data.targets import boxes_on_slice
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

    def score_group(
        self, prepared: PreparedVolume, completions: list[str]
    ) -> list[RewardBreakdown]:
        """Score the completions of one prompt. Identical anchors are scored once, and the
        distinct anchors' propagations (Rc) run together in one ``propagate_group`` call, so
        they share the volume's image features and one predictor state."""
        parsed = [
            parse_answer(text, prepared.num_slices, prepared.size, self.cfg.box_coords)
            for text in completions
        ]
        anchors = list(dict.fromkeys(p.anchor for p in parsed if isinstance(p, ParsedAnswer)))
        terms = {anchor: self._box_terms(prepared, anchor) for anchor in anchors}
        # The matched predicted boxes prompt propagation (paper: "the matched boxes prompt
        # MedSAM2"); unmatched extras already cost in Rs. Two anchors that differ only in
        # unmatched boxes prompt the same propagation.
        prompts = list(dict.fromkeys(prompt for _, _, prompt in terms.values() if prompt.boxes))
        masks = self.propagator.propagate_group(
            prepared.sample_id, prepared.slices, prompts, self.cfg.delta
        )
        propagated = dict(zip(prompts, masks))
        scored = {}
        for anchor, (ra, rs, prompt) in terms.items():
            rc = 0.0
            if prompt.boxes:
                rc = consistency_reward(
                    propagated[prompt], prepared.mask, anchor.key_slice, self.cfg.delta
                )
            scored[anchor] = RewardBreakdown(
                1.0, ra, rs, rc, total_reward(1.0, ra, rs, rc, self.weights)
            )
        out = []
        for answer in parsed:
            if isinstance(answer, AnswerFailure):
                out.append(RewardBreakdown(0.0, 0.0, 0.0, 0.0, 0.0, failure=answer.reason))
            else:
                assert format_reward(answer) == 1.0
                out.append(scored[answer.anchor])
        return out

    def _box_terms(
        self, prepared: PreparedVolume, anchor: EvidenceAnchor
    ) -> tuple[float, float, EvidenceAnchor]:
        """Ra, Rs and the propagation prompt (key slice, matched boxes) of a well-formed anchor."""
        k = anchor.key_slice
        ra = axial_reward(prepared.areas, k)
        true_boxes = boxes_on_slice(prepared.mask[k - 1], min_area=self.cfg.min_box_area)
        rs = spatial_reward(anchor.boxes, true_boxes)
        matched = tuple(
            anchor.boxes[p] for p, _, iou in match_boxes(anchor.boxes, true_boxes) if iou > 0
        )
        return ra, rs, EvidenceAnchor(k, matched)

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
