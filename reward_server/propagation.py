"""Propagating evidence anchors (key slice + boxes) to 3D masks: MedSAM2 or a baseline.

Both propagators take a volume already in the policy's frame (``PreparedVolume.slices``, uint8
(S, H, W), HU-windowed) and return (S, H, W) bool masks: ``propagate`` one anchor,
``propagate_group`` the anchors of a group (the G completions of one prompt) at once.
``window=delta`` propagates only the slices within +-delta of the key slice (the Rc reward);
``window=None`` runs through the whole volume in both directions (evaluation).

``MedSAM2Propagator`` is SAM2.1 Hiera-tiny from the ``sam2`` package with MedSAM2's settings
(image size 512, memory-attention RoPE at 32x32) and a MedSAM2 checkpoint, fed from memory.
Its input is MedSAM2's (its CT script, ``medsam2_infer_3D_CT.py``):
- the slices are uint8 after the window (``data.preprocess.window_to_uint8`` truncates as its
  ``np.uint8`` does), each resized as a PIL image with ``Image.resize``'s default filter for RGB
  (bicubic), scaled to 0..1 and normalised with ImageNet's mean and std (``medsam2_images``);
- a box is handed to SAM2 as MedSAM2 builds one (``mask2D_to_bbox``: the inclusive last column
  and row), from the policy's pixel-edge box (``medsam2_box``: x2 - 1, y2 - 1);
- float32 matmul precision is 'high' while SAM2 runs, as the script sets it.
MedSAM2's procedure (kept as ``propagate_reference``): each box prompts one object on the key
slice; the objects are propagated forward, then, from a reset state with the same boxes, in
reverse; the mask is the union over objects of ``logits > 0``, each object keeping its largest
3D connected component (per object, so that two kidneys stay two). The image encoder runs once
per slice per volume, batched, and its output is kept in an LRU of volumes found by the
content of their slices (``slices_key``), never by a sample id: every target of a scan (one
window, so the same slices) and every completion on it shares one feature pass, and an id
reused for other slices never reads stale features.

A group is propagated as one SAM2 state: every distinct (key slice, box) of the group's anchors
is one object, its prompt decoded once, and then every object, forward and in reverse, advances
one frame per batched SAM2 tracking step (``track_step`` with the objects on the batch axis).
This computes the same logits as MedSAM2's procedure run for each anchor alone, up to float
rounding: batched matrix products sum in another order (measured on CPU fp32: at most 7e-7
apart, on masks covering 10-70% of a slice), so a pixel whose logit lies within that margin of
0 can flip; tests bound the logit gap (1e-5) and the share of flipped pixels (1e-4). Under bf16
on a GPU the margin is wider. Why the computation is the same:
- SAM2 1.1.0 tracks objects independently: each object has its own memory bank and runs its own
  ``track_step`` with batch size 1; nothing in it mixes objects (``non_overlap_masks`` is off).
  Batching the objects' steps changes the batch axis only.
- SAM2's ``propagate_in_video`` cannot run objects prompted on different key slices together:
  it walks one frame range for all objects of a state from one start frame, so an object would
  be tracked on frames before its own prompt, and those frames would then sit in its memory
  when a separate run's would not. The batched step instead indexes each object's memory by the
  offset from its own key slice. SAM2 reads frame indices only relative to the current one
  (memory frames t-1..t-6, object pointers at distance d, with the sign flipped in reverse), so
  offset i from the key reads the same memories as frame k+i forward or k-i in reverse; the
  image features are each object's own frame's. This holds for a memory stride of 1
  (``memory_temporal_stride_for_eval``, MedSAM2's setting); another stride picks memories by
  absolute frame number, and the group path refuses it.
- MedSAM2 resets the state between the two directions and prompts the same box again: the
  prompt's decoded mask and memory are the same both times, so they are computed once and start
  both directions' memories.
- A window clipped at a volume end ends that object's direction early; it leaves the batch.

Post-processing, as MedSAM2's CT script (``medsam2_infer_3D_CT.py``) and its predictor do it:
- Largest component: MedSAM2 labels with ``skimage.measure.label``, whose default connectivity is
  the full one (26 neighbours in 3D). scipy's default is 6, which would split a region whose
  parts touch only along an edge or at a corner and throw part of it away; 26 is used here.
- Hole filling: MedSAM2 builds its predictor with SAM2's post-processing (``fill_hole_area=8``)
  and its CUDA op, so in every low-resolution mask (image size / 4) each 8-connected background
  region of at most 8 pixels is set to the score 0.1, before the key slice's memory is encoded
  and before upsampling. The ``sam2`` package here is built without that op
  (``SAM2_BUILD_CUDA=0``): SAM2 would skip the step with a warning, on CPU and GPU alike, and
  masks would differ from MedSAM2's. So SAM2's own step is off (``fill_hole_area = 0``) and the
  same step, at the same point, is done with scipy (``fill_small_holes``, area
  ``FILL_HOLE_AREA``): one behaviour on CPU and GPU, and MedSAM2's.

``BaselinePropagator`` needs no weights: seeded region growing with scikit-image (Gaussian
smoothing, an intensity band estimated inside the box, morphological reconstruction from the
seed), carried slice to slice from the previous slice's mask; a group is one anchor after the
other. It is the embedded default when no MedSAM2 checkpoint is given, and says so in its name.

On CUDA, encoding and tracking run under bf16 autocast, as MedSAM2 does; on the CPU, fp32.

    python -m reward_server.propagation --out-file PATH [--image-size 512] [--seed 0]

writes a random-weight SAM2.1 Hiera-tiny checkpoint in MedSAM2's ``{'model': state_dict}`` format
(for tests and timing: ``--sam-checkpoint`` or ``reward.checkpoint`` take it).
"""

from __future__ import annotations

import hashlib
import logging
import sys
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from skimage.filters import gaussian
from skimage.morphology import reconstruction

from common.cli import ArgumentParser, command
from data.answer import Box, EvidenceAnchor

log = logging.getLogger(__name__)

SAM2_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BASELINE_NAME = "baseline (scikit-image region growing, no MedSAM2)"
# MedSAM2's predictor fills background regions of up to this many pixels in each low-res mask
# (SAM2's post-processing, fill_hole_area, which MedSAM2's builder sets).
FILL_HOLE_AREA = 8


class CheckpointError(RuntimeError):
    """A MedSAM2 checkpoint that cannot be loaded; names the file and the offending keys."""


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of a bool mask, with full connectivity (26 in 3D), as
    MedSAM2's ``skimage.measure.label``; ties go to the component met first in raster order."""
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    labels, count = ndimage.label(mask, structure=structure)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def fill_small_holes(scores: torch.Tensor, max_area: int) -> torch.Tensor:
    """SAM2's ``fill_holes_in_mask_scores`` without its CUDA op: in each 2D mask of (N, 1, H, W)
    logits, every 8-connected background region (logits <= 0) of at most ``max_area`` pixels
    gets the small positive score 0.1. Returns ``scores`` itself when nothing is filled."""
    background = (scores <= 0).cpu().numpy()[:, 0]
    # 8-connected within a mask (as SAM2's op), never across the N masks.
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = True
    labels, count = ndimage.label(background, structure=structure)
    if count == 0:
        return scores
    areas = np.bincount(labels.ravel())
    areas[0] = max_area + 1  # label 0 is the foreground, never a hole
    holes = areas[labels] <= max_area
    if not holes.any():
        return scores
    return scores.masked_fill(torch.from_numpy(holes[:, None]).to(scores.device), 0.1)


def medsam2_images(slices: np.ndarray, image_size: int) -> torch.Tensor:
    """MedSAM2's image input from uint8 (S, H, W) slices, as its CT script builds it: each slice
    a PIL image, grey to RGB, resized to ``image_size`` with PIL's default filter for RGB
    (bicubic), then scaled to 0..1 and normalised with ImageNet's mean and std: (S, 3, size,
    size) float32. The three channels are equal, so one grey resize (measured equal to PIL's
    RGB resize, channel for channel) is expanded to three."""
    slices = np.asarray(slices)
    if slices.dtype != np.uint8 or slices.ndim != 3:
        raise ValueError(
            f"MedSAM2 takes (S, H, W) uint8 slices (HU-windowed), got {slices.dtype} {slices.shape}"
        )
    size = (image_size, image_size)
    grey = np.stack(
        [np.asarray(Image.fromarray(s).resize(size, Image.Resampling.BICUBIC)) for s in slices]
    )
    x = torch.from_numpy(grey.astype(np.float32) / 255.0)[:, None].expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def medsam2_box(box: Box) -> np.ndarray:
    """The box SAM2 is prompted with for a policy box: MedSAM2 boxes hold the inclusive last
    column and row (its ``mask2D_to_bbox``: the min and max index of the mask's pixels), while
    the policy's boxes are pixel edges (x2 = last column + 1). Both are in the slice frame that
    SAM2 scales to its input size."""
    x1, y1, x2, y2 = box
    return np.array([x1, y1, x2 - 1, y2 - 1], dtype=np.float32)


def slices_key(slices: np.ndarray, image_size: int) -> str:
    """What image features depend on: the slices' content (window applied: they are the
    windowed grey levels), their shape, and MedSAM2's input size. Targets of one scan under
    one window have the same slices, so they share one entry whatever their sample ids."""
    data = np.ascontiguousarray(slices)
    digest = hashlib.blake2b(memoryview(data).cast("B"), digest_size=16)
    digest.update(f"{data.shape}{data.dtype.str}{image_size}".encode())
    return digest.hexdigest()


def _span(key_index: int, window: int | None, num_slices: int) -> tuple[int, int]:
    """Frames tracked forward and in reverse from the key frame (counts, key excluded)."""
    if window is None:
        return num_slices - 1 - key_index, key_index
    return min(window, num_slices - 1 - key_index), min(window, key_index)


def _sam2_predictor_class():
    from sam2.sam2_video_predictor import SAM2VideoPredictor

    class InMemoryVideoPredictor(SAM2VideoPredictor):
        """SAM2's video predictor over frames already in memory, with features given, and
        MedSAM2's hole filling done with scipy (see module doc)."""

        hole_area = 0  # low-res mask holes of at most this many pixels are filled; 0 = never

        def _run_single_frame_inference(self, *args, **kwargs):
            # The step SAM2 runs when fill_hole_area > 0, at the same point: the filled mask is
            # what is stored, encoded into memory for the key slice, and upsampled for output.
            out, masks = super()._run_single_frame_inference(*args, **kwargs)
            if self.hole_area > 0:
                masks = fill_small_holes(masks, self.hole_area)
                out["pred_masks"] = masks.to(out["pred_masks"].device)
            return out, masks

        def init_state_from_frames(
            self, images: torch.Tensor, height: int, width: int, features: dict
        ) -> dict:
            state = {
                "images": images,
                "num_frames": len(images),
                "offload_video_to_cpu": False,
                "offload_state_to_cpu": False,
                "video_height": height,
                "video_width": width,
                "device": self.device,
                "storage_device": self.device,
                "point_inputs_per_obj": {},
                "mask_inputs_per_obj": {},
                # Every frame the propagation visits is here, so SAM2 never misses and never
                # replaces this dict (it keeps only the last frame on a miss).
                "cached_features": features,
                "constants": {},
                "obj_id_to_idx": OrderedDict(),
                "obj_idx_to_id": OrderedDict(),
                "obj_ids": [],
                "output_dict_per_obj": {},
                "temp_output_dict_per_obj": {},
                "frames_tracked_per_obj": {},
            }
            return state

    return InMemoryVideoPredictor


def build_sam2(image_size: int, checkpoint: Path | None, device: str = "cpu"):
    """SAM2.1 Hiera-tiny with MedSAM2's overrides at ``image_size``, weights from ``checkpoint``
    (``{'model': state_dict}``, loaded strictly with weights_only=True) or random."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from sam2.build_sam import build_sam2_video_predictor

    cls = _sam2_predictor_class()
    # The subclass is built through the normal builder by naming it as the model's target.
    sys.modules[__name__].InMemoryVideoPredictor = cls
    feat = image_size // 16
    overrides = [
        f"++model._target_={__name__}.InMemoryVideoPredictor",
        f"++model.image_size={image_size}",
        f"++model.memory_attention.layer.self_attention.feat_sizes=[{feat},{feat}]",
        f"++model.memory_attention.layer.cross_attention.feat_sizes=[{feat},{feat}]",
    ]
    if not GlobalHydra.instance().is_initialized():
        initialize_config_module("sam2", version_base="1.2")
    model = build_sam2_video_predictor(
        SAM2_CONFIG, None, device=device, hydra_overrides_extra=overrides
    )
    # SAM2's hole filling needs its unbuilt CUDA op, so it is off and the subclass fills holes
    # with scipy. Set after building: the builder appends its own fill_hole_area=8 override
    # after ours, so an override could not turn it off.
    model.fill_hole_area = 0
    model.hole_area = FILL_HOLE_AREA
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model.eval()


def load_checkpoint(model: torch.nn.Module, path: Path) -> None:
    path = Path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: MedSAM2 checkpoint not found") from None
    except Exception as err:  # noqa: BLE001 - any unreadable file is reported the same way
        raise CheckpointError(f"{path}: not a loadable torch checkpoint ({err})") from None
    if not isinstance(blob, dict) or "model" not in blob:
        raise CheckpointError(
            f"{path}: expected {{'model': state_dict}}, got keys "
            f"{list(blob)[:5] if isinstance(blob, dict) else type(blob)}"
        )
    try:
        missing, unexpected = model.load_state_dict(blob["model"], strict=False)
    except RuntimeError as err:  # shape mismatches
        raise CheckpointError(f"{path}: does not fit SAM2.1 Hiera-tiny: {err}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: {len(missing)} missing keys {missing[:5]} and {len(unexpected)} "
            f"unexpected keys {unexpected[:5]}"
        )


def write_random_checkpoint(path: Path, image_size: int = 512, seed: int = 0) -> Path:
    """A random-weight SAM2.1 Hiera-tiny checkpoint in MedSAM2's format (for tests and CPU)."""
    torch.manual_seed(seed)
    model = build_sam2(image_size, None)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    torch.save({"model": model.state_dict()}, tmp)
    tmp.replace(path)
    return path


class MedSAM2Propagator:
    """MedSAM2 propagation with image features computed once per volume slice (see module doc)."""

    def __init__(
        self,
        checkpoint: Path | None,
        image_size: int = 512,
        feature_batch: int = 8,
        volume_cache: int = 4,
        device: str = "cpu",
    ):
        self.checkpoint = checkpoint
        self.image_size = image_size
        self.feature_batch = feature_batch
        self.volume_cache = volume_cache
        self.device = device
        self.model = build_sam2(image_size, checkpoint, device)
        weights = str(checkpoint) if checkpoint is not None else "random weights"
        self.name = f"medsam2 ({weights}, {image_size} px)"
        # Image features by slices_key: the content of the slices, never a sample id, so no two
        # volumes can share an entry and every target of a scan reuses one.
        self._volumes: OrderedDict[str, dict] = OrderedDict()
        self.encoded_frames = 0  # image-encoder passes run, per slice: for tests and benchmarks

    def clear_features(self) -> None:
        """Forget every cached volume's images and features."""
        self._volumes.clear()

    def _entry(self, slices: np.ndarray) -> dict:
        key = slices_key(slices, self.image_size)
        entry = self._volumes.get(key)
        if entry is None:
            images = medsam2_images(slices, self.image_size).to(self.device)
            entry = {"images": images, "features": {}}
            self._volumes[key] = entry
            while len(self._volumes) > self.volume_cache:
                self._volumes.popitem(last=False)
        self._volumes.move_to_end(key)
        return entry

    @torch.inference_mode()
    def encode(self, volume_id: str, slices: np.ndarray, frames: list[int]) -> dict:
        """Make sure the image features of ``frames`` (0-based) of a volume are cached.
        ``volume_id`` names the volume only; the cache finds it by content."""
        entry = self._entry(slices)
        todo = sorted(set(frames) - set(entry["features"]))
        images = entry["images"]
        for start in range(0, len(todo), self.feature_batch):
            chunk = todo[start : start + self.feature_batch]
            with self._numerics():
                out = self.model.forward_image(images[chunk])
            for j, frame in enumerate(chunk):
                entry["features"][frame] = (
                    images[frame : frame + 1],
                    {
                        "backbone_fpn": [f[j : j + 1] for f in out["backbone_fpn"]],
                        "vision_pos_enc": [p[j : j + 1] for p in out["vision_pos_enc"]],
                    },
                )
            self.encoded_frames += len(chunk)
        return entry

    @contextmanager
    def _numerics(self):
        """MedSAM2's numerics around every SAM2 call: float32 matmul precision 'high' (its CT
        script sets it for the process; here it is set for the call and restored, so a policy
        in the same process keeps its own) and, on the GPU, bf16 autocast; the CPU keeps fp32."""
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")
        try:
            if str(self.device).startswith("cuda"):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    yield
            else:
                yield
        finally:
            torch.set_float32_matmul_precision(previous)

    def propagate(
        self,
        volume_id: str,
        slices: np.ndarray,
        key_slice: int,
        boxes: tuple[Box, ...],
        window: int | None,
    ) -> np.ndarray:
        """(S, H, W) bool mask from boxes on key slice k (1-based), within +-window or all."""
        anchor = EvidenceAnchor(key_slice, boxes)
        return self.propagate_group(volume_id, slices, [anchor], window)[0]

    @torch.inference_mode()
    def propagate_group(
        self,
        volume_id: str,
        slices: np.ndarray,
        anchors: Sequence[EvidenceAnchor],
        window: int | None,
    ) -> list[np.ndarray]:
        """One (S, H, W) bool mask per anchor, all anchors on one SAM2 state (see module doc).

        A box given on the same key slice by several anchors is one object, propagated once.
        """
        num, height, width = slices.shape
        objects = sorted({(a.key_slice - 1, box) for a in anchors for box in a.boxes})
        spans = {key: _span(key, window, num) for key, _ in objects}
        per_object = {}
        if objects:
            found = [np.zeros((num, height, width), bool) for _ in objects]
            for obj, frame, logits in self._group_logits(volume_id, slices, objects, spans):
                found[obj][frame] = (logits > 0).cpu().numpy()
            for (key, box), mask in zip(objects, found):
                forward, backward = spans[key]
                lo, hi = key - backward, key + forward + 1  # nothing outside: label less
                mask[lo:hi] = largest_component(mask[lo:hi])
                per_object[key, box] = mask
        out = []
        for anchor in anchors:
            mask = np.zeros((num, height, width), bool)
            for box in anchor.boxes:
                mask |= per_object[anchor.key_slice - 1, box]
            out.append(mask)
        return out

    @torch.inference_mode()
    def group_logits(
        self,
        volume_id: str,
        slices: np.ndarray,
        anchors: Sequence[EvidenceAnchor],
        window: int | None,
    ) -> dict[tuple[int, Box], dict[int, torch.Tensor]]:
        """The (H, W) float32 logits behind :meth:`propagate_group`, per (0-based key slice, box)
        object and frame, before thresholding and the largest component (to compare numerics)."""
        num = slices.shape[0]
        objects = sorted({(a.key_slice - 1, box) for a in anchors for box in a.boxes})
        spans = {key: _span(key, window, num) for key, _ in objects}
        out: dict[tuple[int, Box], dict[int, torch.Tensor]] = {o: {} for o in objects}
        for obj, frame, logits in self._group_logits(volume_id, slices, objects, spans):
            out[objects[obj]][frame] = logits.float().cpu()
        return out

    def _group_logits(
        self,
        volume_id: str,
        slices: np.ndarray,
        objects: list[tuple[int, Box]],
        spans: dict[int, tuple[int, int]],
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        num, height, width = slices.shape
        frames = {f for key, (fwd, bwd) in spans.items() for f in range(key - bwd, key + fwd + 1)}
        entry = self.encode(volume_id, slices, sorted(frames))
        with self._numerics():
            yield from self._track_group(entry, objects, spans, height, width)

    def _track_group(
        self,
        entry: dict,
        objects: list[tuple[int, Box]],
        spans: dict[int, tuple[int, int]],
        height: int,
        width: int,
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(object index, frame, (H, W) logits) of each (key frame, box) object on every frame
        of its window: prompts decoded once, then one batched tracking step per frame offset."""
        model = self.model
        if model.memory_temporal_stride_for_eval != 1:
            # With a stride r, SAM2 picks memory frames by (frame_idx - 2) // r * r: absolute
            # frame numbers, which the offset indexing below does not reproduce.
            raise ValueError(
                "the batched group path needs SAM2's memory_temporal_stride_for_eval == 1 "
                f"(MedSAM2's setting), got {model.memory_temporal_stride_for_eval}"
            )
        state = model.init_state_from_frames(entry["images"], height, width, entry["features"])
        for obj, (key, box) in enumerate(objects):
            model.add_new_points_or_box(state, frame_idx=key, obj_id=obj, box=medsam2_box(box))
        # SAM2's own step before tracking: each prompt's mask is encoded into its memory.
        model.propagate_in_video_preflight(state)
        tracks: list[_Track] = []
        for obj, (key, _) in enumerate(objects):
            prompted = state["output_dict_per_obj"][obj]["cond_frame_outputs"][key]
            _, logits = model._get_orig_video_res_output(state, prompted["pred_masks"])
            yield obj, key, logits[0, 0]
            forward, backward = spans[key]
            for step, count in ((1, forward), (-1, backward)):
                if count:
                    tracks.append(_Track(obj, key, step, count, {0: prompted}))
        # Frames SAM2 still reads, counted back from the current one: memories (num_maskmem - 1
        # of them, every stride-th frame) and object pointers (max_obj_ptrs_in_encoder - 1).
        stride = model.memory_temporal_stride_for_eval
        lookback = max(model.max_obj_ptrs_in_encoder, (model.num_maskmem + 1) * stride)
        for offset in range(1, max((t.count for t in tracks), default=0) + 1):
            active = [t for t in tracks if t.count >= offset]
            frames = [t.key + t.step * offset for t in active]
            # The batch's "frame" is the offset from each object's key frame, always forward:
            # SAM2 reads frame indices relative to the current one only (see module doc).
            view = dict(state, cached_features={offset: _stacked_features(entry, frames)})
            memory = {
                "cond_frame_outputs": {0: _stacked_outputs([t.memory[0] for t in active])},
                "non_cond_frame_outputs": {
                    o: _stacked_outputs([t.memory[o] for t in active])
                    for o in range(max(1, offset - lookback), offset)
                },
            }
            out, low_res = model._run_single_frame_inference(
                inference_state=view,
                output_dict=memory,
                frame_idx=offset,
                batch_size=len(active),
                is_init_cond_frame=False,
                point_inputs=None,
                mask_inputs=None,
                reverse=False,
                run_mem_encoder=True,
            )
            _, logits = model._get_orig_video_res_output(state, low_res)
            for i, (track, frame) in enumerate(zip(active, frames)):
                track.memory[offset] = _output_of(out, i)
                if offset - lookback >= 1:
                    del track.memory[offset - lookback]
                yield track.obj, frame, logits[i, 0]

    @torch.inference_mode()
    def propagate_reference(
        self,
        volume_id: str,
        slices: np.ndarray,
        key_slice: int,
        boxes: tuple[Box, ...],
        window: int | None,
    ) -> np.ndarray:
        """MedSAM2's own procedure for one anchor, through SAM2's ``propagate_in_video``: the
        boxes as objects, forward; reset, the same boxes, in reverse. ``propagate_group`` is
        tested against it, and it is the per-completion path the benchmark compares with."""
        num, height, width = slices.shape
        result = np.zeros((num, height, width), bool)
        found: dict[int, np.ndarray] = {}
        for obj_id, frame, logits in self._reference_logits(
            volume_id, slices, key_slice, boxes, window
        ):
            per_obj = found.setdefault(obj_id, np.zeros((num, height, width), bool))
            per_obj[frame] |= (logits > 0).cpu().numpy()
        for per_obj in found.values():
            result |= largest_component(per_obj)
        return result

    @torch.inference_mode()
    def reference_logits(
        self,
        volume_id: str,
        slices: np.ndarray,
        key_slice: int,
        boxes: tuple[Box, ...],
        window: int | None,
    ) -> dict[Box, dict[int, torch.Tensor]]:
        """The (H, W) float32 logits behind :meth:`propagate_reference`, per box and frame (the
        key frame from the forward pass; the reverse pass decodes the same prompt again)."""
        out: dict[Box, dict[int, torch.Tensor]] = {box: {} for box in boxes}
        for obj_id, frame, logits in self._reference_logits(
            volume_id, slices, key_slice, boxes, window
        ):
            out[boxes[obj_id]].setdefault(frame, logits.float().cpu())
        return out

    def _reference_logits(
        self,
        volume_id: str,
        slices: np.ndarray,
        key_slice: int,
        boxes: tuple[Box, ...],
        window: int | None,
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        if not boxes:
            return
        num, height, width = slices.shape
        key = key_slice - 1
        forward, backward = _span(key, window, num)
        entry = self.encode(volume_id, slices, list(range(key - backward, key + forward + 1)))
        state = self.model.init_state_from_frames(entry["images"], height, width, entry["features"])
        with self._numerics():
            for reverse, count in ((False, forward), (True, backward)):
                self.model.reset_state(state)
                for obj_id, box in enumerate(boxes):
                    self.model.add_new_points_or_box(
                        state, frame_idx=key, obj_id=obj_id, box=medsam2_box(box)
                    )
                stream = self.model.propagate_in_video(
                    state, start_frame_idx=key, max_frame_num_to_track=count, reverse=reverse
                )
                for frame, obj_ids, masks in stream:
                    for i, obj_id in enumerate(obj_ids):
                        yield obj_id, frame, masks[i, 0]


@dataclass(frozen=True)
class _Track:
    """One object tracked one way from its key frame; ``memory`` holds SAM2's output for each
    frame offset from the key (0: the prompt), as SAM2 keeps one object's memory bank."""

    obj: int  # index of the (key frame, box) object
    key: int  # 0-based key frame
    step: int  # +1 forward, -1 in reverse
    count: int  # frames tracked after the key frame
    memory: dict[int, dict]


# SAM2's compact per-frame output; maskmem_pos_enc, a constant, is handled apart.
_OUTPUT_TENSORS = ("maskmem_features", "pred_masks", "obj_ptr", "object_score_logits")


def _stacked_outputs(outputs: list[dict]) -> dict:
    """Single-object SAM2 frame outputs as one output with the objects on the batch axis."""
    stacked = {name: torch.cat([o[name] for o in outputs]) for name in _OUTPUT_TENSORS}
    # One constant for every frame and object (SAM2 caches it so): expanded, not copied.
    stacked["maskmem_pos_enc"] = [
        x[:1].expand(len(outputs), *x.shape[1:]) for x in outputs[0]["maskmem_pos_enc"]
    ]
    return stacked


def _output_of(batched: dict, i: int) -> dict:
    """Object ``i``'s part of a batched SAM2 frame output."""
    one = {name: batched[name][i : i + 1] for name in _OUTPUT_TENSORS}
    one["maskmem_pos_enc"] = [x[i : i + 1] for x in batched["maskmem_pos_enc"]]
    return one


def _stacked_features(entry: dict, frames: list[int]) -> tuple:
    """Cached (image, backbone output) of ``frames`` with the frames on the batch axis; one
    frame's own entry when all are the same (SAM2 expands it to the batch without a copy)."""
    if len(set(frames)) == 1:
        return entry["features"][frames[0]]
    images, backbones = zip(*(entry["features"][f] for f in frames))
    return torch.cat(images), {
        name: [torch.cat(level) for level in zip(*(b[name] for b in backbones))]
        for name in ("backbone_fpn", "vision_pos_enc")
    }


class BaselinePropagator:
    """Box-seeded, slice-to-slice region growing with scikit-image; no weights needed."""

    name = BASELINE_NAME

    def __init__(
        self,
        smoothing: float = 1.0,
        band: float = 2.5,
        min_band: float = 6.0,
        margin: int = 4,
        max_growth: float = 1.6,
    ):
        self.smoothing = smoothing  # Gaussian sigma (pixels) before growing, against noise
        self.band = band  # intensity band: +-band robust standard deviations around the seed
        self.min_band = min_band  # ...but at least this many grey levels
        self.margin = margin  # how far (pixels) a region may grow past the previous slice's box
        self.max_growth = max_growth  # a slice may hold at most this times the previous area

    def _grow(
        self, image: np.ndarray, seed: np.ndarray, allowed: np.ndarray, low: float, high: float
    ) -> np.ndarray:
        candidate = allowed & (image >= low) & (image <= high)
        seed = seed & candidate
        if not seed.any():
            return np.zeros_like(candidate)
        grown = reconstruction(seed.astype(np.uint8), candidate.astype(np.uint8), method="dilation")
        return grown.astype(bool)

    def _one_box(
        self, smooth: np.ndarray, key: int, box: Box, forward: int, backward: int
    ) -> np.ndarray:
        num, height, width = smooth.shape
        x1, y1, x2, y2 = box
        cy1, cy2 = y1 + (y2 - y1) // 4, y2 - (y2 - y1) // 4
        cx1, cx2 = x1 + (x2 - x1) // 4, x2 - (x2 - x1) // 4
        core = smooth[key, cy1 : max(cy2, cy1 + 1), cx1 : max(cx2, cx1 + 1)]
        level = float(np.median(core))
        spread = 1.4826 * float(np.median(np.abs(core - level)))
        half = max(self.band * spread, self.min_band)
        low, high = level - half, level + half
        out = np.zeros(smooth.shape, bool)
        allowed = np.zeros((height, width), bool)
        allowed[y1:y2, x1:x2] = True
        seed = np.zeros((height, width), bool)
        seed[cy1 : max(cy2, cy1 + 1), cx1 : max(cx2, cx1 + 1)] = True
        out[key] = self._grow(smooth[key], seed, allowed, low, high)
        for step, count in ((1, forward), (-1, backward)):
            previous = out[key]
            for i in range(1, count + 1):
                z = key + step * i
                if not previous.any():
                    break
                rows, cols = np.nonzero(previous)
                allowed = np.zeros((height, width), bool)
                allowed[
                    max(0, rows.min() - self.margin) : rows.max() + 1 + self.margin,
                    max(0, cols.min() - self.margin) : cols.max() + 1 + self.margin,
                ] = True
                seed = ndimage.binary_erosion(previous, iterations=2)
                if not seed.any():
                    seed = previous
                grown = self._grow(smooth[z], seed, allowed, low, high)
                if grown.sum() > self.max_growth * previous.sum() + 4 * self.margin**2:
                    break  # leaking into a neighbour of similar density: stop this direction
                out[z] = grown
                previous = grown
        return out

    def propagate(
        self,
        volume_id: str,
        slices: np.ndarray,
        key_slice: int,
        boxes: tuple[Box, ...],
        window: int | None,
    ) -> np.ndarray:
        """(S, H, W) bool mask grown from each box on key slice k (1-based), within +-window."""
        num = slices.shape[0]
        result = np.zeros(slices.shape, bool)
        if not boxes:
            return result
        key = key_slice - 1
        forward, backward = _span(key, window, num)
        lo, hi = key - backward, key + forward + 1
        smooth = np.zeros(slices.shape, np.float32)
        smooth[lo:hi] = gaussian(
            np.asarray(slices[lo:hi], np.float32),
            sigma=(0, self.smoothing, self.smoothing),
            preserve_range=True,
        )
        for box in boxes:
            result |= self._one_box(smooth, key, box, forward, backward)
        return result

    def propagate_group(
        self,
        volume_id: str,
        slices: np.ndarray,
        anchors: Sequence[EvidenceAnchor],
        window: int | None,
    ) -> list[np.ndarray]:
        """One mask per anchor, one anchor after the other: region growing has no image
        features to share, and each box is cheap."""
        return [self.propagate(volume_id, slices, a.key_slice, a.boxes, window) for a in anchors]


def build_propagator(
    propagator: str,
    checkpoint: Path | None = None,
    image_size: int = 512,
    feature_batch: int = 8,
    volume_cache: int = 4,
    device: str = "cpu",
):
    """The propagator a config names. MedSAM2 is never silently replaced by the baseline."""
    if propagator == "baseline":
        if checkpoint is not None:
            raise ValueError(
                f"a MedSAM2 checkpoint ({checkpoint}) was given with "
                "propagator 'baseline'; set propagator to 'medsam2' to use it"
            )
        return BaselinePropagator()
    if propagator == "medsam2":
        return MedSAM2Propagator(checkpoint, image_size, feature_batch, volume_cache, device)
    raise ValueError(f"unknown propagator {propagator!r}: use 'medsam2' or 'baseline'")


@command()
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m reward_server.propagation",
        description="Write a random-weight SAM2.1 Hiera-tiny checkpoint in MedSAM2's format.",
    )
    parser.add_argument(
        "--out-file", type=Path, required=True, help="the checkpoint to write (.pt)"
    )
    parser.add_argument(
        "--image-size", type=int, default=512, help="SAM2 input side in px (MedSAM2: 512)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the random weights")
    args = parser.parse_args(argv)
    path = write_random_checkpoint(args.out_file, args.image_size, args.seed)
    print(f"wrote random SAM2.1 Hiera-tiny checkpoint: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
