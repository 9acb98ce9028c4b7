"""Reward-server fixtures: a prepared phantom dataset in the paper's 64-slice frame."""

import numpy as np
import pytest

from common.config import DataConfig
from data.dataset import VolumeDataset
from data.targets import evidence_target


@pytest.fixture(scope="session")
def data_cfg(tmp_path_factory) -> DataConfig:
    return DataConfig(num_slices=32, slice_size=128, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def dataset(phantom_manifest, data_cfg) -> VolumeDataset:
    return VolumeDataset(phantom_manifest, data_cfg)


@pytest.fixture(scope="session")
def true_anchor():
    """The oracle anchor of a prepared sample: the largest slice and its component boxes."""

    def anchor(prepared):
        return evidence_target(prepared, top_k=1, rng=np.random.default_rng(0), min_area=4)

    return anchor
