"""Every test sees 8 fake CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

import echo_jax  # noqa: E402,F401  (first: its malloc settings precede any allocating thread)

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_root() -> pathlib.Path:
    return REPO


@pytest.fixture
def shared_data() -> pathlib.Path:
    """$ECHO_JAX_DATA (or ../shared/data); a test that needs it is skipped where it is absent."""
    from echo_jax.core.config import MissingFileError
    from echo_jax.core.files import data_dir

    try:
        return data_dir()
    except MissingFileError:
        pytest.skip("shared data not found; set ECHO_JAX_DATA")
