"""Two-tower text recommender: an item text tower and the study's user sequence encoders.

Score = dot(user, item). Items are known only by their text (no ID embeddings), so an item's HGC
and AIGC copies differ only through the text tower. Histories are left-padded: the last position
is always the latest click, and the user vector is the encoder's output there.

Shapes: B batch, H history length, C candidates, N items, F item features (a frozen text vector
of width E, or T token ids), D model width.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from echo_jax.core.config import ConfigError
from echo_jax.recsys.text_encoder import SmallTextEncoder

USER_ENCODERS = ("sasrec", "bert4rec", "gru4rec", "lrurec", "mean")
ITEM_TOWERS = ("minilm", "small")  # frozen MiniLM vectors, or the trainable small encoder


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    user_encoder: str = "sasrec"
    item_tower: str = "small"
    dim: int = 64
    num_layers: int = 1
    num_heads: int = 2
    dropout: float = 0.1
    history_len: int = 10
    vocab_size: int = 0  # small tower only
    text_layers: int = 0  # small tower only: 0 = bag of word embeddings
    max_text_len: int = 32  # small tower only
    # a trainable projection of the item vectors (echo_jax's); False: none, score = dot(user,
    # frozen vector) with the user encoder as wide as the item vectors (the study's)
    item_projection: bool = True

    def __post_init__(self):
        if self.user_encoder not in USER_ENCODERS:
            raise ConfigError(f"model.user_encoder {self.user_encoder!r} not in {USER_ENCODERS}")
        if self.item_tower not in ITEM_TOWERS:
            raise ConfigError(f"model.item_tower {self.item_tower!r} not in {ITEM_TOWERS}")


def _dense(features: int, axes: tuple[str, str], name: str) -> nn.Dense:
    init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes)
    return nn.Dense(features, kernel_init=init, name=name)


class TransformerUserEncoder(nn.Module):
    """SASRec (causal) or BERT4Rec (bidirectional, with the study's output FFN) over histories.

    Both follow the study's RecBole-based code: positional embeddings, LayerNorm and dropout on
    the input, post-LN transformer layers. BERT4Rec is trained with the same impression loss as
    the others (the study uses no cloze task), so only its attention pattern differs.
    """

    cfg: ModelConfig
    causal: bool

    @nn.compact
    def __call__(self, x_BxHxD: jax.Array, mask_BxH: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.cfg
        pos = nn.Embed(cfg.history_len, cfg.dim, name="positions")(jnp.arange(x_BxHxD.shape[1]))
        x = nn.Dropout(cfg.dropout)(nn.LayerNorm(name="ln_in")(x_BxHxD + pos), deterministic)
        attn_mask = nn.make_attention_mask(mask_BxH, mask_BxH)
        if self.causal:
            attn_mask = nn.combine_masks(attn_mask, nn.make_causal_mask(mask_BxH))
        for i in range(cfg.num_layers):
            h = nn.MultiHeadDotProductAttention(
                cfg.num_heads, dropout_rate=cfg.dropout, name=f"attn_{i}"
            )(x, x, mask=attn_mask, deterministic=deterministic)
            x = nn.LayerNorm(name=f"ln_attn_{i}")(x + nn.Dropout(cfg.dropout)(h, deterministic))
            h = _dense(cfg.dim, ("mlp", "embed"), f"mlp_out_{i}")(
                nn.gelu(_dense(2 * cfg.dim, ("embed", "mlp"), f"mlp_in_{i}")(x))
            )
            x = nn.LayerNorm(name=f"ln_mlp_{i}")(x + nn.Dropout(cfg.dropout)(h, deterministic))
        if not self.causal:
            x = nn.LayerNorm(name="ln_out")(nn.gelu(_dense(cfg.dim, ("embed", "mlp"), "out")(x)))
        return x


class GRU4Rec(nn.Module):
    """Stacked GRUs; a padded step leaves the hidden state unchanged."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxHxD: jax.Array, mask_BxH: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.cfg
        x = nn.Dropout(cfg.dropout)(x_BxHxD, deterministic)
        for i in range(cfg.num_layers):
            cell = nn.GRUCell(cfg.dim, name=f"gru_{i}")
            carry = jnp.zeros((x.shape[0], cfg.dim), x.dtype)
            outputs = []
            for t in range(x.shape[1]):
                new, _ = cell(carry, x[:, t])
                carry = jnp.where(mask_BxH[:, t, None], new, carry)
                outputs.append(carry)
            x = jnp.stack(outputs, axis=1)
        return _dense(cfg.dim, ("mlp", "embed"), "out")(x)


class LRULayer(nn.Module):
    """Linear Recurrent Unit (Orvieto et al., 2023) as used by LRURec (Yue et al., 2024).

    h_t = lambda * h_{t-1} + gamma * (B x_t), y_t = Re(C h_t) + D * x_t with a stable diagonal
    complex lambda, computed by an associative (parallel) scan over the sequence.
    """

    dim: int
    r_min: float = 0.8
    r_max: float = 0.99

    @nn.compact
    def __call__(self, x_BxHxD: jax.Array) -> jax.Array:
        d = self.dim

        def nu_init(key, shape):
            u = jax.random.uniform(key, shape)
            return jnp.log(-0.5 * jnp.log(u * (self.r_max**2 - self.r_min**2) + self.r_min**2))

        nu_log = self.param("nu_log", nu_init, (d,))
        theta_log = self.param(
            "theta_log", lambda k, s: jnp.log(jax.random.uniform(k, s) * np.pi / 10), (d,)
        )
        lam = jnp.exp(-jnp.exp(nu_log) + 1j * jnp.exp(theta_log))
        gamma = self.param("gamma_log", lambda k, s: jnp.log(jnp.sqrt(1 - jnp.abs(lam) ** 2)), (d,))
        b_re, b_im, c_re, c_im = (
            self.param(n, nn.initializers.normal(1 / np.sqrt(2 * d)), (d, d))
            for n in ("b_re", "b_im", "c_re", "c_im")
        )
        skip = self.param("d", nn.initializers.normal(1.0), (d,))
        bu = (x_BxHxD @ (b_re + 1j * b_im)) * jnp.exp(gamma)
        lam_BxHxD = jnp.broadcast_to(lam, bu.shape)
        _, h = jax.lax.associative_scan(
            lambda a, b: (a[0] * b[0], b[0] * a[1] + b[1]), (lam_BxHxD, bu), axis=1
        )
        return (h @ (c_re + 1j * c_im)).real + skip * x_BxHxD


class LRURec(nn.Module):
    """LRU layers with residual, LayerNorm and a feed-forward block; padded inputs are zeroed,
    so with left padding the recurrence starts from zero at the first real item."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxHxD: jax.Array, mask_BxH: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.cfg
        x = nn.Dropout(cfg.dropout)(nn.LayerNorm(name="ln_in")(x_BxHxD), deterministic)
        for i in range(cfg.num_layers):
            x = x * mask_BxH[..., None]
            h = LRULayer(cfg.dim, name=f"lru_{i}")(x)
            x = nn.LayerNorm(name=f"ln_lru_{i}")(x + nn.Dropout(cfg.dropout)(h, deterministic))
            h = _dense(cfg.dim, ("mlp", "embed"), f"mlp_out_{i}")(
                nn.gelu(_dense(2 * cfg.dim, ("embed", "mlp"), f"mlp_in_{i}")(x))
            )
            x = nn.LayerNorm(name=f"ln_mlp_{i}")(x + nn.Dropout(cfg.dropout)(h, deterministic))
        return x


class MeanPool(nn.Module):
    """Baseline: the running mean of the history item vectors (no parameters)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxHxD: jax.Array, mask_BxH: jax.Array, deterministic: bool) -> jax.Array:
        m = mask_BxH[..., None].astype(x_BxHxD.dtype)
        return jnp.cumsum(x_BxHxD * m, axis=1) / jnp.maximum(jnp.cumsum(m, axis=1), 1.0)


def user_encoder(cfg: ModelConfig, name: str = "user") -> nn.Module:
    """The user encoder named by `cfg.user_encoder`: `(x_BxHxD, mask_BxH, det) -> h_BxHxD`."""
    if cfg.user_encoder in ("sasrec", "bert4rec"):
        return TransformerUserEncoder(cfg, causal=cfg.user_encoder == "sasrec", name=name)
    return {"gru4rec": GRU4Rec, "lrurec": LRURec, "mean": MeanPool}[cfg.user_encoder](
        cfg, name=name
    )


class ItemTower(nn.Module):
    """Item features -> D: frozen text vectors or the small text encoder, projected unless
    `item_projection` is off."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, feats_NxF: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.cfg
        if cfg.item_tower == "small":
            feats_NxF = SmallTextEncoder(
                cfg.vocab_size,
                cfg.dim,
                cfg.text_layers,
                cfg.num_heads,
                cfg.max_text_len,
                cfg.dropout,
                name="text",
            )(feats_NxF, feats_NxF != 0, deterministic)
        if not cfg.item_projection:
            return feats_NxF.astype(jnp.float32)
        return _dense(cfg.dim, ("embed", "mlp"), "proj")(feats_NxF)


class Recommender(nn.Module):
    """Two towers sharing one item tower for history items and candidates."""

    cfg: ModelConfig

    def setup(self):
        self.items = ItemTower(self.cfg, name="items")
        self.user = user_encoder(self.cfg)

    def encode_items(self, feats_NxF: jax.Array, deterministic: bool = True) -> jax.Array:
        return self.items(feats_NxF, deterministic)

    def encode_user(
        self, hist_BxHxF: jax.Array, mask_BxH: jax.Array, deterministic: bool = True
    ) -> jax.Array:
        """Per-position user states `h_BxHxD`; the user vector is `h[:, -1]`."""
        b, h = mask_BxH.shape
        x = self.items(hist_BxHxF.reshape(b * h, *hist_BxHxF.shape[2:]), deterministic)
        return self.user(x.reshape(b, h, -1), mask_BxH, deterministic)

    def __call__(
        self,
        hist_BxHxF: jax.Array,
        mask_BxH: jax.Array,
        cand_BxCxF: jax.Array,
        deterministic: bool = True,
    ) -> jax.Array:
        """Scores `[B, C]` of every candidate for every user."""
        user_BxD = self.encode_user(hist_BxHxF, mask_BxH, deterministic)[:, -1]
        b, c = cand_BxCxF.shape[:2]
        items = self.items(cand_BxCxF.reshape(b * c, *cand_BxCxF.shape[2:]), deterministic)
        return jnp.einsum("bd,bcd->bc", user_BxD, items.reshape(b, c, -1))
