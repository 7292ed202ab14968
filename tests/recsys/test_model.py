"""User encoders: shapes, causality (BERT4Rec is bidirectional by design), padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from echo_jax.recsys.model import USER_ENCODERS, ModelConfig, Recommender, user_encoder

B, H, D = 3, 6, 16


def _encoder(name):
    cfg = ModelConfig(user_encoder=name, item_tower="minilm", dim=D, history_len=H, dropout=0.0)
    module = user_encoder(cfg)
    x = jax.random.normal(jax.random.key(0), (B, H, D))
    mask = jnp.ones((B, H), bool).at[0, :2].set(False)  # row 0 left-padded
    params = module.init(jax.random.key(1), x, mask, True)
    return (lambda x_, m_: module.apply(params, x_, m_, True)), x, mask


@pytest.mark.parametrize("name", USER_ENCODERS)
def test_causality(name):
    """Changing items after position t changes the states at t only for BERT4Rec."""
    apply, x, mask = _encoder(name)
    h = apply(x, mask)
    assert h.shape == (B, H, D) and bool(jnp.isfinite(h).all())
    t = 3
    x2 = x.at[:, t + 1 :].set(jax.random.normal(jax.random.key(2), (B, H - t - 1, D)))
    h2 = apply(x2, mask)
    real = np.asarray(mask[:, : t + 1])  # padded slots carry no state worth comparing
    unchanged = np.allclose(
        np.asarray(h[:, : t + 1])[real], np.asarray(h2[:, : t + 1])[real], atol=1e-5
    )
    assert unchanged == (name != "bert4rec")
    assert not np.allclose(h[:, -1], h2[:, -1], atol=1e-5)  # the user vector sees the last items


@pytest.mark.parametrize("name", USER_ENCODERS)
def test_padded_slots_are_ignored(name):
    apply, x, mask = _encoder(name)
    noisy = x.at[0, :2].set(100.0)  # content of padded slots must not matter
    np.testing.assert_allclose(apply(x, mask)[0, -1], apply(noisy, mask)[0, -1], atol=1e-4)


@pytest.mark.parametrize(
    "tower,feats",
    [
        ("minilm", jnp.ones((2, 7, 12), jnp.float32)),
        ("small", jnp.ones((2, 7, 5), jnp.int32)),
    ],
)
def test_recommender_scores_are_dot_products(tower, feats):
    cfg = ModelConfig(item_tower=tower, dim=D, history_len=4, vocab_size=9, max_text_len=5)
    model = Recommender(cfg)
    hist, cand, mask = feats[:, :4], feats[:, 4:], jnp.ones((2, 4), bool)
    params = model.init(jax.random.key(0), hist, mask, cand)
    scores = model.apply(params, hist, mask, cand)
    user = model.apply(params, hist, mask, method=Recommender.encode_user)[:, -1]
    items = model.apply(params, cand.reshape(6, -1), method=Recommender.encode_items)
    np.testing.assert_allclose(
        scores, np.einsum("bd,bcd->bc", user, items.reshape(2, 3, D)), rtol=1e-5, atol=1e-5
    )
