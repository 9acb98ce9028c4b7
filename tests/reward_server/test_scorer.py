"""The scorer over the baseline propagator on phantoms: true anchors score high, bad ones 0."""

import json

import pytest

from common.config import RewardConfig
from data.answer import EvidenceAnchor, format_answer
from reward_server.scorer import RewardScorer


@pytest.fixture(scope="module")
def scorer():
    return RewardScorer(RewardConfig(propagator="baseline"))


def test_true_anchor_scores_high_on_every_term(scorer, dataset, true_anchor):
    for sample_id in ("ctorg_0000/liver", "ctorg_0000/lungs", "ctorg_0000/kidney"):
        _, prepared = dataset.by_id(sample_id)
        anchor = true_anchor(prepared)
        (reward,) = scorer.score_group(prepared, [format_answer(anchor, "because")])
        assert reward.format == 1.0 and reward.axial == 1.0 and reward.spatial == 1.0
        assert reward.consistency > 0.7, (sample_id, reward)
        assert reward.total == pytest.approx(3.0 + reward.consistency)


def test_anchor_away_from_the_target_earns_format_only(scorer, dataset):
    _, prepared = dataset.by_id("ctorg_0000/kidney")
    empty_slice = int((prepared.areas == 0).nonzero()[0][0]) + 1
    text = format_answer(EvidenceAnchor(empty_slice, ((10, 10, 40, 40),)), "guess")
    (reward,) = scorer.score_group(prepared, [text])
    assert (reward.format, reward.axial, reward.spatial, reward.consistency) == (1, 0, 0, 0)


def test_malformed_answers_score_zero_and_never_raise(scorer, dataset):
    _, prepared = dataset.by_id("ctorg_0000/liver")
    bad = [
        "",
        "no tags",
        "<think>x</think><answer>{}</answer>",
        '<think>x</think><answer>{"key_slice": 99, "bbox_2d_list": []}</answer>',
        "<think>" * 1000,
        json.dumps({"key_slice": 1}),
    ]
    rewards = scorer.score_group(prepared, bad)
    assert all(r.total == 0.0 and r.format == 0.0 and r.failure for r in rewards)


def test_identical_anchors_are_propagated_once(dataset, true_anchor):
    scorer = RewardScorer(RewardConfig(propagator="baseline"))
    calls = []
    real = scorer.propagator.propagate

    def counting(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    scorer.propagator.propagate = counting
    _, prepared = dataset.by_id("ctorg_0000/liver")
    anchor = true_anchor(prepared)
    group = [
        format_answer(anchor, "a"),
        format_answer(anchor, "other words"),
        "junk",
        format_answer(anchor, "a"),
    ]
    rewards = scorer.score_group(prepared, group)
    assert len(calls) == 1
    assert rewards[0] == rewards[1] == rewards[3] and rewards[2].total == 0.0


def test_weights_and_delta_come_from_the_config(dataset, true_anchor):
    _, prepared = dataset.by_id("ctorg_0000/liver")
    text = format_answer(true_anchor(prepared), "a")
    cfg = RewardConfig(
        propagator="baseline", w_format=0.0, w_axial=2.0, w_spatial=0.0, w_consistency=0.0, delta=1
    )
    (reward,) = RewardScorer(cfg).score_group(prepared, [text])
    assert reward.total == pytest.approx(2.0)


def test_a_group_propagates_its_distinct_anchors_once_and_together(dataset, true_anchor):
    scorer = RewardScorer(RewardConfig(propagator="baseline"))
    calls = []
    real = scorer.propagator.propagate_group

    def spying(volume_id, slices, anchors, window):
        calls.append(list(anchors))
        return real(volume_id, slices, anchors, window)

    scorer.propagator.propagate_group = spying
    _, prepared = dataset.by_id("ctorg_0000/liver")
    anchor = true_anchor(prepared)
    (x1, y1, x2, y2), k = anchor.boxes[0], anchor.key_slice
    shifted = EvidenceAnchor(k, ((x1 + 2, y1, x2, y2),))
    earlier = EvidenceAnchor(k - 1, anchor.boxes)
    group = [
        format_answer(anchor, "a"),
        format_answer(shifted, "b"),
        format_answer(anchor, "same anchor, other words"),
        format_answer(earlier, "c"),
    ]
    rewards = scorer.score_group(prepared, group)
    assert calls == [[anchor, shifted, earlier]]  # one call, the distinct anchors only
    assert rewards[0] == rewards[2] and rewards[0] != rewards[1]
    # Each reward is the one the anchor gets scored alone.
    for text, reward in zip(group, rewards):
        assert scorer.score_group(prepared, [text]) == [reward]
