"""The sampler: KV-cache decode equals full recompute, logprobs equal teacher forcing, filters hold,
rows stop on EOS / stop sequences, sharding over 8 devices changes nothing, no recompiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from benchmarks import reference_sampler
from echo_jax.core import sharding
from echo_jax.lm import sampler as sampler_lib
from echo_jax.lm.model import ModelConfig, Transformer
from echo_jax.lm.sampler import Sampler, SamplingParams

# A large init std makes the logits peaked, so greedy never meets a near-tie that float rounding
# of the two computation orders could break differently.
CFG = ModelConfig(
    vocab_size=64,
    d_model=32,
    n_layers=2,
    n_heads=4,
    mlp_dim=64,
    max_len=64,
    smear_keys=True,
    init_std=0.3,
)
N = 12
SAMPLED = SamplingParams(N, temperature=0.7, top_k=5, top_p=0.9)
GREEDY_SAMPLER = Sampler(CFG, eos_id=-1)  # EOS never fires: every row draws N tokens
LOGPROB_ATOL = 1e-4  # float32: cached decode vs one teacher-forced pass differ by rounding only


@pytest.fixture(scope="module")
def setup():
    dummy = jnp.zeros((1, 8), jnp.int32)
    params = nn.meta.unbox(
        jax.jit(Transformer(CFG).init)(jax.random.key(0), dummy, dummy, dummy + 1)
    )
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, CFG.vocab_size, n).tolist() for n in (3, 9, 5, 12, 1, 16, 7, 10)]
    prompts_BxP, lengths_B = sampler_lib.pad_prompts(prompts, 16)
    return params["params"], jnp.asarray(prompts_BxP), jnp.asarray(lengths_B)


_score_jit = jax.jit(reference_sampler.score, static_argnums=0)
_recompute_jit = jax.jit(reference_sampler.recompute_greedy, static_argnums=(0, 4))


def _score(params, prompts, lengths, out, temperature=1.0):
    return np.asarray(
        _score_jit(
            Transformer(CFG), params, prompts, lengths, out.tokens_BxN, out.lengths_B, temperature
        )
    )


def test_greedy_cache_equals_full_recompute_and_teacher_forcing(setup):
    params, prompts, lengths = setup
    out = GREEDY_SAMPLER(params, prompts, lengths, jax.random.key(1), SamplingParams(N))
    naive = _recompute_jit(Transformer(CFG), params, prompts, lengths, N)
    np.testing.assert_array_equal(out.tokens_BxN, naive)
    np.testing.assert_array_equal(out.lengths_B, N)
    assert not np.asarray(out.stopped_B).any()
    np.testing.assert_allclose(
        out.logprobs_BxN, _score(params, prompts, lengths, out), atol=LOGPROB_ATOL
    )


def test_sampled_logprobs_equal_teacher_forcing(setup):
    params, prompts, lengths = setup
    out = Sampler(CFG, eos_id=3)(params, prompts, lengths, jax.random.key(2), SAMPLED)
    lp = np.asarray(out.logprobs_BxN)
    np.testing.assert_allclose(
        lp, _score(params, prompts, lengths, out, SAMPLED.temperature), atol=LOGPROB_ATOL
    )
    after_end = np.arange(N)[None] >= np.asarray(out.lengths_B)[:, None]
    assert after_end.any() and (lp[after_end] == 0).all()
    assert (np.asarray(out.tokens_BxN)[after_end] == 0).all()


def test_top_k_and_top_p_never_emit_excluded_tokens():
    logits = np.random.default_rng(3).normal(size=(64, 32)).astype(np.float32) * 2
    order = np.argsort(-logits, axis=1)
    probs = np.take_along_axis(np.asarray(jax.nn.softmax(logits / 0.8, axis=-1)), order, axis=1)
    nucleus = (np.cumsum(probs, axis=1) - probs) < 0.6  # in sorted order: kept by top_p=0.6
    for k, p in ((3, 1.0), (0, 0.6), (5, 0.6)):
        allowed = np.zeros_like(logits, bool)
        keep = np.ones_like(nucleus) if p == 1.0 else nucleus.copy()
        if k:
            keep[:, k:] = False
        np.put_along_axis(allowed, order, keep, axis=1)
        params = SamplingParams(1, temperature=0.8, top_k=k, top_p=p)
        seen = np.zeros_like(allowed)
        draw = jax.jit(jax.vmap(lambda key: sampler_lib.sample_logits(logits, key, params)[0]))
        for token in np.asarray(draw(jax.random.split(jax.random.key(0), 40))):
            seen[np.arange(64), token] = True
        assert not (seen & ~allowed).any(), (k, p)
        assert (seen.sum(1) > 1).any()  # it does sample, not just take the argmax


def test_stops_per_row_on_eos_and_stop_sequence(setup):
    params, prompts, lengths = setup
    free = np.asarray(
        GREEDY_SAMPLER(params, prompts, lengths, jax.random.key(1), SamplingParams(N)).tokens_BxN
    )
    eos, stop = int(free[0, 5]), tuple(int(t) for t in free[1, 3:5])
    out = Sampler(CFG, eos_id=eos, stop_sequences=[stop])(
        params, prompts, lengths, jax.random.key(1), SamplingParams(N)
    )
    tokens, got = np.asarray(out.tokens_BxN), np.asarray(out.lengths_B)
    for b, row in enumerate(free):
        ends = [
            j + 1 for j in range(N) if row[j] == eos or tuple(row[max(j - 1, 0) : j + 1]) == stop
        ]
        want = min(ends, default=N)
        assert got[b] == want and bool(out.stopped_B[b]) == bool(ends), b
        np.testing.assert_array_equal(tokens[b, :want], row[:want])
        assert (tokens[b, want:] == 0).all()
    assert got[0] <= 6 and got[1] <= 5


def test_sharded_over_8_devices_equals_one_device(setup):
    params, prompts, lengths = setup
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    one = Sampler(CFG, eos_id=3)(params, prompts, lengths, jax.random.key(4), SAMPLED)
    sharded = Sampler(CFG, eos_id=3, mesh=mesh, rules=(("batch", ("data", "fsdp")),))
    eight = sharded(params, prompts, lengths, jax.random.key(4), SAMPLED)
    assert len(eight.tokens_BxN.sharding.device_set) == 8
    assert eight.tokens_BxN.sharding.shard_shape(eight.tokens_BxN.shape)[0] == 1
    np.testing.assert_array_equal(eight.tokens_BxN, one.tokens_BxN)
    np.testing.assert_allclose(eight.logprobs_BxN, one.logprobs_BxN, atol=1e-5)


def test_new_prompt_lengths_reuse_the_compiled_program(setup):
    params, prompts, lengths = setup
    first = GREEDY_SAMPLER(params, prompts, lengths, jax.random.key(1), SamplingParams(N))
    compiled = sampler_lib._generate._cache_size()
    # Another prompt-length array and an equal (not the same) sampler: no new program.
    second = Sampler(CFG, eos_id=-1)(
        params, prompts, jnp.maximum(lengths - 1, 1), jax.random.key(1), SamplingParams(N)
    )
    assert sampler_lib._generate._cache_size() == compiled
    assert not np.array_equal(first.tokens_BxN, second.tokens_BxN)
