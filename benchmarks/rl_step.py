"""One RL step's time split (rollout, reward, update) for the tiny and small models.

For each model: the `configs/lm_rl.py` rollout (16 prompts x 8 samples at temperature 1, 176 new
tokens), a warm-up step (compiles), then `--steps` timed GRPO steps. Beside them, in the same
process and on the same prompts, the pure sampler call (`Sampler.__call__` + block): rollout
tokens/s (generated tokens / `time/rollout`, which adds prompt encoding, padding, transfer and
detokenisation) against the sampler's own tokens/s. Goals: rollout >= 80 % of the sampler, and
reward (sandbox + grading) < 15 % of the step.

A pretrained workdir (`--tiny_from`, e.g. a `configs/lm_pretrain.py:tiny` run) gives realistic
completions: code that runs in the sandbox, EOS where solutions end. Without one, and for
`small`, the weights are random: every row runs to the token budget and nothing runs in the
sandbox (grading is then a lower bound).

Usage: python benchmarks/rl_step.py [--tiny_from DIR] [--steps 3] [--models tiny,small]
Prints a markdown table and writes benchmarks/results/rl_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import linen as nn

from echo_jax.core.config import load_config
from echo_jax.lm import pretrain, restore
from echo_jax.lm.data import vocab
from echo_jax.lm.jobs import rl as rl_job
from echo_jax.lm.model import Transformer, param_count
from echo_jax.lm.rl import rollout as loop
from echo_jax.lm.sampler import pad_prompts

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "rl_step.json"


def _model(name: str, init_from: str | None):
    if init_from:
        return (*restore.load_params(init_from), "pretrained")
    cfg = pretrain.model_config(load_config(f"{REPO}/configs/lm_pretrain.py:{name}"))
    dummy = np.zeros((1, 8), np.int32)
    params = nn.meta.unbox(
        Transformer(cfg).init(jax.random.key(0), dummy, dummy, dummy + 1)["params"]
    )
    return cfg, params, "random"


def _pure_sampler_tokens_per_s(algo, sampler, params, problems, rng) -> float:
    rc = algo.rollout
    prompts = loop.encode_prompts(
        [p["question"] for p in problems], algo.vocabulary, rc.max_prompt_len
    )
    prompts = [p for p in prompts for _ in range(rc.samples_per_prompt)]
    prompts_BxP, lengths_B = pad_prompts(prompts, length_multiple=rc.max_prompt_len)
    start = time.perf_counter()
    out = sampler(params, prompts_BxP, lengths_B, rng, rl_job.sampling_params(rc))
    tokens = int(jax.device_get(out.lengths_B).sum())
    return tokens / (time.perf_counter() - start)


def bench(name: str, init_from: str | None, steps: int) -> dict:
    """GRPO steps as the training loop runs them: the host stage (sample, grade), then the jitted
    train step (every update of the rollout), each timed."""
    cfg, params, weights = _model(name, init_from)
    config = load_config(f"{REPO}/configs/lm_rl.py:grpo", ["rl.log_kl=False"])
    vocabulary = vocab.get_vocabulary("spm")
    algo = rl_job.build_algorithm(config, cfg, vocabulary)
    sampler = rl_job.make_sampler(config, cfg, vocabulary, None)
    host_stage = rl_job.make_host_stage(config, algo, sampler)
    state = jax.jit(lambda rng: nn.meta.unbox(algo.init_state(rng)))(jax.random.key(0))
    state = algo.warm_start(state, params)
    train_step = jax.jit(algo.train_step, donate_argnums=0)
    stream = rl_job.prompt_stream(
        rl_job.load_prompts(config, vocabulary), 0, algo.rollout.prompts_per_step
    )
    rows, sampler_rates = [], []
    for step in range(steps + 1):
        problems, rng = next(stream), jax.random.key(step)
        sampler_rates.append(_pure_sampler_tokens_per_s(algo, sampler, state.params, problems, rng))
        batch, row = host_stage(state, problems, rng)
        start = time.perf_counter()
        state, metrics = train_step(state, batch, rng)
        jax.block_until_ready(metrics)
        rows.append({**row, "time/update": time.perf_counter() - start})
    rows, sampler_rates = rows[1:], sampler_rates[1:]  # the first step compiles
    mean = lambda key: float(np.mean([r[key] for r in rows]))
    split = {k: mean(f"time/{k}") for k in ("rollout", "reward", "update")}
    total = sum(split.values())
    rows_per_step = config.rl.prompts_per_step * config.rl.samples_per_prompt
    rollout_rate = float(
        np.mean([r["response_length"] * rows_per_step / r["time/rollout"] for r in rows])
    )
    sampler_rate = float(np.mean(sampler_rates))
    return {
        "model": name,
        "weights": weights,
        "params": param_count(params),
        "rows": rows_per_step,
        "max_new_tokens": config.rl.max_new_tokens,
        "response_length": mean("response_length"),
        "seconds": split,
        "step_s": total,
        "rollout_tokens_per_s": rollout_rate,
        "sampler_tokens_per_s": sampler_rate,
        "rollout_vs_sampler": rollout_rate / sampler_rate,
        "reward_share": split["reward"] / total,
        "accuracy": mean("accuracy"),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny_from", default=None, help="a pretrained tiny workdir")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--models", default="tiny,small")
    args = parser.parse_args()
    results = [
        bench(m, args.tiny_from if m == "tiny" else None, args.steps)
        for m in args.models.split(",")
    ]
    print(
        "| model | weights | params | rows x tokens | step s | rollout s | reward s | update s "
        "| rollout tok/s | sampler tok/s | rollout / sampler | reward share |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        s = r["seconds"]
        print(
            f"| {r['model']} | {r['weights']} | {r['params'] / 1e6:.2f}M | {r['rows']} x "
            f"{r['response_length']:.0f} (max {r['max_new_tokens']}) | {r['step_s']:.1f} | "
            f"{s['rollout']:.1f} | {s['reward']:.2f} | {s['update']:.1f} | "
            f"{r['rollout_tokens_per_s']:,.0f} | {r['sampler_tokens_per_s']:,.0f} | "
            f"{100 * r['rollout_vs_sampler']:.0f} % | {100 * r['reward_share']:.1f} % |"
        )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "command": "python " + " ".join(sys.argv),
                "cpu_count": os.cpu_count(),
                "jax": jax.__version__,
                "python": platform.python_version(),
                "devices": str(jax.devices()),
                "results": results,
            },
            indent=1,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
