"""Fixtures of the data tests: a small phantom dataset written once per session."""

from pathlib import Path

import pytest

from data.phantoms import write_phantoms

SMALL_SHAPE = (40, 96, 96)


@pytest.fixture(scope="session")
def phantom_manifest(tmp_path_factory) -> Path:
    return write_phantoms(
        tmp_path_factory.mktemp("phantoms"), n=4, seed=3, shape=SMALL_SHAPE, progress=False
    )
