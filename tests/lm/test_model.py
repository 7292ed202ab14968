"""The transformer: causality, KV cache, blocked == dense attention (and its hand-written
gradient == autodiff), study-scale shapes, and sharded == single-device."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from echo_jax.core import sharding
from echo_jax.core.config import load_config
from echo_jax.core.train_loop import initial_state, jit_train_step
from echo_jax.lm import attention, pretrain, restore
from echo_jax.lm.model import ModelConfig, Transformer, config_meta, init_cache, param_count
from tests.conftest import REPO
from tests.lm.packing import ragged_packed

SMALL = ModelConfig(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, mlp_dim=64, max_len=32, smear_keys=True
)


def _params(cfg=SMALL, seq_len=16):
    dummy = jnp.zeros((1, seq_len), jnp.int32)
    return nn.meta.unbox(
        Transformer(cfg).init(jax.random.key(0), dummy, dummy, dummy + 1)["params"]
    )


def _packed(batch, length, seed=0, vocab=64):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    cut = length // 2  # two examples per row
    positions = np.concatenate([np.arange(cut), np.arange(length - cut)])[None].repeat(batch, 0)
    segments = np.concatenate([np.ones(cut), 2 * np.ones(length - cut)])[None].repeat(batch, 0)
    return tokens, positions.astype(np.int32), segments.astype(np.int32)


def test_causal_and_segment_isolated():
    params, model = _params(), Transformer(SMALL)
    tokens, positions, segments = _packed(2, 16)
    base, _ = model.apply({"params": params}, tokens, positions, segments)
    changed = tokens.copy()
    changed[:, 5] = (changed[:, 5] + 1) % 64  # inside the first example
    out, _ = model.apply({"params": params}, changed, positions, segments)
    np.testing.assert_array_equal(out[:, :5], base[:, :5])  # earlier tokens unaffected
    np.testing.assert_array_equal(out[:, 8:], base[:, 8:])  # the other example unaffected
    assert np.abs(out[:, 5:8] - base[:, 5:8]).max() > 1e-4


# Hugging Face models' options: OLMo's non-parametric LayerNorm, eps and clip, Llama's GQA
HF_LIKE = dataclasses.replace(
    SMALL, smear_keys=False, norm="layernorm", norm_eps=1e-5, clip_qkv=0.5, n_kv_heads=2
)


@pytest.mark.parametrize("cfg", [SMALL, HF_LIKE], ids=["smear", "hf_like"])
def test_kv_cache_matches_full_forward(cfg):
    params, model = _params(cfg), Transformer(cfg)
    tokens, positions, segments = _packed(2, 12, seed=1)
    segments[:] = 1
    positions[:] = np.arange(12)
    full, _ = model.apply({"params": params}, tokens, positions, segments)
    cache = init_cache(cfg, 2, 16)
    logits, cache = model.apply(
        {"params": params},
        tokens[:, :7],
        positions[:, :7],
        segments[:, :7],
        cache=cache,
        cache_index=0,
    )
    steps = [logits]
    for i in range(7, 12):
        logits, cache = model.apply(
            {"params": params},
            tokens[:, i : i + 1],
            positions[:, i : i + 1],
            segments[:, i : i + 1],
            cache=cache,
            cache_index=i,
        )
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, 1), full, atol=1e-5)


def test_grouped_query_attention_is_attention_with_repeated_key_heads():
    gqa = dataclasses.replace(SMALL, smear_keys=False, n_kv_heads=2, clip_qkv=0.3)
    full = dataclasses.replace(gqa, n_kv_heads=0)
    params = _params(gqa)
    assert params["block_0"]["attn"]["k"].shape == (32, 2, 8)
    repeated = jax.tree.map(lambda x: x, params)
    for i in range(2):
        attn = repeated[f"block_{i}"]["attn"]
        attn["k"], attn["v"] = (jnp.repeat(attn[n], 2, axis=1) for n in ("k", "v"))
    tokens, positions, segments = _packed(2, 16, seed=3)
    out, _ = Transformer(gqa).apply({"params": params}, tokens, positions, segments)
    ref, _ = Transformer(full).apply({"params": repeated}, tokens, positions, segments)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    unclipped, _ = Transformer(dataclasses.replace(full, clip_qkv=0.0)).apply(
        {"params": repeated}, tokens, positions, segments
    )
    assert np.abs(unclipped - ref).max() > 1e-3  # the clamp is applied
    assert "n_kv_heads" in config_meta(gqa)["model"]
    assert "n_kv_heads" not in config_meta(SMALL)["model"]  # older checkpoints still match


@pytest.mark.parametrize(
    "block,remat", [(4, False), (8, False), (12, False), (16, False), (8, True)]
)  # 12: a shorter last block of 8
def test_blocked_attention_equals_dense(block, remat):
    dense_cfg = dataclasses.replace(SMALL, max_len=64)
    blocked_cfg = dataclasses.replace(dense_cfg, attention_block=block, remat=remat)
    params = _params(dense_cfg, seq_len=32)
    tokens, positions, segments = ragged_packed(5, 32, seed=block)
    real = segments > 0

    def loss(params, cfg):
        logits, _ = Transformer(cfg).apply({"params": params}, tokens, positions, segments)
        return (jnp.where(real[..., None], logits, 0.0) ** 2).sum(), logits

    (dense_loss, dense), want_grads = jax.value_and_grad(loss, has_aux=True)(params, dense_cfg)
    (loss_, blocked), grads = jax.value_and_grad(loss, has_aux=True)(params, blocked_cfg)
    # Padding queries see no key either way; only real tokens' outputs are defined.
    np.testing.assert_allclose(np.asarray(blocked)[real], np.asarray(dense)[real], atol=1e-5)
    np.testing.assert_allclose(loss_, dense_loss, rtol=1e-5)
    # Summation order differs, so tolerances are float32 roundoff relative to each tensor's scale.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max()),
        grads,
        want_grads,
    )


@pytest.mark.parametrize("block", [4, 6, 8])  # 6: a shorter last block of 4
def test_blocked_attention_gradient_equals_autodiff(block):
    """The hand-written backward pass equals autodiff of the same forward computation, on every
    row (padding rows included) and for a cotangent on every output."""
    _, positions, segments = ragged_packed(3, 16, seed=block)
    q, k, v, cotangent = jax.random.normal(jax.random.key(block), (4, 3, 2, 16, 8))

    def autodiff_path(q, k, v):
        return attention._blocked_forward(q, k, v, positions, segments, block)[0]

    def custom_path(q, k, v):
        return attention._blocked(q, k, v, positions, segments, block)

    out, custom_vjp = jax.vjp(custom_path, q, k, v)
    expected_out, autodiff_vjp = jax.vjp(autodiff_path, q, k, v)
    np.testing.assert_array_equal(out, expected_out)
    for got, want in zip(custom_vjp(cotangent), autodiff_vjp(cotangent)):
        np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())


def test_blocked_attention_falls_back_to_dense():
    """A block as long as the row, or a KV cache, takes the dense path."""
    blocked_cfg = dataclasses.replace(SMALL, attention_block=12)
    params = _params()
    tokens, positions, segments = _packed(2, 12, seed=3)
    dense, _ = Transformer(SMALL).apply({"params": params}, tokens, positions, segments)
    out, _ = Transformer(blocked_cfg).apply({"params": params}, tokens, positions, segments)
    np.testing.assert_array_equal(out, dense)
    cached, _ = Transformer(blocked_cfg).apply(
        {"params": params},
        tokens,
        positions,
        segments,
        cache=init_cache(blocked_cfg, 2, 16),
        cache_index=0,
    )
    np.testing.assert_allclose(cached, dense, atol=1e-5)


@pytest.mark.parametrize("variant,low,high", [("150m", 140e6, 175e6), ("1b", 1.0e9, 1.25e9)])
def test_study_shapes_by_eval_shape(variant, low, high):
    config = load_config(f"{REPO}/configs/lm_pretrain.py:{variant}")
    cfg = pretrain.model_config(config)
    tokens = jax.ShapeDtypeStruct((1, config.data.seq_len), jnp.int32)
    shapes = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens, tokens, tokens)
    params = nn.meta.unbox(shapes["params"])
    assert low < param_count(params) < high
    assert params["block_0"]["attn"]["q"].shape == (cfg.d_model, cfg.n_heads, cfg.head_dim)
    assert ("unembed" in params) == (not cfg.tied_embeddings)
    assert "final_norm" not in params  # OLMo's non-parametric LayerNorm has no weights


def _one_step(mesh_sizes, batch):
    config = load_config(
        f"{REPO}/configs/lm_pretrain.py:tiny",
        [
            "model.d_model=32",
            "model.n_layers=2",
            "model.n_heads=4",
            "model.mlp_dim=64",
            "model.vocab_size=64",
            "data.seq_len=16",
            "model.attention_block=8",
        ],
    )  # the blocked path and its custom gradient
    cfg = pretrain.model_config(config)
    model, tx = Transformer(cfg), pretrain.make_optimizer(config.train)
    from echo_jax.core.train_loop import TrainTask

    task = TrainTask(
        init_state=pretrain.make_init_state(model, tx, 16),
        train_step=pretrain.make_train_step(model, tx),
        train_iter=iter(()),
    )
    mesh = sharding.make_mesh(mesh_sizes, jax.devices()[: int(np.prod(list(mesh_sizes.values())))])
    rules = config.sharding.rules
    state, abstract = initial_state(task, mesh, rules, jax.random.key(0))
    step = jit_train_step(task, mesh, rules, abstract)
    with jax.set_mesh(mesh):
        for _ in range(2):
            state, metrics = step(state, sharding.shard_batch(batch, mesh), jax.random.key(1))
    return jax.device_get((state.params, metrics)), state


def test_sharded_step_equals_single_device():
    tokens, positions, segments = _packed(8, 16, seed=2)
    batch = {
        "inputs": tokens,
        "targets": np.roll(tokens, -1, 1),
        "positions": positions,
        "segment_ids": segments,
        "loss_mask": np.ones_like(tokens, np.float32),
    }
    (ref_params, ref_metrics), _ = _one_step({"data": 1, "fsdp": 1, "tensor": 1}, batch)
    for sizes in ({"data": 4, "fsdp": 2, "tensor": 1}, {"data": 2, "fsdp": 2, "tensor": 2}):
        (params, metrics), state = _one_step(sizes, batch)
        assert len(state.params["block_0"]["mlp"]["w_gate"].sharding.device_set) == 8
        np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params, ref_params
        )


def test_model_meta_of_a_checkpoint_from_before_the_kernels_switch_still_loads():
    """RL checkpoints of session 6 and earlier recorded the four CPU-path choices."""
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, mlp_dim=64, max_len=16)
    old = {
        **config_meta(cfg)["model"],
        "attention_kernel": "auto",
        "dense_grads": "auto",
        "norm_kernel": "auto",
        "mlp_kernel": "auto",
    }
    assert dataclasses.asdict(restore._from_meta(old)) == dataclasses.asdict(cfg)
