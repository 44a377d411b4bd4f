"""Shared inputs of the fault tests: lines of the real samples."""

from typing import List

import pytest


@pytest.fixture(scope="session")
def criteo_lines(shared_data) -> List[bytes]:
    """The first 300 lines of the Criteo Kaggle sample (40 tab-separated fields), newline kept."""
    path = shared_data / "criteo-kaggle-sample" / "criteo_kaggle_union.txt"
    return path.read_bytes().splitlines(keepends=True)[:300]


@pytest.fixture(scope="session")
def avazu_lines(shared_data) -> List[bytes]:
    """The Avazu sample's header and its first 300 rows, newline kept."""
    path = shared_data / "avazu-sample" / "avazu_union.csv"
    return path.read_bytes().splitlines(keepends=True)[:301]
