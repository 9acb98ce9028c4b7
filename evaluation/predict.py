"""Segment a user's CT from a free-form query: mask NIfTI, evidence JSON and an evidence card.

    python -m evaluation.predict --image CT.nii.gz --query "the organ that secretes bile" \
        --model QWEN3VL_DIR [--adapter ADAPTER_DIR] [--checkpoint MEDSAM2.pt] --out OUTDIR \
        [--window abdomen | --window -160 240]

Writes ``OUTDIR/mask.nii.gz`` (on the input's grid, orientation and affine), ``evidence.json``
(key slice in the source volume's own index and in the 64-slice frame, boxes in source pixels and
in the 256 frame, the reasoning text, the propagator used) and ``OUTDIR/evidence_card.png``.
A model answer that does not parse is reported in the JSON and gives an empty mask, not a crash.
Without ``--checkpoint`` the scikit-image baseline propagates (and says so in the JSON).
``--window`` must be the window the policy was trained with (``data.window`` or the suite's entry
in ``data.suite_windows``): a preset name or ``LOW HIGH``; the default is ``data.window``'s default.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from cluster.runtime import set_default_environment
from data.config import WINDOW_PRESETS, DataConfig, WindowError, resolve_window

log = logging.getLogger(__name__)

MAX_QUERY_CHARS = 1000


class PredictError(ValueError):
    """Input that cannot be predicted on; names the file or argument."""


def parse_window(tokens: list[str]) -> tuple[float, float]:
    """``--window``: one preset name (``abdomen``) or two numbers (``-160 240``)."""
    if len(tokens) == 1:
        value: str | list[float] = tokens[0]
    elif len(tokens) == 2:
        try:
            value = [float(t) for t in tokens]
        except ValueError:
            raise PredictError(
                f"--window {' '.join(tokens)}: LOW and HIGH must be numbers"
            ) from None
    else:
        raise PredictError(
            f"--window {' '.join(tokens)}: give a preset name or LOW HIGH, not {len(tokens)} values"
        )
    try:
        return resolve_window(value, "--window")
    except WindowError as err:
        raise PredictError(str(err)) from None


def prepare_image(image_path: Path, num_slices: int, size: int, window: tuple[float, float]):
    """The policy's view of a CT with no mask: windowed, sampled and resized slices, exactly as
    ``data.preprocess.prepare_volume`` prepares a training scan with the same window."""
    from data.preprocess import prepare_arrays
    from data.volume import load_volume

    volume = load_volume(image_path, "image")
    return prepare_arrays(volume, None, [], window, num_slices, size, image_path.name)


def predict(
    image: Path,
    query: str,
    model: Path,
    out: Path,
    adapter: Path | None = None,
    checkpoint: Path | None = None,
    engine: str = "transformers",
    num_slices: int = DataConfig.num_slices,
    size: int = DataConfig.slice_size,
    window: str | tuple[float, float] = DataConfig.window,
    image_size: int = 512,
    max_tokens: int = 256,
) -> dict:
    from data.answer import ParsedAnswer, parse_answer
    from data.preprocess import box_to_source, to_source_grid
    from data.prompts import build_messages
    from data.volume import save_mask
    from evaluation.card import evidence_card
    from reward_server.propagation import build_propagator
    from rollout.actor import build_engine
    from rollout.config import ModelConfig, RolloutConfig
    from rollout.records import RolloutPrompt, WeightUpdate

    query = (query or "").strip()
    if not query:
        raise PredictError("--query is empty")
    if len(query) > MAX_QUERY_CHARS:
        raise PredictError(f"--query is {len(query)} characters, over {MAX_QUERY_CHARS}")
    if not (Path(model) / "config.json").exists():
        raise PredictError(f"--model {model}: no config.json, not a checkpoint folder")
    try:
        low_high = resolve_window(window, "--window")
    except WindowError as err:
        raise PredictError(str(err)) from None
    prepared = prepare_image(Path(image), num_slices, size, low_high)
    propagator = build_propagator("medsam2" if checkpoint else "baseline", checkpoint, image_size)
    cfg = RolloutConfig(
        engine=engine,
        max_tokens=max_tokens,
        in_process=True,
        max_model_len=num_slices * (size // 32) ** 2 + 1024 + max_tokens,
    )
    try:
        policy = build_engine(model, cfg, ModelConfig())
        if adapter is not None:
            policy.update_weights(WeightUpdate(1, adapter_dir=Path(adapter)))
    except (OSError, ValueError) as err:
        raise PredictError(
            f"checkpoint does not load ({model}, adapter {adapter}): {err}"
        ) from None
    (group,) = policy.generate(
        [RolloutPrompt("query", build_messages(prepared.slices, query))], greedy=True
    )
    text = group.completions[0].text
    parsed = parse_answer(text, num_slices, size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    evidence: dict = {
        "image": str(image),
        "query": query,
        "answer": text,
        "propagator": propagator.name,
        "window": list(low_high),
    }
    if isinstance(parsed, ParsedAnswer):
        anchor = parsed.anchor
        mask = propagator.propagate("query", prepared.slices, anchor.key_slice, anchor.boxes, None)
        evidence.update(
            ok=True,
            reasoning=parsed.think,
            key_slice=anchor.key_slice,
            key_slice_source=int(prepared.source_index[anchor.key_slice - 1]),
            boxes=[list(b) for b in anchor.boxes],
            boxes_source=[[round(v, 1) for v in box_to_source(b, prepared)] for b in anchor.boxes],
        )
        title = f"{query}\n{parsed.think[:120]}"
    else:
        mask = np.zeros(prepared.slices.shape, bool)
        evidence.update(ok=False, failure=parsed.reason)
        anchor = None
        title = f"{query}\nno usable answer: {parsed.reason[:80]}"
    source_mask = to_source_grid(mask, prepared)
    save_mask(source_mask, image, out / "mask.nii.gz")
    evidence["mask_voxels"] = int(source_mask.sum())
    evidence_card(
        out / "evidence_card.png",
        prepared.slices,
        mask,
        anchor.key_slice if anchor else None,
        anchor.boxes if anchor else (),
        title,
        prepared.source_index,
    )
    (out / "evidence.json").write_text(json.dumps(evidence, indent=1))
    return evidence


class _WindowAction(argparse.Action):
    """Turns ``--window abdomen`` or ``--window -160 240`` into ``(low, high)`` while parsing."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            setattr(namespace, self.dest, parse_window(list(values)))
        except PredictError as err:
            # argparse already names the option; keep only what is wrong with the value
            message = str(err).removeprefix("--window").lstrip(": ")
            raise argparse.ArgumentError(self, message) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.predict", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--image", required=True, type=Path)
    parser.add_argument("--query", required=True)
    parser.add_argument("--model", required=True, type=Path, help="Qwen3-VL checkpoint folder")
    parser.add_argument("--adapter", type=Path, help="LoRA adapter (SFT or SFT+RL)")
    parser.add_argument("--checkpoint", type=Path, help="MedSAM2 checkpoint (else: baseline)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--engine", default="transformers", choices=["transformers", "vllm"])
    parser.add_argument("--slices", type=int, default=DataConfig.num_slices)
    parser.add_argument("--size", type=int, default=DataConfig.slice_size)
    parser.add_argument(
        "--window",
        nargs="+",
        action=_WindowAction,
        default=resolve_window(DataConfig.window, "data.window"),
        metavar="WINDOW",
        help="intensity window the policy was trained with: a preset "
        f"({', '.join(WINDOW_PRESETS)}) or LOW HIGH (default: {DataConfig.window})",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    set_default_environment()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    evidence = predict(
        args.image,
        args.query,
        args.model,
        args.out,
        args.adapter,
        args.checkpoint,
        args.engine,
        args.slices,
        args.size,
        args.window,
    )
    status = "answer ok" if evidence["ok"] else f"no usable answer ({evidence['failure']})"
    print(
        f"{status}; mask: {args.out / 'mask.nii.gz'} ({evidence['mask_voxels']} voxels); "
        f"card: {args.out / 'evidence_card.png'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
