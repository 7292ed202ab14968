"""Decoder-only transformer (RoPE, SwiGLU, no biases) with logical axis names and a KV cache.

Shape legend: B batch, L query length, S key length (cache slots), D d_model, H heads,
K head dim, F mlp hidden, V vocabulary.

The same module serves training (packed rows, `segment_ids` separate the examples) and sampling
(pass `cache=` from `init_cache`: new keys/values are written at `cache_index` and attention
reads every cached slot of the same segment at an earlier position).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from echo_jax.lm import cpu_attention, cpu_kernels, cpu_norm, dense
from echo_jax.lm.attention import blocked_attention, dense_attention

Cache = list[dict[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    mlp_dim: int
    max_len: int
    norm: str = "rms"  # "rms" (learned scale) or "layernorm" (non-parametric, as OLMo)
    tied_embeddings: bool = True
    smear_keys: bool = False
    rope_theta: float = 10_000.0
    init_std: float = 0.02
    dtype: str = "float32"
    remat: bool = False
    # Query block size of causal attention in training (no cache); 0 = one dense [L, L] block.
    # Blocks skip the fully-masked upper triangle (see `blocked_attention`).
    attention_block: int = 0
    # Training attention (no cache) through the fused C++ kernel of lm/cpu_attention.py:
    # "auto" where the step runs on one CPU device in float32 and the kernel builds, "cpu"
    # always (an error where it cannot), "xla" never. The kernel is reverse-mode only (no
    # jax.jvp through the model) and not recorded in checkpoints (`pretrain.config_meta`).
    attention_kernel: str = "auto"
    # The MLP's and the q/k/v projections' backward passes through lm/dense.py's custom VJPs
    # (weight gradients as row-major matmuls for XLA:CPU, SwiGLU recomputed): "auto" on one
    # CPU device, "cpu" always, "xla" never (jax's own autodiff). Same values and gradients up to
    # float rounding; reverse mode only, and not recorded in checkpoints either.
    dense_grads: str = "auto"
    # RMSNorm (norm="rms") through the C++ kernel of lm/cpu_norm.py, one op per pass (on the
    # float32 activations the norm always computes in): "auto" on one CPU device with d_model a
    # multiple of 16, "cpu" always (an error where it cannot), "xla" never. Not recorded in
    # checkpoints either.
    norm_kernel: str = "auto"
    # SwiGLU's elementwise part (silu(gate) * up and its gradients) through the C++ kernel of
    # lm/cpu_swiglu.py, one op per pass, inside `dense_grads`' VJPs (so only where those run):
    # "auto" on one CPU device in float32, "cpu" always there, "xla" never. Not in checkpoints.
    mlp_kernel: str = "auto"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.norm not in ("rms", "layernorm"):
            raise ValueError(f"norm must be 'rms' or 'layernorm', got {self.norm!r}")
        if self.attention_block < 0:
            raise ValueError(f"attention_block must be >= 0, got {self.attention_block}")
        for name in ("attention_kernel", "dense_grads", "norm_kernel", "mlp_kernel"):
            if getattr(self, name) not in ("auto", "cpu", "xla"):
                raise ValueError(f"{name} must be 'auto', 'cpu' or 'xla', got "
                                 f"{getattr(self, name)!r}")
        if self.mlp_kernel == "cpu" and self.dense_grads == "xla":
            raise ValueError("mlp_kernel='cpu' runs inside dense_grads' custom VJPs: set "
                             "dense_grads to 'auto' or 'cpu', or mlp_kernel to 'auto' or 'xla'")


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple, std: float):
    init = nn.with_logical_partitioning(nn.initializers.normal(std), axes)
    return module.param(name, init, shape, jnp.float32)


class Norm(nn.Module):
    kind: str
    kernel: str = "xla"  # ModelConfig.norm_kernel

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        x = x_BxLxD.astype(jnp.float32)
        scale = None
        if self.kind == "layernorm":
            if self.kernel == "cpu":
                raise ValueError("norm_kernel='cpu' needs norm='rms' (use 'auto' or 'xla')")
            x = x - x.mean(-1, keepdims=True)
        else:
            init = nn.with_logical_partitioning(nn.initializers.ones, ("norm",))
            scale = self.param("scale", init, (x.shape[-1],), jnp.float32)
            if _use_norm_kernel(self.kernel, x):
                return cpu_norm.rms_norm(x, scale).astype(x_BxLxD.dtype)
        x = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-6)
        return (x if scale is None else x * scale).astype(x_BxLxD.dtype)


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
    half = head_dim // 2
    return theta ** (-jnp.arange(half, dtype=jnp.float32) / half)


def rope(x_BxLxHxK: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, rotate-half convention on pairs (i, i + K/2)."""
    half = x_BxLxHxK.shape[-1] // 2
    angle = positions_BxL[..., None, None].astype(jnp.float32) * rope_frequencies(
        x_BxLxHxK.shape[-1], theta)  # B L 1 K/2
    sin, cos = jnp.sin(angle), jnp.cos(angle)
    x1, x2 = x_BxLxHxK[..., :half], x_BxLxHxK[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x_BxLxHxK.dtype)


def rope_tables(length: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin of `rope`'s angles for positions [0, length), [length, K/2] each."""
    angle = jnp.arange(length, dtype=jnp.float32)[:, None] * rope_frequencies(head_dim, theta)
    return jnp.cos(angle), jnp.sin(angle)


def smear_keys(k_BxLxHxK: jax.Array, positions_BxL: jax.Array, s_H: jax.Array,
               first_Bx1xHxK: jax.Array | None = None) -> jax.Array:
    """k_j + s * (k_{j-1} - k_j) per head where position j > 0; `first` stands in for the key
    before the row's first (default: that key itself, i.e. no mixing)."""
    first = k_BxLxHxK[:, :1] if first_Bx1xHxK is None else first_Bx1xHxK
    prev = jnp.concatenate([first, k_BxLxHxK[:, :-1]], axis=1)
    prev = jnp.where((positions_BxL > 0)[..., None, None], prev, k_BxLxHxK)
    return k_BxLxHxK + s_H[:, None].astype(k_BxLxHxK.dtype) * (prev - k_BxLxHxK)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, cache=None, cache_index=None):
        cfg = self.cfg
        H, K = cfg.n_heads, cfg.head_dim
        # Separate q/k/v matrices: slicing one fused output costs XLA:CPU a pad+add per
        # slice in the backward pass (measured in benchmarks/RESULTS.md).
        w_DxHxK = [_param(self, name, (cfg.d_model, H, K), ("embed", "heads", "kv"),
                          cfg.init_std).astype(x_BxLxD.dtype) for name in ("q", "k", "v")]
        if _use_dense_vjps(cfg.dense_grads):
            B, L, D = x_BxLxD.shape
            q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = (
                y.reshape(B, L, H, K) for y in dense.project(
                    x_BxLxD.reshape(B * L, D), tuple(w.reshape(D, H * K) for w in w_DxHxK)))
        else:
            q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = (
                jnp.einsum("BLD,DHK->BLHK", x_BxLxD, w) for w in w_DxHxK)
        new_cache = None
        smear_H = None
        if cfg.smear_keys:
            gate_init = nn.with_logical_partitioning(nn.initializers.zeros, ("heads",))
            smear_H = jax.nn.sigmoid(self.param("smear_gate", gate_init, (H,), jnp.float32))
        L = x_BxLxD.shape[1]
        if cache is None and _use_cpu_kernel(cfg.attention_kernel, q_BxLxHxK):
            # The kernel smears the keys and applies RoPE itself.
            cos_PxK2, sin_PxK2 = rope_tables(max(cfg.max_len, L), K, cfg.rope_theta)
            out_BxLxHxK = cpu_attention.attention(
                q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, positions_BxL, segment_ids_BxL, cos_PxK2,
                sin_PxK2, jnp.zeros((H,)) if smear_H is None else smear_H)
            return self._output(out_BxLxHxK), None
        if cfg.smear_keys:
            k_BxLxHxK, last_k = self._smear(k_BxLxHxK, positions_BxL, segment_ids_BxL, cache,
                                            smear_H)
        q_BxLxHxK = rope(q_BxLxHxK, positions_BxL, cfg.rope_theta)
        k_BxLxHxK = rope(k_BxLxHxK, positions_BxL, cfg.rope_theta)
        if cache is None:
            k_pos, k_seg = positions_BxL, segment_ids_BxL
            keys, values = k_BxLxHxK.transpose(0, 2, 1, 3), v_BxLxHxK.transpose(0, 2, 1, 3)
        else:
            # Keys/values are cached heads-major (B, H, S, K): the layout both attention
            # einsums read directly, so a decode step does not relayout the whole cache.
            update = lambda c, new, axis=1: jax.lax.dynamic_update_slice_in_dim(
                c, new.astype(c.dtype), cache_index, axis=axis)
            new_cache = {"k": update(cache["k"], k_BxLxHxK.transpose(0, 2, 1, 3), 2),
                         "v": update(cache["v"], v_BxLxHxK.transpose(0, 2, 1, 3), 2),
                         "pos": update(cache["pos"], positions_BxL),
                         "seg": update(cache["seg"], segment_ids_BxL)}
            if cfg.smear_keys:
                new_cache["last_raw_k"] = last_k
            k_pos, k_seg, keys, values = (new_cache["pos"], new_cache["seg"], new_cache["k"],
                                          new_cache["v"])
        block = cfg.attention_block
        if cache is None and 0 < block < L:
            out_BxLxHxK = blocked_attention(q_BxLxHxK, keys, values, positions_BxL,
                                            segment_ids_BxL, block)
        else:
            out_BxLxHxK = dense_attention(q_BxLxHxK, keys, values, positions_BxL,
                                          segment_ids_BxL, k_pos, k_seg)
        return self._output(out_BxLxHxK), new_cache

    def _output(self, out_BxLxHxK):
        cfg = self.cfg
        w_out = _param(self, "out", (cfg.n_heads, cfg.head_dim, cfg.d_model),
                       ("heads", "kv", "embed"), cfg.init_std)
        return jnp.einsum("BLHK,HKD->BLD", out_BxLxHxK, w_out.astype(out_BxLxHxK.dtype))

    def _smear(self, k_BxLxHxK, positions_BxL, segment_ids_BxL, cache, s_H):
        """Mixes each raw key with the previous token's (by `s_H` per head): a one-layer shortcut
        for copying."""
        first = None if cache is None else cache["last_raw_k"][:, None]
        smeared = smear_keys(k_BxLxHxK, positions_BxL, s_H, first)
        # The raw key of each row's last real token seeds the next decode step.
        last = jnp.maximum((segment_ids_BxL > 0).sum(1) - 1, 0)
        last_k = jnp.take_along_axis(k_BxLxHxK, last[:, None, None, None], axis=1)[:, 0]
        if cache is not None:
            any_real = (segment_ids_BxL > 0).any(1)[:, None, None]
            last_k = jnp.where(any_real, last_k, cache["last_raw_k"])
        return smeared, last_k


def _use_kernel(choice: str, knob: str, supported: bool, needs: str) -> bool:
    """Whether a C++ kernel runs, by the config field `knob` = `choice`: "xla" never, "cpu"
    always (a one-line error where it cannot; `needs` says what it needs), "auto" on one CPU
    device where `supported` and the kernels build."""
    if choice == "xla":
        return False
    if choice == "cpu":
        if jax.default_backend() != "cpu":
            raise ValueError(f"{knob}='cpu' runs on CPU only; the default backend is "
                             f"{jax.default_backend()} (use 'auto' or 'xla')")
        cpu_kernels.require()
        if not supported:
            raise ValueError(f"{knob}='cpu' needs {needs}")
        return True
    return _one_cpu_device() and supported and cpu_kernels.available()


def _use_cpu_kernel(choice: str, q_BxLxHxK: jax.Array) -> bool:
    """Whether training attention runs through the C++ kernel (see `attention_kernel`)."""
    return _use_kernel(choice, "attention_kernel", cpu_attention.supports(q_BxLxHxK),
                       f"float32 activations and a head dim in {cpu_attention.HEAD_DIMS}, got "
                       f"{q_BxLxHxK.dtype} and {q_BxLxHxK.shape[-1]}")


def _use_norm_kernel(choice: str, x: jax.Array) -> bool:
    """Whether an RMSNorm runs through the C++ kernel (see `norm_kernel`)."""
    return _use_kernel(choice, "norm_kernel", cpu_norm.supports(x),
                       f"d_model a multiple of {cpu_norm.LANES}, got {x.shape[-1]}")


def _use_mlp_kernel(choice: str, x: jax.Array) -> bool:
    """Whether dense.swiglu's elementwise part runs through the C++ kernel (see `mlp_kernel`)."""
    return _use_kernel(choice, "mlp_kernel", x.dtype == jnp.float32,
                       f"float32 activations, got {x.dtype}")


def _use_dense_vjps(choice: str) -> bool:
    """Whether the dense layers differentiate through lm/dense.py (see `dense_grads`)."""
    return choice == "cpu" or (choice == "auto" and _one_cpu_device())


def _one_cpu_device() -> bool:
    """Whether the step runs on a single CPU device (the current mesh's, or all devices)."""
    mesh = jax.sharding.get_abstract_mesh()
    devices = jax.device_count() if mesh.empty else mesh.size
    return jax.default_backend() == "cpu" and devices == 1


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD):
        cfg = self.cfg
        B, L, D = x_BxLxD.shape
        # Rows flattened to 2-D: with 3-D einsums XLA:CPU materialised a column-order copy of
        # the SwiGLU gradient for every weight-gradient matmul (benchmarks/RESULTS.md).
        x_NxD = x_BxLxD.reshape(B * L, D)
        w_gate_DxF, w_up_DxF = (
            _param(self, name, (D, cfg.mlp_dim), ("embed", "mlp"), cfg.init_std
                   ).astype(x_NxD.dtype) for name in ("w_gate", "w_up"))
        w_out_FxD = _param(self, "wo", (cfg.mlp_dim, D), ("mlp", "embed"), cfg.init_std
                           ).astype(x_NxD.dtype)
        if _use_dense_vjps(cfg.dense_grads):
            return dense.swiglu(x_NxD, w_gate_DxF, w_up_DxF, w_out_FxD,
                                _use_mlp_kernel(cfg.mlp_kernel, x_NxD)).reshape(B, L, D)
        h_NxF = jax.nn.silu(x_NxD @ w_gate_DxF) * (x_NxD @ w_up_DxF)
        return (h_NxF @ w_out_FxD).reshape(B, L, D)


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, cache=None, cache_index=None):
        h, new_cache = Attention(self.cfg, name="attn")(
            Norm(self.cfg.norm, self.cfg.norm_kernel, name="attn_norm")(x_BxLxD), positions_BxL,
            segment_ids_BxL, cache, cache_index)
        x_BxLxD = x_BxLxD + h
        x_BxLxD = x_BxLxD + MLP(self.cfg, name="mlp")(
            Norm(self.cfg.norm, self.cfg.norm_kernel, name="mlp_norm")(x_BxLxD))
        return nn.with_logical_constraint(x_BxLxD, ("batch", "length", "act_embed")), new_cache


class Transformer(nn.Module):
    """`__call__(tokens, positions, segment_ids, cache=None, cache_index=None)` returns
    `(logits_BxLxV float32, new_cache)`; `new_cache` is None without a cache."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BxL, positions_BxL, segment_ids_BxL, cache: Cache | None = None,
                 cache_index: Any = None):
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        embedding = _param(self, "embedding", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                           cfg.init_std)
        x_BxLxD = jnp.take(embedding, tokens_BxL, axis=0).astype(dtype)
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "act_embed"))
        block = nn.remat(Block) if cfg.remat else Block
        new_cache = []
        for i in range(cfg.n_layers):
            x_BxLxD, layer_cache = block(cfg, name=f"block_{i}")(
                x_BxLxD, positions_BxL, segment_ids_BxL,
                None if cache is None else cache[i], cache_index)
            new_cache.append(layer_cache)
        x_BxLxD = Norm(cfg.norm, cfg.norm_kernel, name="final_norm")(x_BxLxD)
        if cfg.tied_embeddings:
            logits = jnp.einsum("BLD,VD->BLV", x_BxLxD, embedding.astype(dtype))
        else:
            unembed = _param(self, "unembed", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                             cfg.init_std)
            logits = jnp.einsum("BLD,DV->BLV", x_BxLxD, unembed.astype(dtype))
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        return logits.astype(jnp.float32), (None if cache is None else new_cache)


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype=jnp.float32) -> Cache:
    """Empty per-layer KV cache; slots with segment 0 are never attended to."""
    shape = (batch_size, cfg.n_heads, max_len, cfg.head_dim)  # heads-major, see Attention
    layer = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
             "pos": jnp.zeros((batch_size, max_len), jnp.int32),
             "seg": jnp.zeros((batch_size, max_len), jnp.int32)}
    if cfg.smear_keys:
        layer["last_raw_k"] = jnp.zeros((batch_size, cfg.n_heads, cfg.head_dim), dtype)
    return [dict(layer) for _ in range(cfg.n_layers)]


def param_count(params: Any) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
