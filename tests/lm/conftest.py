"""A small-but-capable pretrained model, built once per test session for the RL science tests.

The `tiny` transformer pretrained for 400 steps on level-1 problems of the three-style mixture
(about 3 minutes on 2 quiet CPU cores) samples about 40 % correct at temperature 1: the code
styles are right about 60 % of the time and the natural-language style (a third of the samples,
and greedy decoding's choice) almost never, so RL has a style to route problems away from.
Set ECHO_JAX_TEST_PRETRAINED to a folder to keep the model between sessions.
"""

import os
import subprocess
import sys

import pytest

from echo_jax.core.config import MissingFileError
from echo_jax.lm import restore
from tests.conftest import REPO

PRETRAIN_STEPS = 400
PRETRAIN_OVERRIDES = [
    "--config.data.levels=(1,)",
    f"--config.train.num_steps={PRETRAIN_STEPS}",
    "--config.train.warmup_steps=50",
    "--config.train.checkpoint_every=400",
    "--config.train.eval_every=400",
    "--config.train.log_every=100",
    "--config.mesh.data=1",
]


def _finished(workdir: str) -> bool:
    try:
        return restore.latest_step(workdir) >= PRETRAIN_STEPS
    except MissingFileError:
        return False


@pytest.fixture(scope="session")
def pretrained_capable(tmp_path_factory) -> str:
    """The workdir of the pretrained model (fixed seed; one device, as on the command line)."""
    workdir = os.environ.get("ECHO_JAX_TEST_PRETRAINED") or str(
        tmp_path_factory.mktemp("pretrained") / "run"
    )
    if not _finished(workdir):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "echo_jax.main",
                "--config=configs/lm_pretrain.py:tiny",
                f"--workdir={workdir}",
                *PRETRAIN_OVERRIDES,
            ],
            cwd=REPO,
            env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"},
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr[-3000:]
    return workdir
