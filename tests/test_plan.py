"""`python -m echo_jax.plan`: the sharded RL state's bytes per device, compiled ahead of time."""

import json
import os
import subprocess
import sys

from tests.conftest import REPO

SMALL = [
    "--config.model.d_model=32",
    "--config.model.n_layers=1",
    "--config.model.n_heads=2",
    "--config.model.mlp_dim=64",
    "--config.model.max_len=64",
    "--config.rl.max_prompt_len=16",
    "--config.rl.max_new_tokens=8",
    "--config.rl.prompts_per_step=4",
    "--config.rl.samples_per_prompt=2",
    "--config.rl.train_batch_size=4",
    "--config.rl.micro_batch_size=4",
]


def _plan(*args):
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
    }
    return subprocess.run(
        [sys.executable, "-m", "echo_jax.plan", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )


def test_plan_shards_the_ppo_state_over_fsdp_and_tensor():
    out = _plan(
        "--config=configs/lm_rl.py:ppo",
        "--config.mesh.data=2",
        "--config.mesh.fsdp=2",
        "--config.mesh.tensor=2",
        *SMALL,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    plan = json.loads(out.stdout.strip().splitlines()[-1])
    assert plan["devices"] == 8 and plan["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    total, per_device = plan["params_bytes_total"], plan["params_bytes_per_device"]
    # fsdp x tensor = 4 model shards; only the norm scales (and 1-D gates) stay whole
    assert total / 4 <= per_device < 0.3 * total
    # policy + 2 Adam moments + reference, and the critic with its own optimizer
    assert plan["state_bytes_per_device"] > 6 * per_device
    assert plan["temp_bytes_per_device"] > 0 and plan["sampler_temp_bytes_per_device"] > 0
    assert plan["compile_s"] > 0


def test_plan_with_too_few_devices_is_one_line():
    out = _plan("--config=configs/lm_rl.py:grpo", "--config.mesh.fsdp=16", *SMALL)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("echo_jax.plan: error: mesh")
    assert "xla_force_host_platform_device_count=16" in out.stderr
