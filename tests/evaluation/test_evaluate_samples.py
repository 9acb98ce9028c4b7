"""evaluate --samples N: a consensus job scored as the voxel majority of its draws, by hand, and
a run whose consensus rows, agreement study, comparisons and resume are read back."""

import json
from dataclasses import replace

import numpy as np
import pytest

from evaluation.evaluate import CaseJob, CaseScorer, Sampling, anchor_jobs, oracle_jobs
from evaluation.metrics import dsc, mask_agreement


def test_a_consensus_job_scores_the_majority_of_its_draws(oracle_records):
    from data.preprocess import to_source_grid
    from data.volume import load_volume

    cfg, _, samples, records = oracle_records
    scorer = CaseScorer(cfg.data.manifest, cfg.data, cfg.reward, "baseline")
    sample, prepared = next((s, p) for s, p in samples if s.suite == "ctorg")
    (true,) = oracle_jobs("oracle", [(sample, prepared)], cfg.data.min_box_area)
    # a second draw: the true key slice with each box shrunk to its left half
    half = tuple((x0, y0, (x0 + x1) // 2, y1) for x0, y0, x1, y1 in true.boxes)
    draws = (
        replace(true, row="r", answer="a"),
        CaseJob("r", sample.id, true.key_slice, half, answer="b"),
        CaseJob("r", sample.id, None, (), "no <answer> block", answer="c"),
    )
    record = scorer.score(CaseJob("r", sample.id, None, (), samples=draws))

    full = scorer._frame_mask(draws[0], sample.id, prepared)
    part = scorer._frame_mask(draws[1], sample.id, prepared)
    empty = np.zeros_like(full)
    assert 0 < part.sum() < full.sum()  # the two well-formed masks differ
    # 2 of 3 hold a voxel: in both well-formed masks (the malformed draw holds none)
    majority = full & part
    labels = load_volume(sample.mask, "mask", sample.m3d_axes)
    truth = np.isin(labels.array, scorer.dataset.label_values(sample.id))
    assert record["dsc"] == pytest.approx(dsc(to_source_grid(majority, prepared), truth))
    # mean pairwise Dice of (full, part, empty): (Dice(full, part) + 0 + 0) / 3
    assert record["agreement"] == pytest.approx(dsc(full, part) / 3, abs=1e-4)
    assert record["agreement"] == pytest.approx(mask_agreement([full, part, empty]), abs=1e-4)
    assert record["num_samples"] == 3
    anchors = record["anchors"]
    assert [a["ok"] for a in anchors] == [True, True, False]
    assert anchors[2]["failure"] == "no <answer> block" and anchors[2]["answer"] == "c"
    assert anchors[1]["boxes"] == [list(b) for b in half]
    # the representative: the well-formed draw closest to the consensus (the half boxes)
    assert anchors[1]["dice_to_consensus"] > anchors[0]["dice_to_consensus"]
    assert record["boxes"] == [list(b) for b in half] and record["answer"] == "b"
    assert record["row"] == "r" and record["failure"] is None
    greedy = [r for r in records if r["id"] == sample.id][0]
    assert record["dsc"] < greedy["dsc"]  # the majority lost the right halves


def test_a_consensus_job_with_no_draw_that_parses_is_an_empty_mask(oracle_records):
    cfg, _, samples, _ = oracle_records
    scorer = CaseScorer(cfg.data.manifest, cfg.data, cfg.reward, "baseline")
    sample, prepared = samples[0]
    jobs = anchor_jobs("r", [(sample, prepared)], [["nonsense", "<answer>{}</answer>"]])
    assert len(jobs) == 1 and len(jobs[0].samples) == 2
    record = scorer.score(jobs[0])
    assert record["dsc"] == 0.0 and record["agreement"] == 1.0  # two empty masks agree
    assert record["failure"].startswith("none of the 2 sampled answers parses (first: ")
    assert record["key_slice"] is None and record["answer"] == "nonsense"


def test_sampling_settings_are_checked():
    from common.cli import UsageError

    with pytest.raises(UsageError, match="--samples 0: need 1"):
        Sampling(0).check()
    with pytest.raises(UsageError, match="--temperature 0.0: need > 0"):
        Sampling(4, 0.0).check()
    assert Sampling(4).row("SFT") == "SFT (consensus of 4)"


@pytest.mark.slow
def test_evaluate_samples_adds_consensus_rows_an_agreement_study_and_resumes(
    phantom_manifest, tiny_model, tmp_path
):
    from evaluation.evaluate import evaluate
    from tests.conftest import tiny_run_config

    engine = ["rollout.engine=transformers", "rollout.max_tokens=8"]
    cfg = tiny_run_config(tmp_path, phantom_manifest, tiny_model, overrides=engine)
    out = tmp_path / "eval"

    def run(**kwargs):
        text = evaluate(
            cfg,
            {"base": None},
            out,
            workers=0,
            progress=False,
            oracle=False,
            device="cpu",
            **kwargs,
        )
        lines = (out / "cases.jsonl").read_text().splitlines()
        return text, [json.loads(line) for line in lines]

    text, cases = run(sampling=Sampling(3, 1.5, seed=7))
    consensus = "base (consensus of 3) (held-out phrasings)"
    assert {c["row"] for c in cases} == {"base (held-out phrasings)", consensus}
    drawn = [c for c in cases if c["row"] == consensus]
    assert drawn and all(c["num_samples"] == 3 and len(c["anchors"]) == 3 for c in drawn)
    assert all(len({a["answer"] for a in c["anchors"]}) > 1 for c in drawn)  # sampled, T 1.5
    greedy = [c for c in cases if c["row"] == "base (held-out phrasings)"]
    assert all("agreement" not in c and isinstance(c["answer"], str) for c in greedy)
    # a random model: nothing parses, every mask is empty, so the agreement cannot rank cases
    study = json.loads((out / "agreement.json").read_text())
    assert [s["row"] for s in study] == [consensus] and study[0]["rho"] is None
    assert study[0]["cases"] == len(drawn) and study[0]["mean_agreement"] == 1.0
    assert f"{consensus}: agreement vs DSC, Spearman rho undefined" in text
    compared = json.loads((out / "comparisons.json").read_text())
    assert [(c["before"], c["after"]) for c in compared] == [
        ("base (held-out phrasings)", consensus)
    ]
    assert f"{consensus} - base (held-out phrasings): +0.00 DSC per case" in text

    # A re-run reuses every case; another seed redraws the consensus rows only.
    _, again = run(sampling=Sampling(3, 1.5, seed=7))
    assert again == cases
    _, other = run(sampling=Sampling(3, 1.5, seed=8))
    keys = {c["row"]: c["key"] for c in cases}
    assert {c["key"] for c in other if c["row"] == consensus} != {keys[consensus]}
    assert [c for c in other if c["row"] != consensus] == greedy


def test_answers_are_asked_and_read_in_the_run_s_box_frame(oracle_records):
    from data.answer import EvidenceAnchor, format_answer
    from evaluation.evaluate import prompts_of

    cfg, _, samples, _ = oracle_records
    sample, prepared = samples[0]
    (true,) = oracle_jobs("oracle", [(sample, prepared)], cfg.data.min_box_area)
    anchor = (true.key_slice, true.boxes)
    size = prepared.size
    relative = format_answer(EvidenceAnchor(*anchor), "t", size, "relative1000")
    (job,) = anchor_jobs("r", [(sample, prepared)], [relative], "relative1000")
    assert (job.key_slice, job.boxes) == anchor and job.failure is None
    (as_pixels,) = anchor_jobs("r", [(sample, prepared)], [relative])
    assert (as_pixels.key_slice, as_pixels.boxes) != anchor
    (prompt,) = prompts_of([(sample, prepared)], "relative1000")
    assert "0-1000 coordinates" in prompt.messages[1]["content"][0]["text"]
    (prompt,) = prompts_of([(sample, prepared)])
    assert f"pixels of that {size}x{size} slice" in prompt.messages[1]["content"][0]["text"]
