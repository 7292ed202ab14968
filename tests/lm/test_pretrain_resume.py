"""A pretraining run killed with SIGKILL resumes from its last checkpoint, bitwise identically."""

import os
import signal
import subprocess
import sys
import time

from echo_jax.core.metrics import read_jsonl
from tests.conftest import REPO

TINY = [
    "--config.model.d_model=32",
    "--config.model.n_layers=2",
    "--config.model.n_heads=2",
    "--config.model.mlp_dim=64",
    "--config.data.seq_len=128",
    "--config.train.batch_size=4",
    "--config.data.eval_examples=4",
    "--config.data.examples_per_style=2000",
    "--config.train.num_steps=60",
    "--config.train.log_every=1",
    "--config.train.eval_every=60",
    "--config.train.checkpoint_every=10",
    "--config.mesh.data=1",
]


def _command(workdir):
    return [
        sys.executable,
        "-m",
        "echo_jax.main",
        "--config=configs/lm_pretrain.py:tiny",
        f"--workdir={workdir}",
        *TINY,
    ]


def _env():
    return {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}


def _losses(workdir):
    return {
        r["step"]: r["train/loss"]
        for r in read_jsonl(workdir / "metrics.jsonl")
        if "train/loss" in r
    }


def test_sigkill_then_rerun_resumes_bitwise(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_command(full), cwd=REPO, env=_env(), check=True, capture_output=True)

    proc = subprocess.Popen(
        _command(killed), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "10").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    steps_before = max(_losses(killed))
    assert steps_before < 60, "the run finished before it could be killed"

    rerun = subprocess.run(_command(killed), cwd=REPO, env=_env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "[pretrain] resumed from" in rerun.stderr
    assert _losses(killed) == _losses(full)  # every step, exactly
    assert sorted(_losses(full)) == list(range(1, 61))
