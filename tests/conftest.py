"""Shared test set-up: the project's process environment, and small phantom data."""

from pathlib import Path

import pytest

from cluster.runtime import set_default_environment

set_default_environment()

SMALL_SHAPE = (40, 96, 96)  # (z, y, x): quick to write and to prepare


@pytest.fixture(scope="session")
def phantom_manifest(tmp_path_factory) -> Path:
    """Four phantom cases (one per suite, plus a test case), written once per session."""
    from data.phantoms import write_phantoms

    return write_phantoms(tmp_path_factory.mktemp("phantoms"), n=4, seed=3, shape=SMALL_SHAPE,
                          progress=False)
