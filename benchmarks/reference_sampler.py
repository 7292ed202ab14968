"""Reference computations for the sampler's tests and benchmarks (not used by any job):
teacher-forced log-probabilities of given completions (`score`), and greedy decoding by a full
forward pass over the whole buffer at every step, without a KV cache (`recompute_greedy`).

Shape legend as in `echo_jax.lm.sampler`: B batch, P padded prompt length, N new tokens, T = P + N.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from echo_jax.lm.model import Transformer


def _contiguous(prompts_BxP, prompt_lengths_B, completions_BxN, completion_lengths_B):
    """Prompt b's real tokens followed directly by its completion, then padding: (B, P + N)."""
    B, P = prompts_BxP.shape
    T = P + completions_BxN.shape[1]
    slot_BxT = jnp.broadcast_to(jnp.arange(T), (B, T))
    lengths_Bx1 = prompt_lengths_B[:, None]
    from_prompt = jnp.take_along_axis(prompts_BxP, jnp.minimum(slot_BxT, P - 1), axis=1)
    from_completion = jnp.take_along_axis(
        completions_BxN, jnp.clip(slot_BxT - lengths_Bx1, 0, completions_BxN.shape[1] - 1), 1
    )
    tokens_BxT = jnp.where(slot_BxT < lengths_Bx1, from_prompt, from_completion)
    segments_BxT = (slot_BxT < lengths_Bx1 + completion_lengths_B[:, None]).astype(jnp.int32)
    return tokens_BxT * segments_BxT, slot_BxT.astype(jnp.int32), segments_BxT


def score(
    model: Transformer,
    params: Any,
    prompts_BxP: jax.Array,
    prompt_lengths_B: jax.Array,
    completions_BxN: jax.Array,
    completion_lengths_B: jax.Array,
    temperature: float = 1.0,
) -> jax.Array:
    """Teacher-forced log-probabilities (B, N) of the completion tokens under
    softmax(logits / temperature), 0 past each completion's length: what RL recomputes."""
    tokens_BxT, positions_BxT, segments_BxT = _contiguous(
        prompts_BxP, prompt_lengths_B, completions_BxN, completion_lengths_B
    )
    logits_BxTxV, _ = model.apply({"params": params}, tokens_BxT, positions_BxT, segments_BxT)
    N = completions_BxN.shape[1]
    # Completion token j sits at slot len_b + j and is predicted at slot len_b + j - 1.
    source_BxN = prompt_lengths_B[:, None] - 1 + jnp.arange(N)
    logits_BxNxV = jnp.take_along_axis(logits_BxTxV, source_BxN[..., None], axis=1) / temperature
    picked_BxN = jnp.take_along_axis(logits_BxNxV, completions_BxN[..., None], axis=-1)[..., 0]
    logp_BxN = picked_BxN - jax.nn.logsumexp(logits_BxNxV, axis=-1)
    return jnp.where(jnp.arange(N) < completion_lengths_B[:, None], logp_BxN, 0.0)


def recompute_greedy(
    model: Transformer,
    params: Any,
    prompts_BxP: jax.Array,
    prompt_lengths_B: jax.Array,
    max_new_tokens: int,
    num_steps: int | None = None,
) -> jax.Array:
    """The naive baseline: greedy tokens (B, N) from a full forward pass over the whole (P + N)
    buffer at every step, no cache and no early stop (a reference for tests and benchmarks).
    `num_steps` < N draws only that many tokens at the same cost per step."""
    B = prompts_BxP.shape[0]

    def body(j, completions_BxN):
        lengths_B = jnp.full((B,), j, jnp.int32)
        tokens, positions, segments = _contiguous(
            prompts_BxP, prompt_lengths_B, completions_BxN, lengths_B
        )
        logits_BxTxV, _ = model.apply({"params": params}, tokens, positions, segments)
        last_B = prompt_lengths_B + j - 1
        logits_BxV = jnp.take_along_axis(logits_BxTxV, last_B[:, None, None], axis=1)[:, 0]
        return completions_BxN.at[:, j].set(jnp.argmax(logits_BxV, -1).astype(jnp.int32))

    empty = jnp.zeros((B, max_new_tokens), jnp.int32)
    return jax.lax.fori_loop(0, num_steps or max_new_tokens, body, empty)
