"""RL sharded over a data x fsdp x tensor = 2 x 2 x 2 mesh of the 8 fake CPU devices
(tests/conftest.py): a GRPO and a PPO update equal the one-device update, and a sharded RL run
killed with SIGKILL resumes bitwise."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from echo_jax.core import sharding
from echo_jax.core.config import load_config
from echo_jax.core.metrics import read_jsonl
from echo_jax.core.train_loop import TrainTask, initial_state, jit_train_step
from echo_jax.lm.jobs import rl as rl_job
from echo_jax.lm.model import ModelConfig
from tests.conftest import REPO

ONE_DEVICE = {"data": 1, "fsdp": 1, "tensor": 1}
SHARDED = {"data": 2, "fsdp": 2, "tensor": 2}

# Every sharded dim divides its mesh axes (embed 32 / fsdp, vocab 64, heads 4, mlp 64 / tensor).
# kernels="xla": both meshes run the same XLA ops (the CPU kernels would run on one device only);
# attention blocks of 8 over the 16 teacher-forced tokens take the blocked attention's own VJP.
CFG = ModelConfig(
    vocab_size=64,
    d_model=32,
    n_layers=1,
    n_heads=4,
    mlp_dim=64,
    max_len=64,
    smear_keys=True,
    attention_block=8,
    kernels="xla",
)
B, P, N = 8, 8, 8  # 2 prompts x 4 samples; rows divide by data x fsdp = 4
# 2 optimizer steps of 4 rows per rollout, each accumulated over 2 micro-batches of 2 rows; the
# large learning rate and narrow clip range make the second update clip some tokens; the KL
# coefficient puts the reference in the loss (GRPO) or the rewards (PPO).
UPDATE = [
    "rl.prompts_per_step=2",
    "rl.samples_per_prompt=4",
    f"rl.max_new_tokens={N}",
    f"rl.max_prompt_len={P}",
    "rl.train_batch_size=4",
    "rl.micro_batch_size=2",
    "rl.lr=1e-2",
    "rl.critic_lr=1e-2",
    "rl.eps_low=0.01",
    "rl.eps_high=0.01",
    "rl.kl_coef=1e-3",
]

# Tolerances (float32). Measured on the 2-core CPU, max |sharded - one device| after the step
# (2 Adam updates of lr 1e-2: parameters move by up to 2e-2): GRPO 3.7e-7, PPO 3.8e-6 (other
# weights and clip ranges tried: up to 1e-5), and the metrics agree to 1e-7 (clip_fraction
# exactly). That is float rounding: the sharded step sums in another order, and Adam's
# per-element normalisation amplifies it where a gradient is near 0; the one-device step through
# the CPU C++ kernels differs from the one-device XLA step by as much (3.3e-7, 3.1e-6). A wrong
# update moves parameters by ~lr.
PARAM_ATOL = 2e-5
METRIC_RTOL, METRIC_ATOL = 2e-5, 1e-7


def _rollout_batch() -> dict[str, np.ndarray]:
    """A fixed synthetic rollout; in both groups 2 of the 4 samples are rewarded, so every
    advantage is nonzero."""
    rng = np.random.default_rng(0)
    return {
        "prompts_BxP": rng.integers(2, CFG.vocab_size, (B, P)).astype(np.int32),
        "prompt_lengths_B": rng.integers(3, P + 1, B).astype(np.int32),
        "completions_BxN": rng.integers(2, CFG.vocab_size, (B, N)).astype(np.int32),
        "completion_lengths_B": rng.integers(1, N + 1, B).astype(np.int32),
        "rewards_B": np.array([1, 0, 0, 1, 0, 1, 1, 0], np.float32),
    }


def _pretrained(like):
    """Weights shaped like the policy's `like` but not its initialisation (numpy: no compile)."""
    rng = np.random.default_rng(7)
    return jax.tree.map(lambda x: (x + rng.normal(0, 0.02, x.shape)).astype(x.dtype), like)


def _update(algo_name: str, sizes: dict[str, int], pretrained=None):
    """One RL train step on `sizes`'s mesh as `core.train_loop.train` runs it: the init jitted
    with the state's shardings, the warm start, the step jitted with donation. Returns the
    initial state (host), the pretrained weights (host; made from the initial policy unless
    given), the state after the step (on the devices) and the metrics (host)."""
    config = load_config(f"{REPO}/configs/lm_rl.py:{algo_name}", UPDATE)
    rules = config.sharding.rules
    mesh = sharding.make_mesh(sizes, jax.devices()[: int(np.prod(list(sizes.values())))])
    algo = rl_job.build_algorithm(config, CFG, None)
    task = TrainTask(init_state=algo.init_state, train_step=algo.train_step, train_iter=None)
    state, abstract = initial_state(task, mesh, rules, jax.random.key(1))
    initial = jax.device_get(state)
    if pretrained is None:
        pretrained = _pretrained(initial.params)
    # as the RL job's warm start: the pretrained weights restored with the state's shardings
    placed = jax.device_put(pretrained, jax.tree.map(lambda x: x.sharding, state.params))
    with jax.set_mesh(mesh):
        state = algo.warm_start(state, placed)
        step = jit_train_step(task, mesh, rules, abstract)
        state, metrics = step(
            state, sharding.shard_batch(_rollout_batch(), mesh), jax.random.key(3)
        )
    return initial, pretrained, state, jax.device_get(metrics)


def _max_diffs(a, b) -> dict[str, float]:
    diffs = jax.tree.map(
        lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - y), initial=0.0)), a, b
    )
    return {jax.tree_util.keystr(path): d for path, d in jax.tree_util.tree_leaves_with_path(diffs)}


@pytest.mark.parametrize("algo_name", ["grpo", "ppo"])
def test_sharded_update_equals_one_device_update(algo_name):
    init_1, pretrained, state_1, metrics_1 = _update(algo_name, ONE_DEVICE)
    init_8, _, state_8, metrics_8 = _update(algo_name, SHARDED, pretrained)

    # the same rng initialises the same state on either mesh (policy, critic, optimizer)
    assert jax.tree.structure(init_1) == jax.tree.structure(init_8)
    assert all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(init_1), jax.tree.leaves(init_8))
    )

    # the sharded step really is sharded: every matrix of the policy, its reference, its Adam
    # moments and PPO's critic is split 4 ways over fsdp x tensor (replicated over data)
    matrices = [x for x in jax.tree.leaves(state_8) if x.ndim >= 2]
    assert len(matrices) >= 4 * 8  # parameters, reference, Adam mu and nu: 8 matrices each
    for x in matrices:
        spec = [
            a
            for axes in x.sharding.spec
            if axes
            for a in ((axes,) if isinstance(axes, str) else axes)
        ]
        assert sorted(spec) == ["fsdp", "tensor"], (x.shape, x.sharding.spec)
        assert x.addressable_shards[0].data.size * 4 == x.size
    assert state_8.params["embedding"].sharding.spec == PartitionSpec("tensor", "fsdp")
    if algo_name == "ppo":
        w_up = state_8.critic.params["block_0"]["mlp"]["w_up"]
        assert w_up.sharding.spec == PartitionSpec("fsdp", "tensor")

    state_1, state_8 = jax.device_get((state_1, state_8))
    assert int(state_1.step) == int(state_8.step) == 2
    moved = max(_max_diffs(pretrained, state_1.params).values())
    assert 1e-2 <= moved <= 2.1e-2  # two Adam steps of lr 1e-2: far above the tolerance
    diffs = _max_diffs(state_1, state_8)
    print(
        f"{algo_name}: max |sharded - one device| {max(diffs.values()):.3g}; "
        f"worst leaf {max(diffs, key=diffs.get)}"
    )
    assert max(diffs.values()) < PARAM_ATOL, {k: v for k, v in diffs.items() if v >= PARAM_ATOL}
    if state_1.ref_params is not None:  # the frozen reference is a bitwise copy on both meshes
        assert max(_max_diffs(state_1.ref_params, state_8.ref_params).values()) == 0

    assert set(metrics_1) == set(metrics_8)
    assert metrics_1["clip_fraction"] > 0 and metrics_1["grad_norm"] > 0
    for key in metrics_1:
        np.testing.assert_allclose(
            metrics_8[key], metrics_1[key], rtol=METRIC_RTOL, atol=METRIC_ATOL, err_msg=key
        )


# --- A sharded RL run killed with SIGKILL resumes bitwise. ---

STEPS = 8
# `untrained` (tests/lm/conftest.py): its dims divide the mesh (d_model 32 / fsdp; 2 heads, mlp 64
# and the 1024-piece vocabulary / tensor), trained on one device.
# 8 rows per rollout (divisible by data x fsdp = 4), sampled 4 at a time; no evaluation.
RL = [
    "--config.mesh.data=2",
    "--config.mesh.fsdp=2",
    "--config.mesh.tensor=2",
    "--config.rl.prompts_per_step=2",
    "--config.rl.samples_per_prompt=4",
    "--config.rl.max_new_tokens=8",
    "--config.rl.train_batch_size=4",
    "--config.rl.micro_batch_size=2",
    "--config.rl.sampler_batch_size=4",
    "--config.rl.kl_coef=1e-3",
    "--config.eval.per_level=0",
    f"--config.train.num_steps={STEPS}",
    "--config.train.checkpoint_every=2",
]
# `python -m echo_jax.main` with the grader marking every other row correct (an untrained model
# is never right, and with all-zero rewards no update would change anything to restore).
GRADED_MAIN = """
from echo_jax.lm import grading
real = grading.grade_batch
grading.grade_batch = lambda texts, refs, **kwargs: [
    grading.Graded(g.style, g.answer, i % 2 == 0, g.status)
    for i, g in enumerate(real(texts, refs, **kwargs))]
from echo_jax import main
main.run()
"""


def _env(devices: int, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        **extra,
    }


def _comparable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in rows]


def test_sharded_run_killed_with_sigkill_resumes_bitwise(tmp_path, untrained):
    # The runs share a persistent compilation cache: only the first compiles (tens of seconds
    # on 2 cores); the same executables then run the killed run and its resume.
    env = _env(
        8,
        JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    command = lambda workdir: [
        sys.executable,
        "-c",
        GRADED_MAIN,
        "--config=configs/lm_rl.py:grpo",
        f"--workdir={workdir}",
        f"--config.init_from={untrained}",
        *RL,
    ]
    run = lambda workdir: subprocess.run(
        command(workdir), cwd=REPO, env=env, capture_output=True, text=True
    )
    full, killed = tmp_path / "full", tmp_path / "killed"
    out = run(full)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((full / "config.json").read_text())["mesh"] == SHARDED  # on 8 devices
    rows = read_jsonl(full / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    # every step updates the policy, so the resume must restore parameters and optimizer (with
    # all-zero rewards nothing would move and only the prompt stream and RNG were tested)
    assert all(r["accuracy"] == 0.5 and r["grad_norm"] > 0 for r in rows) and rows[-1]["kl"] > 0

    proc = subprocess.Popen(
        command(killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "2").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert max(int(p) for p in os.listdir(killed / "checkpoints") if p.isdigit()) < STEPS

    rerun = run(killed)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "[rl] resumed from" in rerun.stderr
    assert _comparable(read_jsonl(killed / "metrics.jsonl")) == _comparable(rows)
