"""Pretraining throughput: echo_jax's jitted train step vs a PyTorch eager reference.

Same architecture, batch and sequence length, measured in the same run, with MFU relative to the
matmul peak measured on this machine in this run (PaLM's FLOP count, and the same without its
attention term). Each variant is timed `--repeats` times, JAX and PyTorch alternating, and the
table gives the median of the repeats (the development VM has slow spells of a minute or so in
which everything runs ~15 % slower; every repeat is in the JSON). Needs the `bench` extra
(PyTorch CPU).

    python benchmarks/pretrain.py [--steps 10] [--repeats 3] [--variants tiny,small]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# First: its malloc settings (echo_jax/core/host.py) must precede any thread that allocates.
import echo_jax  # noqa: E402,F401,I001
import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import torch_reference  # noqa: E402
from benchmarks.flops import matmul_rates_gflops  # noqa: E402
from echo_jax.core import sharding  # noqa: E402
from echo_jax.core.config import load_config  # noqa: E402
from echo_jax.core.train_loop import TrainTask, initial_state, jit_train_step  # noqa: E402
from echo_jax.lm import cpu, pretrain  # noqa: E402
from echo_jax.lm.model import Transformer  # noqa: E402


def production_step(config):
    """The training loop's own jitted train step (one device, donated state), its initial state
    and a random packed batch: `(step, state, batch, mesh)`; call the step under
    `jax.set_mesh(mesh)`."""
    cfg = pretrain.model_config(config)
    batch_size, seq_len = config.train.batch_size, config.data.seq_len
    model, tx = Transformer(cfg), pretrain.make_optimizer(config.train)
    task = TrainTask(
        init_state=pretrain.make_init_state(model, tx, seq_len),
        train_step=pretrain.make_train_step(model, tx),
        train_iter=iter(()),
    )
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    cpu.prepare(cfg, mesh)
    state, abstract = initial_state(task, mesh, config.sharding.rules, jax.random.key(0))
    step = jit_train_step(task, mesh, config.sharding.rules, abstract)
    batch = {
        k: v.numpy()
        for k, v in torch_reference.random_batch(batch_size, seq_len, cfg.vocab_size).items()
    }
    batch["loss_mask"] = batch["loss_mask"].astype(np.float32)
    with jax.set_mesh(mesh):
        batch = sharding.shard_batch(batch, mesh)
    return step, state, batch, mesh


def time_steps(step, state, batch, steps: int, warmup: int = 3):
    """`(seconds per step, state)` over `steps` calls after `warmup` ones (call it under the
    step's mesh; the state passed in is donated, use the one returned)."""
    for _ in range(warmup):
        state, _ = step(state, batch, jax.random.key(0))
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch, jax.random.key(0))
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / steps, state


def step_seconds(config, steps: int, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds per train step, `repeats` times each, alternating: (echo_jax's production step,
    PyTorch's)."""
    step, state, batch, mesh = production_step(config)
    jax_s, torch_s = [], []
    for _ in range(repeats):
        with jax.set_mesh(mesh):
            seconds, state = time_steps(step, state, batch, steps)
        jax_s.append(seconds)
        torch_s.append(
            torch_reference.time_train_steps(
                torch_config(config),
                config.train.batch_size,
                config.data.seq_len,
                steps=steps,
                warmup=3,
            )["step_s"]
        )
    return jax_s, torch_s


def torch_config(config) -> dict:
    m = config.model
    return dict(
        d_model=m.d_model,
        n_layers=m.n_layers,
        n_heads=m.n_heads,
        mlp_dim=m.mlp_dim,
        vocab_size=m.vocab_size,
        norm=m.norm,
        tied=m.tied_embeddings,
        smear_keys=m.smear_keys,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default="tiny,small")
    args = parser.parse_args()
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be at least 1")
    rates = matmul_rates_gflops()
    peak = max(rates.values())
    rows = []
    for variant in args.variants.split(","):
        config = load_config(str(REPO / f"configs/lm_pretrain.py:{variant}"))
        cfg = pretrain.model_config(config)
        tokens = config.train.batch_size * config.data.seq_len
        flops = pretrain.flops_per_token(cfg, config.data.seq_len) * tokens
        # Without the attention term: the CPU kernel skips masked keys, which the PaLM count
        # credits as work done (a packed row's examples never attend to each other).
        matmul_flops = pretrain.flops_per_token(cfg, 0) * tokens
        jax_repeats, torch_repeats = step_seconds(config, args.steps, args.repeats)
        jax_s, torch_s = float(np.median(jax_repeats)), float(np.median(torch_repeats))
        rows.append(
            {
                "variant": variant,
                "batch": config.train.batch_size,
                "seq_len": config.data.seq_len,
                "params_m": round(sum(np.prod(s) for s in _param_shapes(cfg, config)) / 1e6, 2),
                "jax_step_s_repeats": jax_repeats,
                "torch_step_s_repeats": torch_repeats,
                "jax_tokens_per_s": tokens / jax_s,
                "torch_tokens_per_s": tokens / torch_s,
                "ratio": torch_s / jax_s,
                "jax_mfu": flops / jax_s / 1e9 / peak,
                "torch_mfu": flops / torch_s / 1e9 / peak,
                "jax_mfu_without_attention": matmul_flops / jax_s / 1e9 / peak,
            }
        )
    print(
        f"median of {args.repeats} repeats of {args.steps} steps; matmul peak (f32, 2048^3, "
        "measured now): "
        + ", ".join(f"{name} {rate:.0f}" for name, rate in rates.items())
        + f" GFLOP/s; MFU is against {peak:.0f}\n"
    )
    print(
        "| variant | params (M) | batch x seq | echo_jax tok/s | PyTorch eager tok/s | ratio "
        "| echo_jax MFU | PyTorch MFU | echo_jax MFU without attention FLOPs |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['params_m']} | {r['batch']} x {r['seq_len']} | "
            f"{r['jax_tokens_per_s']:,.0f} | {r['torch_tokens_per_s']:,.0f} | "
            f"{r['ratio']:.2f}x | {r['jax_mfu']:.0%} | {r['torch_mfu']:.0%} | "
            f"{r['jax_mfu_without_attention']:.0%} |"
        )
    out = REPO / "benchmarks" / "results" / "pretrain.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "matmul_peak_gflops": peak,
                "matmul_rates_gflops": rates,
                "cpu_count": os.cpu_count(),
                "jax": jax.__version__,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )


def _param_shapes(cfg, config):
    tokens = jax.ShapeDtypeStruct((1, config.data.seq_len), np.int32)
    shapes = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens, tokens, tokens)
    return [x.shape for x in jax.tree.leaves(shapes)]


if __name__ == "__main__":
    main()
