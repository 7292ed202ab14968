"""The source-bias study's settings as options: no item-side parameters, its padded-mean pooling,
one negative drawn per row and step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from echo_jax.core.config import ConfigError, load_config
from echo_jax.recsys import text_encoder
from echo_jax.recsys.jobs.train import run_train
from echo_jax.recsys.model import ModelConfig, Recommender
from echo_jax.recsys.train import sample_negatives
from tests.recsys.test_train import REPO, TINY


def test_one_drawn_negative_keeps_the_positive_first_and_covers_every_other_candidate():
    candidates = jnp.tile(jnp.arange(5), (400, 1)) + 10 * jnp.arange(400)[:, None]
    labels = jnp.zeros((400, 5)).at[:, 2].set(1.0)  # the positive is the third shown
    batch = {"candidates": candidates, "labels": labels, "history": jnp.zeros((400, 3))}
    out = sample_negatives(jax.random.key(0), batch, 1)
    assert out["candidates"].shape == (400, 2) and out["history"].shape == (400, 3)
    np.testing.assert_array_equal(out["labels"][:, 0], 1.0)
    np.testing.assert_array_equal(out["candidates"][:, 0], candidates[:, 2])
    drawn = np.asarray(out["candidates"][:, 1] - 10 * jnp.arange(400))
    counts = np.bincount(drawn, minlength=5)
    assert counts[2] == 0 and all(counts[j] > 70 for j in (0, 1, 3, 4))  # ~100 each
    two = sample_negatives(jax.random.key(1), batch, 2)["candidates"][:, 1:]
    assert bool((two[:, 0] != two[:, 1]).all())  # without replacement


def test_without_item_projection_the_score_is_a_dot_product_with_the_frozen_vector():
    cfg = ModelConfig(user_encoder="mean", item_tower="minilm", dim=12, item_projection=False)
    model = Recommender(cfg)
    feats = jax.random.normal(jax.random.key(0), (2, 7, 12))
    hist, cand, mask = feats[:, :4], feats[:, 4:], jnp.ones((2, 4), bool)
    variables = model.init(jax.random.key(0), hist, mask, cand)
    assert "params" not in variables  # no item-side parameters (and the mean has none)
    scores = model.apply(variables, hist, mask, cand)
    np.testing.assert_allclose(scores, jnp.einsum("bd,bcd->bc", hist.mean(1), cand), rtol=1e-5)


def test_padded_mean_pooling_is_the_mean_over_the_studys_100_positions(minilm_dir):
    texts = ["a short one", "gentle cleanser " * 80]  # the second is cut to 100 tokens
    pooled = text_encoder.embed_texts(texts, minilm_dir, pooling="padded_mean")
    module, params, tokenizer = text_encoder.load_minilm(minilm_dir)
    for text, vector in zip(texts, pooled):
        ids = tokenizer.encode(text).ids
        ids = ids if len(ids) <= 100 else [*ids[:99], ids[-1]]
        row = np.zeros((1, 100), np.int32)
        row[0, : len(ids)] = ids
        hidden = module.apply(params, row, (row > 0).astype(np.int32))
        np.testing.assert_allclose(vector, np.asarray(hidden)[0].mean(0), atol=1e-5)
    assert abs(np.linalg.norm(pooled[0]) - 1.0) > 0.01  # not normalised
    with pytest.raises(ValueError, match="pooling"):
        text_encoder.embed_texts(texts, minilm_dir, pooling="max")


def test_the_study_settings_train_and_a_width_mismatch_is_one_error(tmp_path, minilm_dir):
    def config(*extra):
        return load_config(
            f"{REPO}/configs/recsys.py:controlled",
            [
                *TINY,
                "model.item_tower=minilm",
                "model.item_projection=False",
                "model.pooling=padded_mean",
                "train.negatives=1",
                "train.num_steps=10",
                "train.checkpoint_every=10",
                "train.eval_every=10",
                f"model.minilm_dir={minilm_dir}",
                f"model.cache_dir={tmp_path / 'cache'}",
                *extra,
            ],
        )

    result = run_train(
        config("model.dim=384", "model.user_encoder=sasrec"), str(tmp_path / "study")
    )
    assert np.isfinite(result["eval/ndcg@5"])
    with pytest.raises(ConfigError, match="model.dim must be the item vectors' width 384"):
        run_train(config(), str(tmp_path / "narrow"))
    with pytest.raises(ConfigError, match=r"train.negatives must be in \[0, 4\]"):
        run_train(config("model.dim=384", "train.negatives=5"), str(tmp_path / "many"))
