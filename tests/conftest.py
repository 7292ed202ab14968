"""Every test sees 8 fake CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import atexit  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402


def _compilation_cache() -> None:
    """A persistent XLA compilation cache for this test process and the jobs it starts: the
    suite compiles the same small models again and again (every loop iteration, every resumed
    subprocess), and a hit skips the compile. One folder per process (pytest-xdist workers do
    not share one, so no two write the same entry), removed at exit."""
    inherited = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if inherited and inherited != os.environ.get("ECHO_JAX_TEST_JIT_CACHE"):
        return  # the user's own cache
    folder = tempfile.mkdtemp(prefix="echo_jax_test_jit_")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["ECHO_JAX_TEST_JIT_CACHE"] = folder
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


_compilation_cache()

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


# The longest test files (minutes each on 2 CPU cores), started first so that under
# `pytest -n 2 --dist loadfile` (README, .ci/run) no long file starts last and runs alone.
SLOW_FILES = (
    "tests/lm/test_echo_chamber.py",
    "tests/recsys/test_feedback_loop_science.py",
    "tests/recsys/test_feedback_loop.py",
    "tests/lm/test_rl_job.py",
    "tests/lm/test_rl_sharded.py",
    "tests/lm/test_ei_rounds.py",
    "tests/lm/test_grid.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(SLOW_FILES)))
