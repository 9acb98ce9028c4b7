"""LoRA adapters of the policy: saved, merged into the base weights, stacked into one.

GRPO starts from the SFT policy and regularises toward it: the SFT adapter is merged into the
base weights and a fresh adapter is trained on top, so the model with its adapter disabled *is*
the SFT policy (pi_ref) and no second copy is kept. The rollout engines serve the same merged
weights (written once as a checkpoint folder) plus the GRPO adapter; the adapter a run finally
exports stacks both (rank r_sft + r_grpo) on the original base, loadable wherever the SFT
adapter is.
"""

from __future__ import annotations

from pathlib import Path

import torch

from learner.training_frame import TrainingFrame
from rollout.hf_engine import checkpoint_dtype
from rollout.records import AdapterTensors


def lora_state(engine) -> dict:
    """The adapter's weights, gathered from ZeRO-3 partitions when needed. Only LoRA weights:
    a LoRA on lm_head does not drag the full base head into every pushed adapter."""
    from peft import get_peft_model_state_dict

    module = engine.module

    def collect() -> dict:
        state = get_peft_model_state_dict(module, save_embedding_layers=False)
        return {k: v.detach().cpu().clone() for k, v in state.items()}

    if engine.zero_optimization_stage() == 3:
        import deepspeed

        params = [p for n, p in module.named_parameters() if "lora_" in n]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return collect()
    return collect()


def peft_config(engine) -> dict:
    """The adapter's peft config as adapter_config.json holds it (plain JSON values)."""
    import json

    config = engine.module.peft_config["default"].to_dict()
    return json.loads(
        json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v))
    )


def adapter_tensors(engine) -> AdapterTensors:
    """The adapter's weights (by the names :func:`save_adapter` writes) and its peft config, in
    memory: what a push sends to the rollout engines, with no folder on either side. Every
    process calls it (ZeRO-3 gathers the adapter collectively)."""
    return AdapterTensors(peft_config(engine), lora_state(engine))


def save_adapter(
    engine, processor, out_dir: Path, write: bool = True, *, frame: TrainingFrame | None
) -> Path:
    """A peft adapter folder (plus the processor) loadable by PeftModel and the rollout engines,
    with ``frame`` as its medvol.json (None: an adapter that is not served on the base alone).

    Written to a temporary folder and renamed, so readers never see half an adapter. Every
    process calls it (ZeRO-3 gathers the adapter collectively); only ``write`` ones write.
    """
    state = lora_state(engine)
    if not write:
        return Path(out_dir)

    def write_to(tmp: Path) -> None:
        engine.module.save_pretrained(str(tmp), state_dict=state, save_embedding_layers=False)
        processor.save_pretrained(str(tmp))
        if frame is not None:
            frame.write(tmp)

    return _write_folder(out_dir, write_to)


def _write_folder(out_dir: Path, write) -> Path:
    """Run ``write(tmp)`` into a temporary sibling folder, then rename it to ``out_dir``."""
    import shutil

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def _merged_model(engine, base_path: Path):
    from peft import PeftModel, set_peft_model_state_dict
    from transformers import Qwen3VLForConditionalGeneration

    state = lora_state(engine)
    base = Qwen3VLForConditionalGeneration.from_pretrained(base_path, dtype=torch.float32)
    peft_model = PeftModel(base, engine.module.peft_config["default"])
    set_peft_model_state_dict(peft_model, state)
    return peft_model.merge_and_unload().to(checkpoint_dtype(base_path))


def merged_state(engine, base_path: Path) -> dict[str, torch.Tensor]:
    """Full weights with the adapter folded in (merged in fp32, in the dtype ``base_path``
    stores), by checkpoint name: what a full push sends."""
    return {k: v.detach() for k, v in _merged_model(engine, base_path).state_dict().items()}


def save_merged(engine, processor, base_path: Path, out_dir: Path) -> Path:
    """Full weights with the adapter folded in, as an HF checkpoint folder (for full pushes)."""

    def write(tmp: Path) -> None:
        _merged_model(engine, base_path).save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))

    return _write_folder(out_dir, write)


class AdapterStackError(ValueError):
    """Two adapters that cannot be stacked into one; names the adapter and the field."""


def _adapter_files(folder: Path) -> tuple[dict, dict]:
    import json

    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    return config, load_file(str(folder / "adapter_model.safetensors"))


def stack_adapters(first: tuple[dict, dict], second: tuple[dict, dict]) -> tuple[dict, dict]:
    """One LoRA adapter equal to applying ``first`` then ``second`` on the same base.

    Each is (adapter_config, state dict with peft's saved keys). LoRA adds
    delta W = (alpha / r) B A per module, and the deltas of two adapters add up, so the stacked
    adapter has rank r1 + r2, A = [A1; A2], B = [s1 B1, s2 B2] and alpha = r1 + r2 (scale 1):
    exactly the sum. A module that only one adapter touches gets zeros for the other half.
    """
    (c1, w1), (c2, w2) = first, second
    for c, which in ((c1, "first"), (c2, "second")):
        for key in ("rank_pattern", "alpha_pattern"):
            if c.get(key):
                raise AdapterStackError(
                    f"{which} adapter: {key} is set; only one rank is supported"
                )
        if c.get("use_rslora") or c.get("use_dora"):
            raise AdapterStackError(f"{which} adapter: rsLoRA/DoRA adapters cannot be stacked")
    r1, r2 = int(c1["r"]), int(c2["r"])
    s1, s2 = c1["lora_alpha"] / r1, c2["lora_alpha"] / r2
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in (*w1, *w2) if ".lora_" in k})
    state = {}
    for module in modules:
        a1, b1 = w1.get(f"{module}.lora_A.weight"), w1.get(f"{module}.lora_B.weight")
        a2, b2 = w2.get(f"{module}.lora_A.weight"), w2.get(f"{module}.lora_B.weight")
        like_a, like_b = (a1, b1) if a1 is not None else (a2, b2)
        if a1 is None:
            a1, b1 = like_a.new_zeros(r1, like_a.shape[1]), like_b.new_zeros(like_b.shape[0], r1)
        if a2 is None:
            a2, b2 = like_a.new_zeros(r2, like_a.shape[1]), like_b.new_zeros(like_b.shape[0], r2)
        state[f"{module}.lora_A.weight"] = torch.cat([a1.float(), a2.float()], dim=0)
        state[f"{module}.lora_B.weight"] = torch.cat([s1 * b1.float(), s2 * b2.float()], dim=1)
    targets = []
    for c in (c1, c2):
        t = c["target_modules"]
        targets.append(t if isinstance(t, str) else "|".join(f".*\\.{m}" for m in t))
    config = dict(c1)
    config.update(
        r=r1 + r2,
        lora_alpha=r1 + r2,
        target_modules=targets[0] if targets[0] == targets[1] else f"({targets[0]})|({targets[1]})",
    )
    return config, state


def save_stacked_adapter(
    engine, processor, first_adapter: Path, out_dir: Path, *, frame: TrainingFrame | None
) -> Path:
    """The adapter folder of ``first_adapter`` (the SFT adapter merged under this run) stacked
    with this engine's adapter: one adapter on the original base (see :func:`stack_adapters`),
    with ``frame`` as its medvol.json."""
    import json

    from safetensors.torch import save_file

    mine = adapter_tensors(engine)
    stacked_config, stacked = stack_adapters(
        _adapter_files(first_adapter), (mine.config, mine.tensors)
    )

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        save_file(
            {k: v.contiguous() for k, v in stacked.items()}, str(tmp / "adapter_model.safetensors")
        )
        (tmp / "adapter_config.json").write_text(json.dumps(stacked_config, indent=2))
        processor.save_pretrained(str(tmp))
        if frame is not None:
            frame.write(tmp)

    return _write_folder(out_dir, write)
