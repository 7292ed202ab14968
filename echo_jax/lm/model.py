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

from echo_jax.core.config import ConfigError
from echo_jax.lm.attention import dense_attention, rope, smear_keys
from echo_jax.lm.cpu import ops

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
    norm_eps: float = ops.NORM_EPS  # inside the rsqrt of both norms (OLMo 1e-5, Llama: its config)
    n_kv_heads: int = 0  # key/value heads (grouped-query attention, as Llama); 0: n_heads
    clip_qkv: float = 0.0  # clamp the q, k, v projections to [-clip_qkv, clip_qkv] (OLMo); 0: off
    tied_embeddings: bool = True
    smear_keys: bool = False
    rope_theta: float = 10_000.0
    init_std: float = 0.02
    dtype: str = "float32"
    remat: bool = False
    # Query block size of causal attention in training (no cache); 0 = one dense [L, L] block.
    # Blocks skip the fully-masked upper triangle (see `blocked_attention`).
    attention_block: int = 0
    # How the ops run, not what they compute (lm/cpu/ops.py; not in checkpoints): "auto" takes
    # lm/cpu's speed paths on a one-device CPU step, "xla" never; `kernel_overrides` sets single
    # ops, e.g. (("attention", "xla"),).
    kernels: str = "auto"
    kernel_overrides: tuple[tuple[str, str], ...] = ()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_kv_heads < 0 or self.n_heads % self.kv_heads:
            raise ConfigError(
                f"n_kv_heads must be 0 or divide n_heads {self.n_heads}, got {self.n_kv_heads}"
            )
        if self.clip_qkv < 0 or self.norm_eps <= 0:
            raise ConfigError(
                f"need clip_qkv >= 0 and norm_eps > 0, got {self.clip_qkv} and {self.norm_eps}"
            )
        if self.norm not in ("rms", "layernorm"):
            raise ConfigError(f"norm must be 'rms' or 'layernorm', got {self.norm!r}")
        if self.attention_block < 0:
            raise ConfigError(f"attention_block must be >= 0, got {self.attention_block}")
        ops.check_choices(self.kernels, self.kernel_overrides)


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple, std: float):
    init = nn.with_logical_partitioning(nn.initializers.normal(std), axes)
    return module.param(name, init, shape, jnp.float32)


class Norm(nn.Module):
    """`cfg.norm` over the last dim, computed in float32: "rms" with a learned scale, or
    "layernorm" (centred, no parameters)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        x = x_BxLxD.astype(jnp.float32)
        scale = None
        if self.cfg.norm == "layernorm":
            x = x - x.mean(-1, keepdims=True)
        else:
            init = nn.with_logical_partitioning(nn.initializers.ones, ("norm",))
            scale = self.param("scale", init, (x.shape[-1],), jnp.float32)
        return ops.rms_norm(self.cfg, x, scale).astype(x_BxLxD.dtype)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, cache=None, cache_index=None):
        cfg = self.cfg
        H, K = cfg.n_heads, cfg.head_dim
        # Separate q/k/v matrices: slicing one fused output costs XLA:CPU a pad+add per
        # slice in the backward pass (measured in benchmarks/RESULTS.md).
        w_DxHxK = [
            _param(
                self, name, (cfg.d_model, heads, K), ("embed", "heads", "kv"), cfg.init_std
            ).astype(x_BxLxD.dtype)
            for name, heads in (("q", H), ("k", cfg.kv_heads), ("v", cfg.kv_heads))
        ]
        q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = self._grouped(ops.project_qkv(cfg, x_BxLxD, w_DxHxK))
        smear_H = None
        if cfg.smear_keys:
            gate_init = nn.with_logical_partitioning(nn.initializers.zeros, ("heads",))
            smear_H = jax.nn.sigmoid(self.param("smear_gate", gate_init, (H,), jnp.float32))
        if cache is None:
            return self._output(
                ops.attention(
                    cfg, q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, positions_BxL, segment_ids_BxL, smear_H
                )
            ), None
        if cfg.smear_keys:
            k_BxLxHxK, last_k = self._smear(
                k_BxLxHxK, positions_BxL, segment_ids_BxL, cache, smear_H
            )
        q_BxLxHxK = rope(q_BxLxHxK, positions_BxL, cfg.rope_theta)
        k_BxLxHxK = rope(k_BxLxHxK, positions_BxL, cfg.rope_theta)
        # Keys/values are cached heads-major (B, H, S, K): the layout both attention einsums read
        # directly, so a decode step does not relayout the whole cache.
        update = lambda c, new, axis=1: jax.lax.dynamic_update_slice_in_dim(
            c, new.astype(c.dtype), cache_index, axis=axis
        )
        new_cache = {
            "k": update(cache["k"], k_BxLxHxK.transpose(0, 2, 1, 3), 2),
            "v": update(cache["v"], v_BxLxHxK.transpose(0, 2, 1, 3), 2),
            "pos": update(cache["pos"], positions_BxL),
            "seg": update(cache["seg"], segment_ids_BxL),
        }
        if cfg.smear_keys:
            new_cache["last_raw_k"] = last_k
        out_BxLxHxK = dense_attention(
            q_BxLxHxK,
            new_cache["k"],
            new_cache["v"],
            positions_BxL,
            segment_ids_BxL,
            new_cache["pos"],
            new_cache["seg"],
        )
        return self._output(out_BxLxHxK), new_cache

    def _grouped(self, qkv: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        """OLMo's clamp of the projections, then each key/value head repeated for its group of
        query heads (query head h reads key head h // group, as `transformers`' `repeat_kv`)."""
        cfg = self.cfg
        if cfg.clip_qkv:
            qkv = tuple(jnp.clip(x, -cfg.clip_qkv, cfg.clip_qkv) for x in qkv)
        group = cfg.n_heads // cfg.kv_heads
        if group == 1:
            return qkv
        q, k, v = qkv
        return q, jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)

    def _output(self, out_BxLxHxK):
        cfg = self.cfg
        w_out = _param(
            self,
            "out",
            (cfg.n_heads, cfg.head_dim, cfg.d_model),
            ("heads", "kv", "embed"),
            cfg.init_std,
        )
        return jnp.einsum("BLHK,HKD->BLD", out_BxLxHxK, w_out.astype(out_BxLxHxK.dtype))

    def _smear(self, k_BxLxHxK, positions_BxL, segment_ids_BxL, cache, s_H):
        """Mixes each raw key with the previous token's (by `s_H` per head): a one-layer shortcut
        for copying. Returns the smeared keys and, for the cache, the raw key of each row's last
        real token (the previous key of the next decode step's first)."""
        smeared = smear_keys(k_BxLxHxK, positions_BxL, s_H, cache["last_raw_k"][:, None])
        last = jnp.maximum((segment_ids_BxL > 0).sum(1) - 1, 0)
        last_k = jnp.take_along_axis(k_BxLxHxK, last[:, None, None, None], axis=1)[:, 0]
        any_real = (segment_ids_BxL > 0).any(1)[:, None, None]
        return smeared, jnp.where(any_real, last_k, cache["last_raw_k"])


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
            _param(self, name, (D, cfg.mlp_dim), ("embed", "mlp"), cfg.init_std).astype(x_NxD.dtype)
            for name in ("w_gate", "w_up")
        )
        w_out_FxD = _param(self, "wo", (cfg.mlp_dim, D), ("mlp", "embed"), cfg.init_std).astype(
            x_NxD.dtype
        )
        return ops.swiglu_mlp(cfg, x_NxD, w_gate_DxF, w_up_DxF, w_out_FxD).reshape(B, L, D)


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, cache=None, cache_index=None):
        h, new_cache = Attention(self.cfg, name="attn")(
            Norm(self.cfg, name="attn_norm")(x_BxLxD),
            positions_BxL,
            segment_ids_BxL,
            cache,
            cache_index,
        )
        x_BxLxD = x_BxLxD + h
        x_BxLxD = x_BxLxD + MLP(self.cfg, name="mlp")(Norm(self.cfg, name="mlp_norm")(x_BxLxD))
        return nn.with_logical_constraint(x_BxLxD, ("batch", "length", "act_embed")), new_cache


class Transformer(nn.Module):
    """`__call__(tokens, positions, segment_ids, cache=None, cache_index=None)` returns
    `(logits_BxLxV float32, new_cache)`; `new_cache` is None without a cache."""

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens_BxL,
        positions_BxL,
        segment_ids_BxL,
        cache: Cache | None = None,
        cache_index: Any = None,
    ):
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        embedding = _param(
            self, "embedding", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std
        )
        x_BxLxD = jnp.take(embedding, tokens_BxL, axis=0).astype(dtype)
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "act_embed"))
        block = nn.remat(Block) if cfg.remat else Block
        new_cache = []
        for i in range(cfg.n_layers):
            x_BxLxD, layer_cache = block(cfg, name=f"block_{i}")(
                x_BxLxD,
                positions_BxL,
                segment_ids_BxL,
                None if cache is None else cache[i],
                cache_index,
            )
            new_cache.append(layer_cache)
        x_BxLxD = Norm(cfg, name="final_norm")(x_BxLxD)
        if cfg.tied_embeddings:
            logits = jnp.einsum("BLD,VD->BLV", x_BxLxD, embedding.astype(dtype))
        else:
            unembed = _param(
                self, "unembed", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std
            )
            logits = jnp.einsum("BLD,DV->BLV", x_BxLxD, unembed.astype(dtype))
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        return logits.astype(jnp.float32), (None if cache is None else new_cache)


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype=jnp.float32) -> Cache:
    """Empty per-layer KV cache; slots with segment 0 are never attended to."""
    shape = (batch_size, cfg.n_heads, max_len, cfg.head_dim)  # heads-major, see Attention
    layer = {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "pos": jnp.zeros((batch_size, max_len), jnp.int32),
        "seg": jnp.zeros((batch_size, max_len), jnp.int32),
    }
    if cfg.smear_keys:
        layer["last_raw_k"] = jnp.zeros((batch_size, cfg.n_heads, cfg.head_dim), dtype)
    return [dict(layer) for _ in range(cfg.n_layers)]


def config_meta(cfg: ModelConfig) -> dict:
    """What a checkpoint records of the model, for every job: `{"model": fields}` without
    `kernels` and `kernel_overrides`, which choose how the step runs, not what it computes, so a
    resume or a restore may pick others."""
    meta = dataclasses.asdict(cfg)
    del meta["kernels"], meta["kernel_overrides"]
    for name, default in _LATER_FIELDS.items():  # so checkpoints saved before them still resume
        if meta[name] == default:
            del meta[name]
    return {"model": meta}


# fields added after checkpoints existed (Hugging Face models): recorded only when not default
_LATER_FIELDS = {"norm_eps": ops.NORM_EPS, "n_kv_heads": 0, "clip_qkv": 0.0}


def param_count(params: Any) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
