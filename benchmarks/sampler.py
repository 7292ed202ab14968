"""Sampler throughput: echo_jax's `Sampler` against three others in the same run.

- plain: one jitted prefill + a `lax.scan` of greedy KV-cache decode steps over the same model
  (no stop logic, no logprobs): the simplest correct KV-cache sampler;
- naive: `reference_sampler.recompute_greedy`, a full forward pass over the (P + N) buffer for
  every new token; at large sizes it runs `--naive-steps` steps and is extrapolated (its cost per
  step is constant);
- tunix: google-tunix's `Sampler` on its Llama-3 model of the same shape (random weights, tied
  embeddings, as many KV heads as heads); skipped when tunix does not import.

All draw greedily with EOS switched off, so every row generates exactly N tokens; tokens/s counts
new tokens over the whole call (prefill included). Decode MFU counts the matmul FLOPs of the decode
steps plus attention over the real context, against the host's best measured f32 matmul rate.

Usage: python benchmarks/sampler.py [--repeats 3] [--naive-steps 16]
Prints a markdown table and writes benchmarks/results/sampler.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.flops import matmul_peak_gflops  # noqa: E402
from benchmarks.reference_sampler import recompute_greedy  # noqa: E402
from echo_jax.lm import sampler as sampler_lib  # noqa: E402
from echo_jax.lm.model import ModelConfig, Transformer, init_cache, param_count  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "sampler.json"
# 3.5M parameters: the byte vocabulary, d 256, 4 layers, 4 heads of 64, SwiGLU 768.
CFG = ModelConfig(
    vocab_size=264, d_model=256, n_layers=4, n_heads=4, mlp_dim=768, max_len=1024, smear_keys=True
)
PROMPT_LENGTHS = (33, 64)  # drawn uniformly per row; padded to P = 64
SIZES = [(b, n) for n in (64, 256) for b in (1, 16, 64)]  # (batch, new tokens)


def make_plain(model: Transformer, max_new_tokens: int) -> Callable:
    """The plain KV-cache sampler: prefill in one pass, then scan greedy decode steps."""

    @jax.jit
    def generate(params, prompts_BxP, lengths_B):
        B, P = prompts_BxP.shape
        positions = jnp.broadcast_to(jnp.arange(P), (B, P))
        segments = (positions < lengths_B[:, None]).astype(jnp.int32)
        cache = init_cache(CFG, B, P + max_new_tokens)
        logits, cache = model.apply(
            {"params": params}, prompts_BxP, positions, segments, cache=cache, cache_index=0
        )
        first = jnp.argmax(jnp.take_along_axis(logits, (lengths_B - 1)[:, None, None], 1)[:, 0], -1)

        def step(carry, i):
            cache, token, position = carry
            logits, cache = model.apply(
                {"params": params},
                token[:, None],
                position[:, None],
                jnp.ones((B, 1), jnp.int32),
                cache=cache,
                cache_index=P + i,
            )
            token = jnp.argmax(logits[:, 0], -1)
            return (cache, token, position + 1), token

        _, rest = jax.lax.scan(step, (cache, first, lengths_B), jnp.arange(max_new_tokens - 1))
        return jnp.concatenate([first[:, None], rest.T], axis=1)

    return generate


def make_tunix(max_prompt: int, max_new_tokens: int) -> Callable | None:
    """Tunix's sampler on a Llama-3 of the same shape, called with strings as its API expects."""
    try:
        from flax import nnx
        from tunix.generate import sampler as tunix_sampler
        from tunix.models.llama3 import model as llama3
    except ImportError:
        return None

    class ByteTokenizer:  # ids 3..258 <-> characters, as tunix's TokenizerAdapter duck-types
        def encode(self, text):
            return [ord(c) for c in text]

        def decode(self, ids):
            return "".join(chr(i) for i in ids if i > 2)

        def bos_id(self):
            return 0

        def eos_id(self):
            return 1

        def pad_id(self):
            return 0

    config = llama3.ModelConfig(
        num_layers=CFG.n_layers,
        vocab_size=CFG.vocab_size,
        embed_dim=CFG.d_model,
        hidden_dim=CFG.mlp_dim,
        num_heads=CFG.n_heads,
        head_dim=CFG.head_dim,
        num_kv_heads=CFG.n_heads,
        rope_theta=10_000,
        norm_eps=1e-6,
        weight_tying=True,
    )
    model = llama3.Llama3(config, rngs=nnx.Rngs(0))
    cache = tunix_sampler.CacheConfig(
        cache_size=max_prompt + max_new_tokens,
        num_layers=CFG.n_layers,
        num_kv_heads=CFG.n_heads,
        head_dim=CFG.head_dim,
    )
    sampler = tunix_sampler.Sampler(model, ByteTokenizer(), cache)

    def generate(texts):
        out = sampler(
            texts,
            max_generation_steps=max_new_tokens,
            max_prompt_length=max_prompt,
            eos_tokens=[10**6],
            temperature=0.0,
            pad_output=True,
        )
        return out.tokens

    return generate


def decode_flops(batch: int, new_tokens: int, prompt_mean: float) -> float:
    """Matmul FLOPs of the decode steps: 2 x matmul params per token plus QK and PV over the
    real context (prompt + tokens so far)."""
    matmul_params = (
        CFG.n_layers * (4 * CFG.d_model**2 + 3 * CFG.d_model * CFG.mlp_dim)
        + CFG.d_model * CFG.vocab_size
    )
    context = prompt_mean + new_tokens / 2
    return batch * (new_tokens - 1) * (2 * matmul_params + 4 * CFG.n_layers * CFG.d_model * context)


def best_times(fns: dict[str, Callable], repeats: int) -> dict[str, float]:
    """Min over `repeats` round-robin calls (after one warm-up each): fair under shared load."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name] = min(times[name], time.perf_counter() - start)
    return times


def bench_size(params, batch: int, new: int, repeats: int, naive_steps: int) -> dict:
    rng = np.random.default_rng(batch * 1000 + new)
    prompts = [
        rng.integers(3, CFG.vocab_size - 5, n).tolist()
        for n in rng.integers(PROMPT_LENGTHS[0], PROMPT_LENGTHS[1] + 1, batch)
    ]
    prompts_BxP, lengths_B = sampler_lib.pad_prompts(prompts, PROMPT_LENGTHS[1])
    model = Transformer(CFG)
    ours = sampler_lib.Sampler(CFG, eos_id=-1)  # EOS off: every row draws `new` tokens
    greedy = sampler_lib.SamplingParams(max_new_tokens=new)
    key = jax.random.key(0)
    prefill = jax.jit(lambda p, x, n: ours.prefill(p, x, n, key, greedy).tokens_BxN)
    plain = make_plain(model, new)
    steps = new if batch * new <= 16 * 64 else min(new, naive_steps)
    naive = jax.jit(lambda p, x, n: recompute_greedy(model, p, x, n, new, steps))
    fns = {
        "ours": lambda: ours(params, prompts_BxP, lengths_B, key, greedy).tokens_BxN,
        "ours_prefill": lambda: prefill(params, prompts_BxP, lengths_B),
        "plain": lambda: plain(params, prompts_BxP, lengths_B),
        "naive": lambda: naive(params, prompts_BxP, lengths_B),
    }
    tunix = make_tunix(prompts_BxP.shape[1], new)
    if tunix is not None:
        texts = ["".join(chr(t) for t in p) for p in prompts]
        fns["tunix"] = lambda: tunix(texts)
    times = best_times(fns, repeats)
    times["naive"] *= new / steps
    tps = {k: batch * new / v for k, v in times.items() if k != "ours_prefill"}
    decode_s = times["ours"] - times["ours_prefill"]
    return {
        "batch": batch,
        "new_tokens": new,
        "prompt_width": int(prompts_BxP.shape[1]),
        "seconds": times,
        "tokens_per_s": tps,
        "naive_steps_timed": steps,
        "decode_tflop": decode_flops(batch, new, float(lengths_B.mean())) / 1e12,
        "decode_s": decode_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-steps", type=int, default=16)
    parser.add_argument(
        "--sizes",
        default=",".join(f"{b}x{n}" for b, n in SIZES),
        help="batch x new tokens, comma-separated",
    )
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    dummy = jnp.zeros((1, 8), jnp.int32)
    params = nn.meta.unbox(Transformer(CFG).init(jax.random.key(0), dummy, dummy, dummy + 1))
    params = params["params"]
    peak = matmul_peak_gflops()
    rows = [bench_size(params, b, n, args.repeats, args.naive_steps) for b, n in sizes]
    peak = max(
        peak, matmul_peak_gflops()
    )  # measured twice: other load on a shared host only lowers it
    has_tunix = all("tunix" in r["tokens_per_s"] for r in rows)
    header = "| batch | new | ours tok/s | plain tok/s | naive tok/s | ours/plain | ours/naive |"
    header += " decode MFU |" + (" tunix tok/s | ours/tunix |" if has_tunix else "")
    print(
        f"\nmodel: {param_count(params) / 1e6:.2f}M params, prompts {PROMPT_LENGTHS[0]}-"
        f"{PROMPT_LENGTHS[1]} tokens, greedy; matmul peak {peak:.0f} GFLOP/s\n"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        t = r["tokens_per_s"]
        r["decode_mfu"] = r["decode_tflop"] * 1e3 / max(r["decode_s"], 1e-9) / peak
        line = (
            f"| {r['batch']} | {r['new_tokens']} | {t['ours']:,.0f} | {t['plain']:,.0f} | "
            f"{t['naive']:,.0f} | {t['ours'] / t['plain']:.2f}x | "
            f"{t['ours'] / t['naive']:.0f}x | {100 * r['decode_mfu']:.1f}% |"
        )
        if has_tunix:
            line += f" {t['tunix']:,.0f} | {t['ours'] / t['tunix']:.2f}x |"
        print(line)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "params": param_count(params),
                "model": CFG.__dict__,
                "prompt_lengths": PROMPT_LENGTHS,
                "matmul_peak_gflops": peak,
                "cpu_count": os.cpu_count(),
                "jax": jax.__version__,
                "python": platform.python_version(),
                "devices": str(jax.devices()),
                "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
