"""Ahead-of-time planning of a run, as MaxText's `train_compile`: does it fit, and how sharded?

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python -m echo_jax.plan --config=configs/lm_rl.py:study_grpo [--config.a.b=v]

builds the state's abstract twin on the config's mesh (shapes and shardings from the logical axis
rules; nothing is allocated), compiles the train step ahead of time (for RL also the sampler) and
prints one JSON line: `devices`, `params_bytes_per_device`, `state_bytes_per_device`,
`temp_bytes_per_device` (XLA's memory analysis of the compiled step), `compile_s`, and for RL
`sampler_temp_bytes_per_device` and `sampler_compile_s`. Fake CPU devices plan a TPU mesh's
sharding; the temp bytes are then the CPU compiler's estimate, not a TPU's.

Kinds: `lm_pretrain` and `lm_rl` (without `init_from`, the config's `model` block).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, logging  # noqa: E402
from flax import linen as nn  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from echo_jax.core import sharding  # noqa: E402
from echo_jax.core.config import ConfigError, parse_flags_with_clear_errors  # noqa: E402
from echo_jax.core.train_loop import TrainTask, abstract_state, jit_train_step  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", lock_config=True, help_string="configs/X.py:variant"
)


def bytes_per_device(tree: Any) -> int:
    """Bytes one device holds of `tree` (ShapeDtypeStructs with shardings): its largest shard."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def _abstract_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.ShapeDtypeStruct]:
    return {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh, v.ndim))
        for k, v in batch.items()
    }


def _pretrain(config: ml_collections.ConfigDict, mesh) -> tuple[TrainTask, dict, dict]:
    from echo_jax.lm import cpu, pretrain
    from echo_jax.lm.data.pipeline import FEATURES
    from echo_jax.lm.model import Transformer

    model_cfg = pretrain.model_config(config)
    cpu.prepare(model_cfg, mesh)
    model = Transformer(model_cfg)
    tx = pretrain.make_optimizer(config.train)
    shape = (config.train.batch_size, config.data.seq_len)
    batch = {k: np.zeros(shape, np.float32 if k == "loss_mask" else np.int32) for k in FEATURES}
    task = TrainTask(
        init_state=pretrain.make_init_state(model, tx, config.data.seq_len),
        train_step=pretrain.make_train_step(model, tx),
        train_iter=None,
    )
    return task, _abstract_batch(batch, mesh), {}


def _rl(config: ml_collections.ConfigDict, mesh) -> tuple[TrainTask, dict, dict]:
    from echo_jax.lm.jobs import rl as rl_job

    if config.init_from:
        raise ConfigError("plan an RL run without init_from: the config's model block is used")
    task, algo, sampler = rl_job.make_task(config, mesh, for_planning=True)
    batch, _ = algo.batch(rl_job.placeholder_sample(algo.rollout), np.random.default_rng(0))
    return task, _abstract_batch(batch, mesh), {"sampler": (algo, sampler)}


_PLANNERS = {"lm_pretrain": _pretrain, "lm_rl": _rl}
KINDS = tuple(sorted(_PLANNERS))


def task_for(config: ml_collections.ConfigDict, mesh) -> tuple[TrainTask, dict, dict]:
    """The config's train task (nothing read or allocated), an abstract batch, and extras."""
    if config.kind not in _PLANNERS:
        raise ConfigError(f"plan supports kinds {list(KINDS)}, not {config.kind!r}")
    return _PLANNERS[config.kind](config, mesh)


def _compile_sampler(config, algo, sampler, params, mesh) -> dict[str, float]:
    """Compiles the sampler (prefill and decode loop) for one sampling call of the rollout."""
    from echo_jax.lm import sampler as sampler_lib
    from echo_jax.lm.jobs import rl as rl_job

    rc = algo.rollout
    rows = config.rl.sampler_batch_size or rc.rollout_size
    prompts = jax.ShapeDtypeStruct(
        (rows, rc.max_prompt_len), np.int32, sharding=sharding.batch_sharding(mesh, 2)
    )
    lengths = jax.ShapeDtypeStruct((rows,), np.int32, sharding=sharding.batch_sharding(mesh, 1))
    start = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(sampler.rules)):
        compiled = sampler_lib._generate.lower(
            sampler, params, prompts, lengths, jax.random.key(0), rl_job.sampling_params(rc)
        ).compile()
    return {
        "sampler_temp_bytes_per_device": compiled.memory_analysis().temp_size_in_bytes,
        "sampler_compile_s": round(time.perf_counter() - start, 1),
    }


def plan(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The plan of `config` (see the module docstring)."""
    mesh = sharding.config_mesh(config.mesh.to_dict())
    task, batch, extra = task_for(config, mesh)
    rules = config.sharding.rules
    state = abstract_state(task, mesh, rules, jax.random.key(0))
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = (
            jit_train_step(task, mesh, rules, state)
            .lower(state, batch, jax.random.key(0))
            .compile()
        )
    result = {
        "config": config.kind,
        "devices": mesh.devices.size,
        "mesh": dict(zip(mesh.axis_names, mesh.devices.shape)),
        "params_bytes_per_device": bytes_per_device(state.params),
        "params_bytes_total": sum(
            math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state.params)
        ),
        "state_bytes_per_device": bytes_per_device(state),
        "temp_bytes_per_device": compiled.memory_analysis().temp_size_in_bytes,
        "compile_s": round(time.perf_counter() - start, 1),
    }
    if "sampler" in extra:
        result.update(_compile_sampler(config, *extra["sampler"], state.params, mesh))
    return result


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        print("echo_jax.plan: error: --config is required", file=sys.stderr)
        sys.exit(2)
    logging.set_verbosity(logging.WARNING)
    try:
        print(json.dumps(plan(_CONFIG.value)), flush=True)
    except ConfigError as e:
        print(f"echo_jax.plan: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags_with_clear_errors)
