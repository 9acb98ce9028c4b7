"""Propagation through real SAM2 code (random weights, small image) and the classical baseline."""

import numpy as np
import pytest
import torch
from PIL import Image

from common.config import RewardConfig
from data.answer import EvidenceAnchor
from data.targets import boxes_on_slice
from reward_server.propagation import (
    BASELINE_NAME,
    FILL_HOLE_AREA,
    BaselinePropagator,
    CheckpointError,
    MedSAM2Propagator,
    build_propagator,
    fill_small_holes,
    largest_component,
    medsam2_box,
    medsam2_images,
    slices_key,
    write_random_checkpoint,
)
from reward_server.rewards import consistency_reward, dice
from reward_server.scorer import RewardScorer

SIZE = 128  # SAM2 input size in tests: MedSAM2 uses 512


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("sam2") / "random.pt", SIZE)


@pytest.fixture(scope="module")
def medsam2(checkpoint):
    torch.set_num_threads(2)
    return MedSAM2Propagator(checkpoint, image_size=SIZE)


def test_random_checkpoint_round_trips_and_names_itself(medsam2, checkpoint):
    blob = torch.load(checkpoint, weights_only=True)
    assert set(blob) == {"model"} and len(blob["model"]) > 400
    assert str(checkpoint) in medsam2.name and "medsam2" in medsam2.name


def test_checkpoint_with_missing_or_unexpected_keys_fails_clearly(checkpoint, tmp_path):
    state = torch.load(checkpoint, weights_only=True)["model"]
    missing = dict(state)
    dropped = sorted(missing)[0]
    del missing[dropped]
    torch.save({"model": missing}, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=rf"missing.pt: 1 missing keys \['{dropped}'\]"):
        MedSAM2Propagator(tmp_path / "missing.pt", image_size=SIZE)
    torch.save({"model": {**state, "extra.weight": torch.zeros(1)}}, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"1 unexpected keys \['extra.weight'\]"):
        MedSAM2Propagator(tmp_path / "extra.pt", image_size=SIZE)
    torch.save(state, tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match=r"bare.pt: expected \{'model': state_dict\}"):
        MedSAM2Propagator(tmp_path / "bare.pt", image_size=SIZE)
    with pytest.raises(CheckpointError, match="not found"):
        MedSAM2Propagator(tmp_path / "nope.pt", image_size=SIZE)


def test_window_propagation_touches_only_the_window_and_reuses_features(
    medsam2, dataset, true_anchor
):
    _, prepared = dataset.by_id("ctorg_0000/liver")
    anchor = true_anchor(prepared)
    before = medsam2.encoded_frames
    mask = medsam2.propagate("liver", prepared.slices, anchor.key_slice, anchor.boxes, 2)
    assert mask.shape == prepared.mask.shape and mask.dtype == bool
    k = anchor.key_slice - 1
    outside = np.ones(len(mask), bool)
    outside[k - 2 : k + 3] = False
    assert not mask[outside].any()
    assert medsam2.encoded_frames - before == 5  # the 5 window slices, encoded once
    again = medsam2.propagate("liver", prepared.slices, anchor.key_slice, anchor.boxes, 2)
    assert medsam2.encoded_frames - before == 5  # second completion: no new encoder pass
    np.testing.assert_array_equal(mask, again)
    rc = consistency_reward(mask, prepared.mask, anchor.key_slice, 2)
    assert 0.0 <= rc <= 1.0


def test_cached_features_give_the_same_masks_as_a_fresh_predictor(
    medsam2, checkpoint, dataset, true_anchor
):
    _, prepared = dataset.by_id("abdomenct1k_0001/spleen")
    anchor = true_anchor(prepared)
    boxes = anchor.boxes + ((5, 5, 30, 30),)  # two objects on one state
    cached = medsam2.propagate("spleen", prepared.slices, anchor.key_slice, boxes, 2)
    fresh = MedSAM2Propagator(checkpoint, image_size=SIZE)
    one_by_one = np.zeros_like(cached)
    for box in boxes:  # each box separately, from scratch
        one_by_one |= fresh.propagate(f"spleen-{box}", prepared.slices, anchor.key_slice, (box,), 2)
    np.testing.assert_array_equal(cached, one_by_one)


# The batched group path against MedSAM2's own procedure: the same logits up to float rounding
# (measured on CPU fp32: at most 7e-7 apart), so a mask can differ where a logit sits within that
# margin of 0. Both bounds are asserted, on masks that are neither nearly empty nor nearly full.
LOGIT_TOLERANCE = 1e-5
MAX_FLIP_SHARE = 1e-4  # mask pixels allowed to differ, as a share of those compared


def set_mask_bias(propagator: MedSAM2Propagator, shift: float) -> None:
    """Shift every mask logit by about 20 * ``shift``: channel 0 of the upscaled mask embedding
    is lifted to ~20 (its deconvolution's bias) and each mask token reads only it there."""
    decoder = propagator.model.sam_mask_decoder
    with torch.no_grad():
        decoder.output_upscaling[3].bias[0] = 20.0
        for mlp in decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight[0] = 0.0
            mlp.layers[-1].bias[0] = shift


def coverage(propagator, slices, anchor, window) -> dict[int, float]:
    logits = propagator.group_logits("cover", slices, [anchor], window)
    return {f: float((x > 0).float().mean()) for obj in logits.values() for f, x in obj.items()}


@pytest.fixture(scope="module")
def medsam2_partial(checkpoint, dataset, true_anchor):
    """A random-weight MedSAM2 whose masks cover 20-60% of a slice (random weights alone cover
    about 92%, where a changed logit rarely changes a mask): the mask bias is bisected until
    the median slice of a window is 40% foreground."""
    propagator = MedSAM2Propagator(checkpoint, image_size=SIZE)
    _, prepared = dataset.by_id("ctorg_0000/kidney")
    anchor = true_anchor(prepared)
    low, high = -0.1, 0.0  # 0% and about 98% foreground on the key slice
    for _ in range(8):
        shift = (low + high) / 2
        set_mask_bias(propagator, shift)
        if np.median(list(coverage(propagator, prepared.slices, anchor, 2).values())) < 0.4:
            low = shift
        else:
            high = shift
    return propagator


def test_a_group_on_one_state_gives_medsam2s_logits_for_each_anchor(
    medsam2_partial, dataset, true_anchor
):
    """The anchors of a group as objects of one state, advanced by batched tracking steps, give
    the logits of MedSAM2's own procedure run for each anchor alone (SAM2's propagate_in_video
    forward, reset, reverse) within LOGIT_TOLERANCE, and its masks but for at most
    MAX_FLIP_SHARE of the pixels: key slices apart, a window clipped at the volume's end, a box
    two anchors share (one object), an anchor with no box; a window and the whole volume."""
    propagator = medsam2_partial
    _, prepared = dataset.by_id("ctorg_0000/kidney")
    anchor = true_anchor(prepared)
    k, (x1, y1, x2, y2) = anchor.key_slice, anchor.boxes[0]
    last = prepared.num_slices
    anchors = [
        anchor,
        EvidenceAnchor(k, ((x1 + 3, y1, x2, y2 - 2),)),
        EvidenceAnchor(k - 4, ((x1, y1, x2, y2), (5, 5, 40, 40))),
        EvidenceAnchor(last - 1, ((20, 20, 90, 100),)),  # forward window clipped to 1 slice
        EvidenceAnchor(k - 4, ((x1, y1, x2, y2),)),  # its box is also the third anchor's
        EvidenceAnchor(k, ()),
    ]
    # A window with every anchor; the whole volume (both ways to both ends) with two of them.
    for window, chosen in ((3, anchors), (None, anchors[2:4])):
        propagator.clear_features()
        before = propagator.encoded_frames
        group = propagator.propagate_group("kidney-group", prepared.slices, chosen, window)
        if window is None:
            frames = set(range(last))
        else:
            frames = {f for a in chosen for f in range(a.key_slice - 4, min(a.key_slice + 3, last))}
        assert propagator.encoded_frames - before == len(frames)  # every slice encoded once
        if window == 3:  # the anchor with no box, and anchors that differ, differ in masks
            assert not group[-1].any()
            assert (group[0] != group[1]).any() and (group[2] != group[4]).any()
        logits = propagator.group_logits("kidney-group", prepared.slices, chosen, window)
        worst, flips, pixels, foreground = 0.0, 0, 0, []
        for a, mask in zip(chosen, group):
            alone = propagator.reference_logits(
                "kidney-group", prepared.slices, a.key_slice, a.boxes, window
            )
            reference_mask = np.zeros_like(mask)
            for box, per_frame in alone.items():
                batched = logits[a.key_slice - 1, box]
                assert sorted(batched) == sorted(per_frame), (a, box)
                per_box = np.zeros_like(mask)
                for frame, reference in per_frame.items():
                    worst = max(worst, float((batched[frame] - reference).abs().max()))
                    flips += int(((batched[frame] > 0) != (reference > 0)).sum())
                    pixels += reference.numel()
                    foreground.append(float((reference > 0).float().mean()))
                    per_box[frame] = (reference > 0).numpy()
                reference_mask |= largest_component(per_box)  # as propagate_reference
            assert (mask != reference_mask).mean() <= MAX_FLIP_SHARE, (window, a)
        assert worst <= LOGIT_TOLERANCE, (window, worst)
        assert flips <= MAX_FLIP_SHARE * pixels, (window, flips, pixels)
        # Not vacuous: masks neither nearly empty nor nearly full.
        assert 0.2 <= np.mean(foreground) <= 0.6 and 0.05 < min(foreground), foreground
        assert max(foreground) < 0.95


def test_the_group_path_refuses_a_memory_stride_other_than_1(medsam2, dataset, true_anchor):
    _, prepared = dataset.by_id("ctorg_0000/kidney")
    anchor = true_anchor(prepared)
    medsam2.model.memory_temporal_stride_for_eval = 2
    try:
        with pytest.raises(ValueError, match="memory_temporal_stride_for_eval == 1.*got 2"):
            medsam2.propagate_group("stride", prepared.slices, [anchor], 2)
    finally:
        medsam2.model.memory_temporal_stride_for_eval = 1


def test_whole_volume_propagation_runs_both_ways(medsam2, dataset, true_anchor):
    _, prepared = dataset.by_id("ctorg_0000/kidney")
    anchor = true_anchor(prepared)
    medsam2.clear_features()
    before = medsam2.encoded_frames
    mask = medsam2.propagate("kidney", prepared.slices, anchor.key_slice, anchor.boxes, None)
    assert medsam2.encoded_frames - before == prepared.num_slices
    assert mask[0].any() and mask[-1].any()


def medsam2_reference_input(slices: np.ndarray, image_size: int) -> np.ndarray:
    """MedSAM2's CT script, as published: each uint8 slice through PIL, grey to RGB, resized
    with ``Image.resize``'s default filter, divided by 255 (float64), minus ImageNet's mean,
    over its std."""
    out = np.zeros((len(slices), 3, image_size, image_size))
    for i, s in enumerate(slices):
        rgb = Image.fromarray(s.astype(np.uint8)).convert("RGB").resize((image_size, image_size))
        out[i] = np.array(rgb).transpose(2, 0, 1)
    out = out / 255.0
    out -= np.array((0.485, 0.456, 0.406))[:, None, None]
    out /= np.array((0.229, 0.224, 0.225))[:, None, None]
    return out


def test_medsam2_input_is_its_pil_bicubic_rgb_resize_of_uint8_slices(dataset):
    """Golden test at MedSAM2's size: a 256 px slice (the policy frame) resized to 512 px."""
    _, prepared = dataset.by_id("ctorg_0000/liver")
    rng = np.random.default_rng(0)
    slices = np.stack(
        [
            np.asarray(Image.fromarray(s).resize((256, 256), Image.Resampling.NEAREST))
            for s in prepared.slices[:3]
        ]
    )
    slices[1, 100:140, 60:200] = rng.integers(0, 256, (40, 140), dtype=np.uint8)  # sharp edges
    ours = medsam2_images(slices, 512)
    assert ours.dtype == torch.float32 and ours.shape == (3, 3, 512, 512)
    expected = medsam2_reference_input(slices, 512)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=1e-6)
    # Not what torch's bilinear resize of the float slice gives (several grey levels apart).
    bilinear = torch.nn.functional.interpolate(
        torch.from_numpy(slices.astype(np.float32))[:, None], size=(512, 512), mode="bilinear"
    )[:, 0]
    grey = expected[:, 0] * 0.229 + 0.485  # back to 0..1
    assert np.abs(bilinear.numpy() / 255.0 - grey).max() * 255 > 4
    with pytest.raises(ValueError, match="uint8 slices.*float32"):
        medsam2_images(slices.astype(np.float32), 512)


def test_sam2_is_prompted_with_medsam2s_inclusive_box(checkpoint, dataset, monkeypatch):
    """MedSAM2's mask2D_to_bbox (no shift) gives the min and max pixel index of a mask; the
    policy's box of the same mask is in pixel edges. SAM2 must receive MedSAM2's."""
    propagator = MedSAM2Propagator(checkpoint, image_size=SIZE)
    _, prepared = dataset.by_id("ctorg_0000/liver")
    mask2d = np.zeros(prepared.slices.shape[1:], bool)
    mask2d[30:45, 10:20] = True  # rows 30..44, columns 10..19
    y, x = np.where(mask2d)
    medsam2 = [x.min(), y.min(), x.max(), y.max()]  # mask2D_to_bbox with max_shift 0
    (box,) = boxes_on_slice(mask2d)
    assert box == (10, 30, 20, 45) and medsam2 == [10, 30, 19, 44]
    np.testing.assert_array_equal(medsam2_box(box), medsam2)
    prompted, precision = [], []
    add_box = propagator.model.add_new_points_or_box
    forward_image = propagator.model.forward_image

    def record_box(*args, box, **kwargs):
        prompted.append(np.asarray(box).tolist())
        return add_box(*args, box=box, **kwargs)

    def record_precision(*args, **kwargs):
        precision.append(torch.get_float32_matmul_precision())
        return forward_image(*args, **kwargs)

    monkeypatch.setattr(propagator.model, "add_new_points_or_box", record_box)
    monkeypatch.setattr(propagator.model, "forward_image", record_precision)
    assert torch.get_float32_matmul_precision() == "highest"
    propagator.propagate("liver", prepared.slices, 5, (box,), 1)
    propagator.propagate_reference("liver", prepared.slices, 5, (box,), 1)
    assert prompted == [medsam2] * 3  # the group path once; the reference once per direction
    # MedSAM2 sets float32 matmul precision 'high'; it holds inside SAM2 calls only.
    assert precision and set(precision) == {"high"}
    assert torch.get_float32_matmul_precision() == "highest"


def test_features_are_found_by_slice_content_not_by_sample_id(checkpoint, dataset, true_anchor):
    propagator = MedSAM2Propagator(checkpoint, image_size=SIZE)
    _, liver = dataset.by_id("ctorg_0000/liver")
    _, kidney = dataset.by_id("ctorg_0000/kidney")
    _, spleen = dataset.by_id("abdomenct1k_0001/spleen")
    np.testing.assert_array_equal(liver.slices, kidney.slices)  # one scan, one window
    anchor = true_anchor(kidney)
    propagator.propagate("ctorg_0000/liver", liver.slices, anchor.key_slice, anchor.boxes, 2)
    assert propagator.encoded_frames == 5  # the window
    # Another target of the scan: no encoder pass at all.
    shared = propagator.propagate(
        "ctorg_0000/kidney", kidney.slices, anchor.key_slice, anchor.boxes, 2
    )
    assert propagator.encoded_frames == 5  # the window
    # The same id with other slices gets their own features, never the stale ones.
    other = propagator.propagate(
        "ctorg_0000/kidney", spleen.slices, anchor.key_slice, anchor.boxes, 2
    )
    assert propagator.encoded_frames == 10
    fresh = MedSAM2Propagator(checkpoint, image_size=SIZE)
    np.testing.assert_array_equal(
        other, fresh.propagate("x", spleen.slices, anchor.key_slice, anchor.boxes, 2)
    )
    np.testing.assert_array_equal(
        shared, fresh.propagate("y", kidney.slices, anchor.key_slice, anchor.boxes, 2)
    )
    assert slices_key(liver.slices, SIZE) != slices_key(liver.slices, 2 * SIZE)


def test_rc_through_sam2_in_the_scorer(checkpoint, dataset, true_anchor):
    cfg = RewardConfig(propagator="medsam2", checkpoint=checkpoint, image_size=SIZE, delta=1)
    scorer = RewardScorer(cfg)
    _, prepared = dataset.by_id("ctorg_0000/liver")
    from data.answer import format_answer

    (reward,) = scorer.score_group(prepared, [format_answer(true_anchor(prepared), "x")])
    assert reward.format == 1.0 and reward.spatial == 1.0 and 0.0 <= reward.consistency <= 1.0


def test_baseline_recovers_organs_from_the_true_anchor(dataset, true_anchor):
    baseline = BaselinePropagator()
    assert baseline.name == BASELINE_NAME and "no MedSAM2" in baseline.name
    # Organs with a distinct density band; small low-contrast targets (spleen beside viscera
    # at this tiny size, cysts, two-density vertebrae) are where the baseline is weak.
    for sample_id in ("ctorg_0000/liver", "ctorg_0000/kidney", "ctorg_0000/lungs"):
        _, prepared = dataset.by_id(sample_id)
        anchor = true_anchor(prepared)
        whole = baseline.propagate(sample_id, prepared.slices, anchor.key_slice, anchor.boxes, None)
        assert dice(whole, prepared.mask) > 0.7, sample_id


def test_no_boxes_give_an_empty_mask_and_baseline_never_replaces_medsam2(dataset, checkpoint):
    _, prepared = dataset.by_id("ctorg_0000/liver")
    empty = BaselinePropagator().propagate("x", prepared.slices, 3, (), 5)
    assert not empty.any()
    with pytest.raises(ValueError, match="set propagator to 'medsam2'"):
        build_propagator("baseline", checkpoint)
    with pytest.raises(CheckpointError):
        build_propagator("medsam2", checkpoint.with_name("absent.pt"), image_size=SIZE)
    assert isinstance(EvidenceAnchor(1, ()), EvidenceAnchor)


def test_largest_component_joins_parts_touching_only_at_a_corner():
    mask = np.zeros((12, 12, 12), bool)
    mask[1:4, 1:4, 1:4] = True  # 27 voxels
    mask[4:7, 4:7, 4:7] = True  # 27 voxels, meeting the first cube only at a corner
    mask[9:11, 9:11, 9:11] = True  # 8 voxels, apart from both
    kept = largest_component(mask)
    expected = mask.copy()
    expected[9:11, 9:11, 9:11] = False
    np.testing.assert_array_equal(kept, expected)


def test_small_holes_are_filled_in_each_mask_and_large_ones_kept():
    scores = torch.full((3, 1, 16, 16), -5.0)
    scores[:, :, 2:12, 2:12] = 3.0
    scores[0, 0, 4:6, 4:6] = -1.0  # 4-pixel hole: filled
    scores[1, 0, 4:7, 4:7] = -1.0  # 9-pixel hole: kept
    # 3 + 6 pixels touching only at a corner: one 8-connected hole of 9 pixels, kept
    scores[2, 0, 4, 4:7] = -1.0
    scores[2, 0, 5:7, 7:10] = -1.0
    filled = fill_small_holes(scores, FILL_HOLE_AREA)
    expected = scores.clone()
    expected[0, 0, 4:6, 4:6] = 0.1
    torch.testing.assert_close(filled, expected)
    assert (filled[:, :, 0] == -5.0).all()  # the outer background is no hole
    assert fill_small_holes(torch.ones(1, 1, 4, 4), FILL_HOLE_AREA).eq(1).all()


def test_predictor_fills_holes_with_scipy_not_sam2s_cuda_op(medsam2, dataset, true_anchor):
    # MedSAM2's area, done by the project's step; SAM2's CUDA-only step stays off everywhere.
    assert medsam2.model.hole_area == FILL_HOLE_AREA == 8
    assert medsam2.model.fill_hole_area == 0
    _, prepared = dataset.by_id("ctorg_0000/liver")
    anchor = true_anchor(prepared)
    k = anchor.key_slice - 1
    medsam2.model.hole_area = 10**9  # every background region is a "hole": all slices filled
    try:
        mask = medsam2.propagate("liver", prepared.slices, anchor.key_slice, anchor.boxes, 1)
    finally:
        medsam2.model.hole_area = FILL_HOLE_AREA
    assert mask[k - 1 : k + 2].all()
