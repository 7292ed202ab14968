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
def minilm_dir(data_dir: Path) -> Path:
    path = data_dir / "minilm"
    if not (path / "model.safetensors").is_file():
        pytest.skip(f"{path} has no model.safetensors")
    return path
