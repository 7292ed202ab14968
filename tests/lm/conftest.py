"""Pretrained models for the LM tests, each built once per test process: `untrained` (a model that
learns nothing, seconds per step: for the jobs' mechanics) and `pretrained_capable` (below).

A small-but-capable pretrained model, built once per test session for the RL science tests.

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

# A model that learns nothing, sized so that every step takes well under a second.
UNTRAINED = [
    "--config.model.d_model=32",
    "--config.model.n_layers=1",
    "--config.model.n_heads=2",
    "--config.model.mlp_dim=64",
    "--config.data.examples_per_style=500",
    "--config.data.eval_examples=4",
    "--config.train.num_steps=2",
    "--config.train.batch_size=4",
    "--config.train.warmup_steps=1",
    "--config.train.checkpoint_every=2",
    "--config.mesh.data=1",
]


def cpu_env() -> dict:
    """The environment of a job run as on the command line: one CPU device."""
    return {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}


def main_command(config: str, workdir, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "echo_jax.main",
        f"--config={config}",
        f"--workdir={workdir}",
        *args,
    ]


@pytest.fixture(scope="session")
def untrained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("untrained") / "pretrain"
    subprocess.run(
        main_command("configs/lm_pretrain.py:tiny", workdir, *UNTRAINED),
        cwd=REPO,
        env=cpu_env(),
        check=True,
        capture_output=True,
    )
    return workdir


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
            main_command("configs/lm_pretrain.py:tiny", workdir, *PRETRAIN_OVERRIDES),
            cwd=REPO,
            env=cpu_env(),
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr[-3000:]
    return workdir
