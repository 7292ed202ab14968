"""Batched sampling: one prefill pass over the prompts, then a `lax.while_loop` of decode steps.

Shape legend: B batch, P padded prompt length, N new tokens, S cache slots (P + N), V vocabulary,
W longest stop sequence, T teacher-forced length (P + N).

The `Sampler` is a static object (model config, stop tokens, mesh) and the loop carries a
`SamplingState` pytree; the model is the training `Transformer` with its functional KV cache.
Prompts are right-padded and their lengths are arrays, so new prompt lengths reuse the compiled
program: only the padded width P (see `pad_prompts`) and the batch size are shapes.

Cache layout: prompt b fills slots [0, len_b) and pads [len_b, P) with segment 0 (never attended
to); decode step t writes slot P + t - 1 of every row at position len_b + t - 1. The cache starts
with room for the first of `cache_segments` parts of N and is padded as decoding goes on, since
each step attends over every slot it is given.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from echo_jax.core import sharding
from echo_jax.core.config import ConfigError
from echo_jax.lm.model import Cache, ModelConfig, Transformer, init_cache


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each token. Static: each distinct value compiles once.

    temperature 0 is greedy. `top_k` 0 and `top_p` 1 switch those filters off; both filter the
    tempered distribution, and a token outside them is never emitted.
    """

    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"invalid sampling params {self}")


@flax.struct.dataclass
class SamplingState:
    """What the decode loop carries. `step` tokens have been sampled; the last one (`last_B`, at
    `positions_B`) is not in the cache yet."""

    step: jax.Array
    last_B: jax.Array
    positions_B: jax.Array
    done_B: jax.Array
    lengths_B: jax.Array
    tokens_BxN: jax.Array
    logprobs_BxN: jax.Array
    recent_BxW: jax.Array
    cache: Cache
    rng: jax.Array


@flax.struct.dataclass
class SampleOutput:
    """tokens_BxN: sampled tokens, pad after each row's end. logprobs_BxN: log-probability of each
    sampled token under the tempered distribution softmax(logits / T) (T = 1 when greedy), before
    top-k/top-p filtering; 0 after the end. lengths_B: tokens generated, EOS / stop tokens
    included. stopped_B: the row ended on EOS or a stop sequence rather than the token budget."""

    tokens_BxN: jax.Array
    logprobs_BxN: jax.Array
    lengths_B: jax.Array
    stopped_B: jax.Array


def sample_logits(
    logits_BxV: jax.Array, rng: jax.Array, params: SamplingParams
) -> tuple[jax.Array, jax.Array]:
    """Picks one token per row; returns (token_B, logprob_B) as described in `SampleOutput`."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    if params.temperature == 0:
        token_B = jnp.argmax(logits_BxV, axis=-1)
    else:
        logits_BxV = logits_BxV / params.temperature
        if params.top_k or params.top_p < 1:
            k = min(params.top_k or logits_BxV.shape[-1], logits_BxV.shape[-1])
            top_BxK, index_BxK = jax.lax.top_k(logits_BxV, k)  # sorted, descending
            if params.top_p < 1:
                probs_BxK = jax.nn.softmax(top_BxK, axis=-1)
                # Keep the smallest prefix whose mass reaches top_p (the first token always).
                outside = jnp.cumsum(probs_BxK, axis=-1) - probs_BxK >= params.top_p
                top_BxK = jnp.where(outside, -jnp.inf, top_BxK)
            pick_B = jax.random.categorical(rng, top_BxK, axis=-1)
            token_B = jnp.take_along_axis(index_BxK, pick_B[:, None], axis=-1)[:, 0]
        else:
            token_B = jax.random.categorical(rng, logits_BxV, axis=-1)
    picked_B = jnp.take_along_axis(logits_BxV, token_B[:, None], axis=-1)[:, 0]
    return token_B.astype(jnp.int32), picked_B - jax.nn.logsumexp(logits_BxV, axis=-1)


# Padded prompt widths are multiples of this: prompts of new lengths mostly reuse a compiled
# sampler (P is one of its two shapes).
PROMPT_WIDTH_MULTIPLE = 64


def prompt_width(longest: int, multiple: int = PROMPT_WIDTH_MULTIPLE) -> int:
    """The padded width P of prompts of at most `longest` tokens: `longest` rounded up to
    `multiple`."""
    return -(-longest // multiple) * multiple


def pad_prompts(
    prompts: Sequence[Sequence[int]],
    length_multiple: int = PROMPT_WIDTH_MULTIPLE,
    batch_size: int | None = None,
    pad_id: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads token lists to (B, P), P rounded up to `length_multiple` (few distinct shapes,
    few compiles); `batch_size` adds rows of one pad token. Returns (prompts_BxP, lengths_B)."""
    if not prompts or min(len(p) for p in prompts) < 1:
        raise ValueError("every prompt needs at least one token")
    batch = batch_size or len(prompts)
    if batch < len(prompts):
        raise ValueError(f"{len(prompts)} prompts do not fit batch_size {batch}")
    width = prompt_width(max(len(p) for p in prompts), length_multiple)
    out = np.full((batch, width), pad_id, np.int32)
    lengths = np.ones(batch, np.int32)
    for i, p in enumerate(prompts):
        out[i, : len(p)], lengths[i] = p, len(p)
    return out, lengths


@dataclasses.dataclass(frozen=True)
class Sampler:
    """`sampler(params, prompts_BxP, prompt_lengths_B, rng, SamplingParams(...)) -> SampleOutput`.

    A row stops on `eos_id` or when its last tokens equal one of `stop_sequences` (token ids, e.g.
    `vocab.encode("</llm-code>")`; with a subword vocabulary a stop string that the text happens
    to tokenize differently is not seen, so check the decoded text too); the loop ends once every
    row stopped or N tokens were drawn (the cache is full). With a `mesh` the batch is sharded
    over its data and fsdp axes (B must divide by their product) and `rules` map the model's
    logical axes. Hashable by value: equal samplers share one compiled program.
    """

    cfg: ModelConfig
    eos_id: int = 1
    pad_id: int = 0
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    mesh: Mesh | None = None
    rules: tuple[tuple[str, Any], ...] = ()
    cache_dtype: str | None = None  # default: the model's dtype
    # The cache grows in this many parts, so early decode steps attend over (and copy) fewer
    # empty slots; each part is one more while_loop to compile. 1 = allocate P + N at once.
    cache_segments: int = 4

    def __post_init__(self):
        if any(len(seq) == 0 for seq in self.stop_sequences):
            raise ValueError("empty stop sequence")
        stops = tuple(tuple(int(t) for t in seq) for seq in self.stop_sequences)
        object.__setattr__(self, "stop_sequences", stops)
        object.__setattr__(
            self,
            "rules",
            tuple(
                (name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in self.rules
            ),
        )

    @property
    def model(self) -> Transformer:
        return Transformer(self.cfg)

    def __call__(
        self,
        params: Any,
        prompts_BxP: Any,
        prompt_lengths_B: Any,
        rng: jax.Array,
        sampling: SamplingParams,
    ) -> SampleOutput:
        if self.mesh is None:
            return _generate(self, params, prompts_BxP, prompt_lengths_B, rng, sampling)
        prompts_BxP = jax.device_put(prompts_BxP, sharding.batch_sharding(self.mesh, 2))
        prompt_lengths_B = jax.device_put(prompt_lengths_B, sharding.batch_sharding(self.mesh, 1))
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(list(self.rules)):
            return _generate(self, params, prompts_BxP, prompt_lengths_B, rng, sampling)

    def _constrain(self, tree: Any) -> Any:
        """Keeps every batch-major array of the loop state sharded over the batch axes."""
        if self.mesh is None:
            return tree
        return jax.tree.map(
            lambda x: (
                jax.lax.with_sharding_constraint(x, sharding.batch_sharding(self.mesh, x.ndim))
                if x.ndim
                else x
            ),
            tree,
        )

    def _stops_SxW(self) -> np.ndarray:
        """Stop sequences left-padded with -1, which matches any token."""
        width = max([len(seq) for seq in self.stop_sequences], default=1)
        stops = np.full((len(self.stop_sequences), width), -1, np.int32)
        for i, seq in enumerate(self.stop_sequences):
            stops[i, width - len(seq) :] = seq
        return stops

    def segment_ends(self, max_new_tokens: int) -> list[int]:
        """Token counts after which the cache grows: the last one is N."""
        size = -(-max_new_tokens // max(self.cache_segments, 1))
        return list(range(size, max_new_tokens, size)) + [max_new_tokens]

    def grow_cache(self, cache: Cache, slots: int) -> Cache:
        """Pads the slot axis of every cache array to `slots` (new slots have segment 0)."""
        small, large = (jax.eval_shape(lambda n=n: init_cache(self.cfg, 1, n)) for n in (1, 2))

        def pad(x, a, b):
            axis = next((i for i, (m, n) in enumerate(zip(a.shape, b.shape)) if m != n), None)
            if axis is None or x.shape[axis] == slots:
                return x
            widths = [(0, 0)] * x.ndim
            widths[axis] = (0, slots - x.shape[axis])
            return jnp.pad(x, widths)

        return self._constrain(jax.tree.map(pad, cache, small, large))

    def prefill(
        self, params, prompts_BxP, prompt_lengths_B, rng, sampling: SamplingParams
    ) -> SamplingState:
        """One pass over all prompts fills the cache and samples each row's first token."""
        B, P = prompts_BxP.shape
        N = sampling.max_new_tokens
        slots = P + self.segment_ends(N)[0]
        positions_BxP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
        lengths_B = prompt_lengths_B.astype(jnp.int32)
        segments_BxP = (positions_BxP < lengths_B[:, None]).astype(jnp.int32)
        cache = init_cache(self.cfg, B, slots, jnp.dtype(self.cache_dtype or self.cfg.dtype))
        cache = self._constrain(cache)
        logits_BxPxV, cache = self.model.apply(
            {"params": params}, prompts_BxP, positions_BxP, segments_BxP, cache=cache, cache_index=0
        )
        logits_BxV = jnp.take_along_axis(logits_BxPxV, (lengths_B - 1)[:, None, None], 1)[:, 0]
        state = SamplingState(
            step=jnp.zeros((), jnp.int32),
            last_B=jnp.zeros((B,), jnp.int32),
            positions_B=lengths_B,
            done_B=jnp.zeros((B,), bool),
            lengths_B=jnp.zeros((B,), jnp.int32),
            tokens_BxN=jnp.full((B, N), self.pad_id, jnp.int32),
            logprobs_BxN=jnp.zeros((B, N), jnp.float32),
            recent_BxW=jnp.full((B, self._stops_SxW().shape[1]), -1, jnp.int32),
            cache=cache,
            rng=rng,
        )
        return self._record(state, logits_BxV, sampling)

    def decode_step(
        self, params, state: SamplingState, *, sampling: SamplingParams, prompt_width: int
    ) -> SamplingState:
        """Feeds each row's last token through the cache and samples the next one."""
        positions_Bx1 = state.positions_B[:, None]
        logits_Bx1xV, cache = self.model.apply(
            {"params": params},
            state.last_B[:, None],
            positions_Bx1,
            jnp.ones_like(positions_Bx1),
            cache=state.cache,
            cache_index=prompt_width + state.step - 1,
        )
        state = state.replace(cache=cache, positions_B=state.positions_B + 1)
        return self._record(state, logits_Bx1xV[:, 0], sampling)

    def _record(self, state: SamplingState, logits_BxV, sampling: SamplingParams):
        """Samples from `logits_BxV`, writes column `step` and marks rows that just stopped."""
        token_B, logp_B = sample_logits(
            logits_BxV, jax.random.fold_in(state.rng, state.step), sampling
        )
        active_B = ~state.done_B
        token_B = jnp.where(active_B, token_B, self.pad_id)
        logp_B = jnp.where(active_B, logp_B, 0.0)
        recent_BxW = jnp.concatenate([state.recent_BxW[:, 1:], token_B[:, None]], axis=1)
        stop_B = token_B == self.eos_id
        if self.stop_sequences:
            stops_SxW = jnp.asarray(self._stops_SxW())
            match = (recent_BxW[:, None] == stops_SxW[None]) | (stops_SxW[None] < 0)
            stop_B |= match.all(-1).any(-1)
        column = lambda buf, x: jax.lax.dynamic_update_slice(
            buf, x[:, None].astype(buf.dtype), (0, state.step)
        )
        return self._constrain(
            state.replace(
                step=state.step + 1,
                last_B=token_B,
                done_B=state.done_B | (active_B & stop_B),
                lengths_B=state.lengths_B + active_B,
                tokens_BxN=column(state.tokens_BxN, token_B),
                logprobs_BxN=column(state.logprobs_BxN, logp_B),
                recent_BxW=recent_BxW,
            )
        )


@functools.partial(jax.jit, static_argnames=("sampler", "sampling"))
def _generate(
    sampler: Sampler, params, prompts_BxP, prompt_lengths_B, rng, sampling: SamplingParams
) -> SampleOutput:
    """Prefill, then decode while a row is running and the cache has room: one program."""
    state = sampler.prefill(params, prompts_BxP, prompt_lengths_B, rng, sampling)
    step = functools.partial(
        sampler.decode_step, params, sampling=sampling, prompt_width=prompts_BxP.shape[1]
    )
    for end in sampler.segment_ends(sampling.max_new_tokens):
        state = state.replace(cache=sampler.grow_cache(state.cache, prompts_BxP.shape[1] + end))
        state = jax.lax.while_loop(
            lambda s, end=end: (s.step < end) & ~jnp.all(s.done_B), step, state
        )
    return SampleOutput(state.tokens_BxN, state.logprobs_BxN, state.lengths_B, state.done_B)
