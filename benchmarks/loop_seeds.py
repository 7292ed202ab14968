"""What vmapping the feedback loop's seeds would buy: one jitted, vmapped train step over S seeds
against S jitted steps one after the other (issue 19, item 7).

The loop's recommender (`source_bias.py:loop_study`: BERT4Rec over frozen MiniLM vectors, the
study's settings, batch 256) is built once; S train states are initialised from S seeds and each
seed draws its own batches. Both paths run the same `train_step(state, batch, rng)`; the times
are warm (compiled beforehand) and the best of `--repeats`. The largest difference of seed 0's
parameters between the two paths is reported (float reassociation in the batched matmuls).

    python benchmarks/loop_seeds.py [--seeds 3] [--steps 20]

Prints a markdown table and writes benchmarks/results/loop_seeds.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from echo_jax.core import sharding
from echo_jax.core.config import load_config
from echo_jax.recsys.jobs.train import build_task, prepare

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache_dir", default=os.path.join(REPO, "runs", "item_cache"))
    parser.add_argument(
        "--out", default=os.path.join(REPO, "benchmarks", "results", "loop_seeds.json")
    )
    args = parser.parse_args()
    logging.set_verbosity(logging.WARNING)

    config = ml_collections.ConfigDict(
        load_config(f"{REPO}/configs/source_bias.py:loop_study", []).to_dict()
    )
    del config["loop"], config["phases"]
    config.kind = "recsys_train"
    config.debias.alpha = config.debias.beta = 0.0  # the undebiased arm's step
    prep = prepare(config, args.cache_dir)
    mesh = sharding.make_mesh(config.mesh.to_dict())
    task, _ = build_task(config, mesh, prep)
    init = jax.jit(lambda r: nn.meta.unbox(task.init_state(r)))
    states = [init(jax.random.key(s)) for s in range(args.seeds)]
    batches = [[next(task.train_iter) for _ in range(args.steps)] for _ in range(args.seeds)]
    rngs = jax.random.split(jax.random.key(0), (args.steps, args.seeds))

    step = jax.jit(task.train_step)
    vstep = jax.jit(jax.vmap(task.train_step))
    stacked_batches = [_stack([b[i] for b in batches]) for i in range(args.steps)]

    def sequential():
        out = list(states)
        for i in range(args.steps):
            for s in range(args.seeds):
                out[s], _ = step(out[s], batches[s][i], rngs[i, s])
        return out

    def vmapped():
        out = _stack(states)
        for i in range(args.steps):
            out, _ = vstep(out, stacked_batches[i], rngs[i])
        return out

    # the same computation up to float reassociation: seed 0's parameters after both paths
    seq_params = sequential()[0].params
    vmap_params = jax.tree.map(lambda x: x[0], vmapped().params)
    max_diff = max(
        float(jnp.abs(a - b).max())
        for a, b in zip(jax.tree.leaves(seq_params), jax.tree.leaves(vmap_params))
    )
    seq_s = _best_of(sequential, args.repeats)
    vmap_s = _best_of(vmapped, args.repeats)
    rows = args.steps * args.seeds
    result = {
        "config": "configs/source_bias.py:loop_study (phase-1 data)",
        "encoder": config.model.user_encoder,
        "batch_size": config.train.batch_size,
        "seeds": args.seeds,
        "steps": args.steps,
        "sequential_s": seq_s,
        "vmapped_s": vmap_s,
        "seed_steps_per_s": {"sequential": rows / seq_s, "vmapped": rows / vmap_s},
        "speedup_vmapped_vs_sequential": seq_s / vmap_s,
        "max_abs_param_diff_seed0": max_diff,
        "device": f"{jax.devices()[0].platform} x{jax.device_count()}",
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"| path | {args.seeds} seeds x {args.steps} steps, s | seed-steps/s |")
    print("|---|---|---|")
    print(f"| sequential (reference) | {seq_s:.3f} | {rows / seq_s:.1f} |")
    print(f"| vmapped | {vmap_s:.3f} | {rows / vmap_s:.1f} |")
    print(f"speedup {seq_s / vmap_s:.2f}x; seed 0 max |param diff| {max_diff:.2e}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
