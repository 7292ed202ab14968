"""Softmax attention over packed rows: RoPE, smeared keys, the mask, the dense path, and the
blocked training path.

Shape legend: B batch, H heads, L query length, S key length, K head dim, Q rows of one block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# The logit of a masked key: finite, so that a query that sees no key (padding) gets a uniform
# softmax rather than NaNs, and far below any real logit, so that it weighs exactly 0 otherwise.
MASKED_LOGIT = -1e30


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
    half = head_dim // 2
    return theta ** (-jnp.arange(half, dtype=jnp.float32) / half)


def rope(x_BxLxHxK: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, rotate-half convention on pairs (i, i + K/2)."""
    half = x_BxLxHxK.shape[-1] // 2
    angle = positions_BxL[..., None, None].astype(jnp.float32) * rope_frequencies(
        x_BxLxHxK.shape[-1], theta
    )  # B L 1 K/2
    sin, cos = jnp.sin(angle), jnp.cos(angle)
    x1, x2 = x_BxLxHxK[..., :half], x_BxLxHxK[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x_BxLxHxK.dtype)


def rope_tables(length: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin of `rope`'s angles for positions [0, length), [length, K/2] each."""
    angle = jnp.arange(length, dtype=jnp.float32)[:, None] * rope_frequencies(head_dim, theta)
    return jnp.cos(angle), jnp.sin(angle)


def smear_keys(
    k_BxLxHxK: jax.Array,
    positions_BxL: jax.Array,
    s_H: jax.Array,
    first_Bx1xHxK: jax.Array | None = None,
) -> jax.Array:
    """k_j + s * (k_{j-1} - k_j) per head where position j > 0; `first` stands in for the key
    before the row's first (default: that key itself, i.e. no mixing)."""
    first = k_BxLxHxK[:, :1] if first_Bx1xHxK is None else first_Bx1xHxK
    prev = jnp.concatenate([first, k_BxLxHxK[:, :-1]], axis=1)
    prev = jnp.where((positions_BxL > 0)[..., None, None], prev, k_BxLxHxK)
    return k_BxLxHxK + s_H[:, None].astype(k_BxLxHxK.dtype) * (prev - k_BxLxHxK)


def self_attention(
    q_BxLxHxK: jax.Array,
    k_BxLxHxK: jax.Array,
    v_BxLxHxK: jax.Array,
    positions_BxL: jax.Array,
    segment_ids_BxL: jax.Array,
    smear_gate_H: jax.Array | None,
    rope_theta: float,
    block: int,
) -> jax.Array:
    """Training attention of a packed sequence over itself from the raw projections: keys
    smeared by `smear_gate_H` (None: not smeared), RoPE on queries and keys, then
    `blocked_attention` with query blocks of `block` where 0 < block < L, else
    `dense_attention`."""
    if smear_gate_H is not None:
        with jax.named_scope("smear_keys"):  # names the ops for benchmarks/profile_step.py
            k_BxLxHxK = smear_keys(k_BxLxHxK, positions_BxL, smear_gate_H)
    q_BxLxHxK = rope(q_BxLxHxK, positions_BxL, rope_theta)
    k_BxHxLxK = rope(k_BxLxHxK, positions_BxL, rope_theta).transpose(0, 2, 1, 3)
    v_BxHxLxK = v_BxLxHxK.transpose(0, 2, 1, 3)
    if 0 < block < q_BxLxHxK.shape[1]:
        return blocked_attention(
            q_BxLxHxK, k_BxHxLxK, v_BxHxLxK, positions_BxL, segment_ids_BxL, block
        )
    return dense_attention(
        q_BxLxHxK,
        k_BxHxLxK,
        v_BxHxLxK,
        positions_BxL,
        segment_ids_BxL,
        positions_BxL,
        segment_ids_BxL,
    )


def attention_mask(
    q_pos_BxL: jax.Array, q_seg_BxL: jax.Array, k_pos_BxS: jax.Array, k_seg_BxS: jax.Array
) -> jax.Array:
    """Same (non-padding) segment and an earlier or equal position; positions restart per
    packed example, so this is causal within each example."""
    return (
        (q_seg_BxL[:, :, None] == k_seg_BxS[:, None, :])
        & (q_seg_BxL[:, :, None] > 0)
        & (q_pos_BxL[:, :, None] >= k_pos_BxS[:, None, :])
    )[:, None]


def dense_attention(
    q_BxLxHxK: jax.Array,
    k_BxHxSxK: jax.Array,
    v_BxHxSxK: jax.Array,
    positions_BxL: jax.Array,
    segment_ids_BxL: jax.Array,
    k_pos_BxS: jax.Array,
    k_seg_BxS: jax.Array,
) -> jax.Array:
    """Softmax attention of every query over every key slot, masked by `attention_mask`."""
    mask_Bx1xLxS = attention_mask(positions_BxL, segment_ids_BxL, k_pos_BxS, k_seg_BxS)
    logits = jnp.einsum("BLHK,BHSK->BHLS", q_BxLxHxK, k_BxHxSxK) * (q_BxLxHxK.shape[-1] ** -0.5)
    logits = jnp.where(mask_Bx1xLxS, logits.astype(jnp.float32), MASKED_LOGIT)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_BxHxSxK.dtype)
    return jnp.einsum("BHLS,BHSK->BLHK", probs, v_BxHxSxK)


def blocked_attention(
    q_BxLxHxK: jax.Array,
    k_BxHxLxK: jax.Array,
    v_BxHxLxK: jax.Array,
    positions_BxL: jax.Array,
    segment_ids_BxL: jax.Array,
    block: int,
) -> jax.Array:
    """`dense_attention` of a sequence over itself that skips the upper triangle: query block i
    reads only keys [0, min((i + 1) * block, L)), so the [B, H, L, L] logits, mask and softmax
    shrink to (n + 1) / 2n of their size for n blocks that divide L (XLA:CPU spends most of
    attention's time there). The last block is shorter where `block` does not divide L (RL's
    prompt + completion rows).

    Exact for real tokens: a key after the query in the row is either in another packed example
    or (positions increase within one) at a later position, so `attention_mask` is False for it.
    Padding queries (segment 0) see no key in either path; their output (a mean of the values
    read) differs, and nothing reads it.

    The gradient is hand-written (`_blocked_bwd`), see there; being a `jax.custom_vjp`, this path
    has reverse-mode derivatives only (no `jax.jvp` / `jacfwd`).
    """
    # Heads-major once, so each block's einsums read contiguous slices (~10 % faster than
    # slicing the (B, L, H, K) queries per block).
    out_BxHxLxK = _blocked(
        q_BxLxHxK.transpose(0, 2, 1, 3), k_BxHxLxK, v_BxHxLxK, positions_BxL, segment_ids_BxL, block
    )
    return out_BxHxLxK.transpose(0, 2, 1, 3)


def _query_blocks(length: int, block: int) -> list[tuple[int, int]]:
    """[start, end) of each query block; the last is shorter where `block` does not divide."""
    return [(start, min(start + block, length)) for start in range(0, length, block)]


def _block_mask(positions_BxL, segment_ids_BxL, start: int, end: int) -> jax.Array:
    """Mask of query rows [start, end) over keys [0, end)."""
    return attention_mask(
        positions_BxL[:, start:end],
        segment_ids_BxL[:, start:end],
        positions_BxL[:, :end],
        segment_ids_BxL[:, :end],
    )


def _blocked_forward(q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, positions_BxL, segment_ids_BxL, block):
    """The output and each block's probabilities (the backward pass reuses them)."""
    scale = q_BxHxLxK.shape[-1] ** -0.5
    outs, probs = [], []
    for start, end in _query_blocks(q_BxHxLxK.shape[2], block):
        logits_BxHxQxS = (
            jnp.einsum("BHQK,BHSK->BHQS", q_BxHxLxK[:, :, start:end], k_BxHxLxK[:, :, :end]) * scale
        )
        mask = _block_mask(positions_BxL, segment_ids_BxL, start, end)
        logits_BxHxQxS = jnp.where(mask, logits_BxHxQxS.astype(jnp.float32), MASKED_LOGIT)
        probs_BxHxQxS = jax.nn.softmax(logits_BxHxQxS, axis=-1).astype(v_BxHxLxK.dtype)
        probs.append(probs_BxHxQxS)
        outs.append(jnp.einsum("BHQS,BHSK->BHQK", probs_BxHxQxS, v_BxHxLxK[:, :, :end]))
    return jnp.concatenate(outs, axis=2), probs


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _blocked(q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, positions_BxL, segment_ids_BxL, block):
    return _blocked_forward(q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, positions_BxL, segment_ids_BxL, block)[
        0
    ]


def _blocked_fwd(q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, positions_BxL, segment_ids_BxL, block):
    out, probs = _blocked_forward(
        q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, positions_BxL, segment_ids_BxL, block
    )
    return out, (q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, out, probs, positions_BxL, segment_ids_BxL)


def _blocked_bwd(block, residuals, dout_BxHxLxK):
    """The softmax-attention gradient with two choices that autodiff does not make, worth 3-17 %
    of a tiny train step and 11 % of a small one on XLA:CPU (A/B pairs in
    benchmarks/RESULTS.md):
    - the softmax row term is sum(dO * O) over K (flash attention's), not sum(P * dP) over S;
    - the key and value gradients are accumulated transposed, [K, S] per head
      ("BHQK,BHQS->BHKS"), and transposed once at the end: autodiff's [S, K] = P^T dO contracts
      the row axis of its left operand, which XLA:CPU runs through a slow generic kernel
      (~30 GFLOP/s inside a tiny step, against ~100-200 for these forms).
    The softmax part runs in float32 whatever the activations' dtype, as the forward's does.
    """
    q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, out_BxHxLxK, probs, positions_BxL, segment_ids_BxL = residuals
    B, H, L, K = q_BxHxLxK.shape
    scale = K**-0.5
    f32 = jnp.float32
    row_term_BxHxLx1 = (dout_BxHxLxK.astype(f32) * out_BxHxLxK.astype(f32)).sum(-1, keepdims=True)
    dq_blocks = []
    dk_BxHxKxL = jnp.zeros((B, H, K, L), k_BxHxLxK.dtype)
    dv_BxHxKxL = jnp.zeros((B, H, K, L), v_BxHxLxK.dtype)
    for (start, end), probs_BxHxQxS in zip(_query_blocks(L, block), probs):
        dout_BxHxQxK = dout_BxHxLxK[:, :, start:end]
        dprobs_BxHxQxS = jnp.einsum(
            "BHQK,BHSK->BHQS", dout_BxHxQxK, v_BxHxLxK[:, :, :end], preferred_element_type=f32
        )
        mask = _block_mask(positions_BxL, segment_ids_BxL, start, end)
        dlogits_BxHxQxS = (
            jnp.where(
                mask,
                probs_BxHxQxS.astype(f32) * (dprobs_BxHxQxS - row_term_BxHxLx1[:, :, start:end]),
                0.0,
            )
            * scale
        ).astype(q_BxHxLxK.dtype)
        dq_blocks.append(jnp.einsum("BHQS,BHSK->BHQK", dlogits_BxHxQxS, k_BxHxLxK[:, :, :end]))
        dk_BxHxKxL = dk_BxHxKxL.at[..., :end].add(
            jnp.einsum("BHQK,BHQS->BHKS", q_BxHxLxK[:, :, start:end], dlogits_BxHxQxS)
        )
        dv_BxHxKxL = dv_BxHxKxL.at[..., :end].add(
            jnp.einsum("BHQK,BHQS->BHKS", dout_BxHxQxK, probs_BxHxQxS)
        )
    return (
        jnp.concatenate(dq_blocks, axis=2),
        dk_BxHxKxL.swapaxes(-1, -2),
        dv_BxHxKxL.swapaxes(-1, -2),
        None,
        None,
    )


_blocked.defvjp(_blocked_fwd, _blocked_bwd)
