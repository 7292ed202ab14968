"""Frozen item vectors, computed once per distinct text list and cached on disk.

A frozen text tower gives every text the same vector in every epoch, so re-encoding per epoch
(as the study's PyTorch code does) only costs time. Vectors are stored as `.npy` files named by
a hash of the encoder's identity and the exact texts, so a changed text or model misses the
cache instead of reading stale vectors.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from echo_jax.recsys.text_encoder import MAX_SEQ_LEN, embed_texts


def cache_key(texts: Sequence[str], encoder_id: str) -> str:
    digest = hashlib.sha256(encoder_id.encode("utf-8"))
    for text in texts:
        digest.update(b"\0" + text.encode("utf-8"))
    return digest.hexdigest()[:20]


def cached_vectors(
    texts: Sequence[str],
    encoder_id: str,
    cache_dir: str | os.PathLike,
    encode: Callable[[list[str]], np.ndarray],
) -> np.ndarray:
    """`encode(texts)`, read from `cache_dir` when this (encoder, texts) pair was seen before."""
    path = Path(cache_dir) / f"vectors-{cache_key(texts, encoder_id)}.npy"
    if path.is_file():
        return np.load(path)
    vectors = np.asarray(encode(list(texts)), np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, vectors)
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    return vectors


def minilm_vectors(
    texts: Sequence[str],
    model_dir: str | os.PathLike,
    cache_dir: str | os.PathLike,
    pooling: str = "sentence",
) -> np.ndarray:
    """Frozen MiniLM vectors `[len(texts), 384]` pooled as `pooling` says, cached."""
    model_dir = Path(model_dir).resolve()
    weights = model_dir / "model.safetensors"
    stat = weights.stat()
    encoder_id = f"minilm:{model_dir}:{stat.st_size}:{stat.st_mtime_ns}:{MAX_SEQ_LEN}"
    if pooling != "sentence":  # the ids of caches written before poolings were an option
        encoder_id += f":{pooling}"
    return cached_vectors(
        texts, encoder_id, cache_dir, lambda t: embed_texts(t, model_dir, pooling=pooling)
    )
