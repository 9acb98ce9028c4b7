"""Evaluation metrics by hand, the oracle row on phantoms, and prediction on a user's NIfTI."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from evaluation.evaluate import ROWS_NOTE
from evaluation.metrics import dsc, iou


def test_dsc_and_iou_by_hand():
    a = np.zeros((2, 4, 4), bool)
    b = np.zeros((2, 4, 4), bool)
    a[0, :2, :2] = True  # 4 voxels
    b[0, :2, :] = True  # 8 voxels, 4 shared
    assert dsc(a, b) == pytest.approx(8 / 12) and iou(a, b) == pytest.approx(4 / 8)
    assert dsc(a, a) == 1.0 and iou(a, a) == 1.0
    empty = np.zeros_like(a)
    assert dsc(empty, empty) == 1.0 and dsc(a, empty) == 0.0 and iou(empty, b) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        dsc(a, b[:1])


@pytest.mark.slow
def test_table_has_a_high_oracle_row_and_policy_rows_and_resumes(
    phantom_manifest, tiny_model, tmp_path
):
    from evaluation.evaluate import evaluate
    from tests.conftest import tiny_run_config

    engine = ["rollout.engine=transformers", "rollout.max_tokens=16"]
    cfg = tiny_run_config(tmp_path, phantom_manifest, tiny_model, (16, 96), engine)
    markdown = evaluate(
        cfg,
        {"base": None},
        tmp_path / "eval",
        split="test",
        workers=2,
        progress=False,
        phrasings="both",
    )
    assert markdown.startswith(ROWS_NOTE)
    rows = table_rows(markdown)
    assert set(rows) == {"oracle anchor (baseline)", "base", "base (held-out phrasings)"}
    assert "| CT-ORG DSC | CT-ORG IoU |" in markdown  # the test split holds a CT-ORG case
    assert "| mean DSC | 95% CI |" in markdown
    cases = [
        json.loads(line) for line in (tmp_path / "eval" / "cases.jsonl").read_text().splitlines()
    ]
    oracle = [c for c in cases if c["row"].startswith("oracle") and c["suite"] == "ctorg"]
    assert np.mean([c["dsc"] for c in oracle]) > 0.6  # organs of a CT-ORG-like phantom
    base = [c for c in cases if c["row"] == "base"]
    assert all(c["dsc"] == 0.0 and c["failure"] for c in base)  # a random model: nonsense
    assert (tmp_path / "eval" / "table.csv").read_text().startswith("checkpoint,")
    n = len(cases)
    evaluate(cfg, {"base": None}, tmp_path / "eval", split="test", progress=False, phrasings="both")
    assert len((tmp_path / "eval" / "cases.jsonl").read_text().splitlines()) == n  # resumed
    # Other weights under the same row name: its cases are recomputed (here in this process,
    # without Ray), the oracle's reused.
    from tests.conftest import SFT_LIKE_TARGETS, random_adapter

    adapter = random_adapter(Path(tiny_model), tmp_path / "adapter", SFT_LIKE_TARGETS, 4, 0.05, 2)
    keys = {c["row"]: c["key"] for c in cases}
    evaluate(
        cfg,
        {"base": adapter},
        tmp_path / "eval",
        split="test",
        workers=0,
        progress=False,
        phrasings="both",
    )
    again = [
        json.loads(line) for line in (tmp_path / "eval" / "cases.jsonl").read_text().splitlines()
    ]
    assert len(again) == n
    oracle_row = "oracle anchor (baseline)"
    assert {c["key"] for c in again if c["row"] == oracle_row} == {keys[oracle_row]}
    assert all(c["key"] != keys["base"] for c in again if c["row"] == "base")
    # The default asks with held-out phrasings, and its rows say so (reused: no model runs).
    markdown = evaluate(cfg, {"base": adapter}, tmp_path / "eval", split="test", progress=False)
    assert set(table_rows(markdown)) == {"oracle anchor (baseline)", "base (held-out phrasings)"}


def table_rows(markdown: str) -> dict[str, str]:
    """Row name -> line of the markdown table (after its header and separator)."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    return {line.split("|")[1].strip(): line for line in lines[2:]}


def test_phrasings_default_by_split_and_train_has_no_held_out_rows():
    from common.cli import UsageError
    from evaluation.evaluate import resolve_phrasings

    assert resolve_phrasings(None, "test") == "held-out"
    assert resolve_phrasings(None, "val") == "held-out"
    assert resolve_phrasings(None, "train") == "training"
    assert resolve_phrasings("both", "test") == "both"
    with pytest.raises(UsageError, match="--phrasings both: the train split's queries"):
        resolve_phrasings("both", "train")
    with pytest.raises(ValueError, match="got 'all'"):
        resolve_phrasings("all", "test")


def test_an_empty_split_stops_with_the_counts_per_split(phantom_manifest, tmp_path):
    from common.cli import UsageError
    from common.config import load_run_config
    from evaluation.evaluate import evaluate

    cfg = load_run_config("configs/tiny.yaml", [f"data.manifest={phantom_manifest}"])
    with pytest.raises(UsageError, match=r"no cases in split 'val' \(cases per split: test \d+, "):
        evaluate(cfg, {"base": None}, tmp_path / "eval", split="val", progress=False)
    assert not (tmp_path / "eval").exists()
    with pytest.raises(UsageError, match="--propagator medsam2: reward.checkpoint is not set"):
        evaluate(cfg, {}, tmp_path / "eval", propagators=("medsam2",), progress=False)
    assert not (tmp_path / "eval").exists()


def test_held_out_cases_asked_with_training_phrasings_are_fixed_by_the_case_id(phantom_manifest):
    from common.config import DataConfig
    from data.dataset import VolumeDataset
    from data.queries import phrasings
    from evaluation.evaluate import with_training_phrasing

    ds = VolumeDataset(phantom_manifest, DataConfig(num_slices=8, slice_size=32), split="test")
    for sample in ds.samples:
        asked = with_training_phrasing(sample)
        assert sample.query in phrasings(sample.label, "test")
        assert asked.query in phrasings(sample.label, "train")
        assert asked.id == sample.id and with_training_phrasing(sample).query == asked.query


def test_table_ci_columns_and_the_paired_comparison_by_hand():
    from evaluation.evaluate import compare, comparison_line, table

    results = [
        {"row": r, "id": i, "suite": s, "dsc": d, "iou": d / 2, "failure": None}
        for r, shift in (("SFT", 0.0), ("SFT+RL", 0.1))
        for i, s, d in (("a", "ctorg", 0.5), ("b", "ctorg", 0.7), ("c", "kits23", 0.2))
        for d in [d + shift]
    ]
    markdown, rows = table(results, ["SFT", "SFT+RL"])
    header = rows[0]
    sft = dict(zip(header, rows[1]))
    # mean over suites: (mean(0.5, 0.7) + 0.2) / 2 = 0.4
    assert sft["mean DSC"] == "40.00" and sft["CT-ORG DSC"] == "60.00"
    low, high = (float(x) for x in sft["95% CI"].strip("[]").split(","))
    assert 0 <= low <= 40.0 <= high <= 60.0
    c = compare(results, "SFT", "SFT+RL")
    assert c["cases"] == 3
    assert (c["dsc_difference"], c["ci_low"], c["ci_high"]) == pytest.approx((10.0, 10.0, 10.0))
    assert comparison_line(c).startswith("SFT+RL - SFT: +10.00 DSC per case")


def test_predict_sees_the_slices_the_dataset_trains_on(phantom_manifest):
    from common.config import DataConfig
    from data.dataset import VolumeDataset
    from evaluation.predict import prepare_image, resolve_settings

    cfg = DataConfig(num_slices=16, slice_size=64)
    for label in ("liver", "lungs"):
        sample, prepared = VolumeDataset(phantom_manifest, cfg).by_id(f"ctorg_0000/{label}")
        default = resolve_settings(None, "m", 16, 64)  # no adapter: data.window's default
        seen = prepare_image(sample.image, 16, 64, default.window)
        assert seen.slices.tobytes() == np.asarray(prepared.slices).tobytes()


def test_predict_window_takes_a_preset_or_two_numbers():
    from common.cli import UsageError
    from evaluation.predict import PredictError, build_parser, parse_window

    base = ["--image", "ct.nii.gz", "--query", "q", "--model", "m", "--out-dir", "o"]
    parser = build_parser()
    assert parser.parse_args(base).window is None  # the adapter's, else data.window's default
    assert parser.parse_args(base + ["--window", "-160", "240"]).window == (-160.0, 240.0)
    assert parser.parse_args(base + ["--window", "lung"]).window == (-1350.0, 150.0)
    assert parse_window(["unit"]) == (0.0, 1.0)
    with pytest.raises(PredictError, match="--window: unknown window preset 'abdomn'"):
        parse_window(["abdomn"])
    with pytest.raises(PredictError, match="low below high"):
        parse_window(["240", "-160"])
    with pytest.raises(PredictError, match="must be numbers"):
        parse_window(["low", "240"])
    with pytest.raises(
        UsageError, match="^--window: 1 2 3: give a preset name or LOW HIGH, not 3 values$"
    ):
        parser.parse_args(base + ["--window", "1", "2", "3"])


@pytest.mark.slow
def test_predict_writes_mask_on_the_input_grid_evidence_and_card(
    phantom_manifest, tiny_model, tmp_path
):
    from PIL import Image

    from evaluation.predict import PredictError, predict

    image = phantom_manifest.parent / "images" / "ctorg_0000.nii.gz"
    (output,) = predict(
        image,
        "Find the organ that secretes bile.",
        tiny_model,
        tmp_path / "p",
        num_slices=16,
        size=96,
        window="abdomen",
        max_tokens=16,
        device="cpu",
    )
    (evidence,) = output.evidence
    assert output.folder == tmp_path / "p"
    assert evidence["window"] == [-160.0, 240.0]
    src = nib.load(str(image))
    mask = nib.load(str(tmp_path / "p" / "mask.nii.gz"))
    assert mask.shape == src.shape and np.allclose(mask.affine, src.affine)
    assert evidence["ok"] is False and evidence["failure"]  # a random model answers nonsense
    assert "no MedSAM2" in evidence["propagator"]
    assert evidence["mask_voxels"] == 0 and evidence["volume_mm3"] == 0.0
    spacing = np.abs(np.diag(src.affine)[[2, 1, 0]])  # the phantom's affine is diagonal
    assert [evidence["spacing_mm"][a] for a in "zyx"] == pytest.approx(spacing)
    assert json.loads((tmp_path / "p" / "evidence.json").read_text())["query"]
    assert not list(tmp_path.glob(".p.partial-*"))  # the staging folder is gone
    with Image.open(tmp_path / "p" / "evidence_card.png") as card:
        assert card.size[0] > 200
    with pytest.raises(PredictError, match="query is empty"):
        predict(image, "  ", tiny_model, tmp_path / "q")
    with pytest.raises(PredictError, match="over 1000"):
        predict(image, "x" * 1001, tiny_model, tmp_path / "q")
    with pytest.raises(PredictError, match="not a checkpoint folder"):
        predict(image, "liver", tmp_path, tmp_path / "q")
    with pytest.raises(PredictError, match="unknown window preset 'abdomn'"):
        predict(image, "liver", tiny_model, tmp_path / "q", window="abdomn")
    from data.volume import VolumeError

    tiny = tmp_path / "tiny.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 2), np.int16), np.eye(4)), str(tiny))
    with pytest.raises(VolumeError, match="too small to sample"):
        predict(tiny, "liver", tiny_model, tmp_path / "q")
    assert not (tmp_path / "q").exists()  # bad input: nothing written, not even the log


@pytest.mark.slow
def test_predict_with_an_oracle_like_answer_writes_a_real_mask(phantom_manifest, tmp_path):
    """The card and mask path with a usable anchor, via the evaluation scorer on the oracle."""
    from common.config import load_run_config
    from data.dataset import VolumeDataset
    from evaluation.card import evidence_card
    from evaluation.evaluate import CaseScorer, oracle_jobs

    cfg = load_run_config(
        "configs/tiny.yaml",
        [
            f"data.manifest={phantom_manifest}",
            "data.cache_dir=null",
            "data.num_slices=16",
            "data.slice_size=96",
        ],
    )
    ds = VolumeDataset(phantom_manifest, cfg.data)
    sample, prepared = ds.by_id("ctorg_0000/liver")
    (job,) = oracle_jobs("oracle", [(sample, prepared)], cfg.data.min_box_area)
    result = CaseScorer(str(phantom_manifest), cfg.data, cfg.reward, "baseline").score(job)
    assert result["dsc"] > 0.6
    card = evidence_card(
        tmp_path / "card.png",
        np.asarray(prepared.slices),
        np.asarray(prepared.mask),
        job.key_slice,
        job.boxes,
        "liver",
        prepared.source_index,
    )
    assert card.stat().st_size > 1000


def test_prompts_are_generated_in_chunks_with_the_same_answers(
    tiny_model, phantom_manifest, monkeypatch
):
    from common.config import DataConfig, RolloutConfig
    from data.dataset import VolumeDataset
    from evaluation import evaluate as ev
    from rollout.hf_engine import TransformersEngine

    ds = VolumeDataset(phantom_manifest, DataConfig(num_slices=4, slice_size=32))
    samples = [ds[i] for i in range(5)]
    engine = TransformersEngine(tiny_model, RolloutConfig(engine="transformers", max_tokens=6))
    whole = engine.generate(ev.prompts_of(samples), greedy=True)
    calls = []
    generate = engine.generate
    monkeypatch.setattr(engine, "generate", lambda p, **k: calls.append(len(p)) or generate(p, **k))
    monkeypatch.setattr(ev, "GENERATE_CHUNK", 2)
    chunked = ev.generate_in_chunks(engine, samples, greedy=True)
    assert calls == [2, 2, 1]
    assert [g.sample_id for g in chunked] == [s.id for s, _ in samples]
    assert [g.completions[0].token_ids for g in chunked] == [
        g.completions[0].token_ids for g in whole
    ]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["vllm", "transformers"])
def test_one_engine_for_every_checkpoint_answers_as_a_fresh_engine_per_checkpoint(
    engine, tiny_model, phantom_manifest, tmp_path, monkeypatch
):
    """Base, an SFT-like adapter and one above the configured LoRA rank (a stacked SFT + GRPO
    adapter), asked in an order that puts the base after an adapter: one engine gives the
    greedy answers that an engine built for each checkpoint alone gives."""
    from common.config import DataConfig, LoraSettings, load_run_config
    from data.dataset import VolumeDataset
    from evaluation import evaluate as ev
    from rollout.records import WeightUpdate
    from tests.conftest import random_adapter

    every_projection = LoraSettings().target_modules
    checkpoints = {
        "SFT": random_adapter(tiny_model, tmp_path / "sft", every_projection, 8, 0.5, 1),
        "base": None,
        "SFT+RL": random_adapter(tiny_model, tmp_path / "rl", every_projection, 24, 0.5, 2),
    }
    cfg = load_run_config(
        "configs/tiny.yaml",
        [
            f"model.path={tiny_model}",
            f"rollout.engine={engine}",
            "rollout.in_process=true",
            "rollout.max_tokens=12",
            "rollout.max_model_len=1024",
            "rollout.max_lora_rank=16",  # below SFT+RL's 24: the engine must raise it to 32
        ],
    )
    ds = VolumeDataset(phantom_manifest, DataConfig(num_slices=4, slice_size=64))
    samples = [ds[i] for i in range(3)]
    asked = {name: [(samples[:2], 1), (samples[1:], 1)] for name in checkpoints}
    device = "cpu" if engine == "transformers" else None

    built = []
    real_engine = ev.policy_engine
    monkeypatch.setattr(
        ev, "policy_engine", lambda *a, **k: built.append(a) or real_engine(*a, **k)
    )
    shared = ev.policy_answers(Path(tiny_model), checkpoints, cfg, asked, device)
    assert len(built) == 1 and list(shared) == list(checkpoints)

    for name, adapter in checkpoints.items():
        fresh = real_engine(Path(tiny_model), cfg, [adapter], device)
        if adapter is not None:
            fresh.update_weights(WeightUpdate(1, adapter_dir=adapter))
        alone = [
            [g.completions[0].text for g in ev.generate_in_chunks(fresh, s, greedy=True)]
            for s, _ in asked[name]
        ]
        del fresh
        assert shared[name] == alone, name
    # Each checkpoint answers differently, so a missed swap or a stale adapter would show.
    firsts = [tuple(shared[name][0]) for name in checkpoints]
    assert len(set(firsts)) == 3, firsts
