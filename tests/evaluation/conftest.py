"""Evaluation fixtures: the oracle's scored anchors of every phantom sample, as cases.jsonl
records, for the tools that re-read an evaluation."""

import pytest


@pytest.fixture(scope="session")
def oracle_records(phantom_manifest):
    """(cfg, overrides, samples, records): the oracle row of every sample (split train and test,
    for more cases) scored as the evaluation scores it, on 16 slices of 96 px. Tests copy the
    records they change."""
    from common.config import load_run_config
    from data.dataset import VolumeDataset
    from evaluation.evaluate import CaseScorer, oracle_jobs

    overrides = [
        f"data.manifest={phantom_manifest}",
        "data.cache_dir=null",
        "data.num_slices=16",
        "data.slice_size=96",
    ]
    cfg = load_run_config("configs/tiny.yaml", overrides)
    dataset = VolumeDataset(cfg.data.manifest, cfg.data)
    samples = [dataset[i] for i in range(len(dataset))]
    scorer = CaseScorer(cfg.data.manifest, cfg.data, cfg.reward, "baseline")
    records = [scorer.score(job) for job in oracle_jobs("oracle", samples, cfg.data.min_box_area)]
    return cfg, overrides, samples, records
