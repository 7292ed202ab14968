"""The PyTorch reference model: masking, smeared keys, parity with the JAX model, FLOP count."""

from __future__ import annotations

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flax import linen as nn  # noqa: E402

from benchmarks.torch_reference import TorchLM, param_count, time_train_steps  # noqa: E402
from echo_jax.lm.model import ModelConfig, Transformer  # noqa: E402
from echo_jax.lm.pretrain import flops_per_token  # noqa: E402

SMALL = dict(d_model=16, n_layers=2, n_heads=2, mlp_dim=32, vocab_size=23)


def packed_row() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row: a 6-token example, a 4-token example, then 2 padding tokens."""
    tokens = torch.randint(SMALL["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 0, 0]])
    segment_ids = torch.tensor([[1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0]])
    return tokens, positions, segment_ids


def make_model(seed: int = 0, **overrides) -> TorchLM:
    torch.manual_seed(seed)
    return TorchLM(**{**SMALL, **overrides})


@pytest.mark.parametrize("smear_keys", [False, True])
def test_causal_and_segment_masking(smear_keys):
    model = make_model(smear_keys=smear_keys)
    if smear_keys:  # open the gates so a leak through the smeared keys would show
        for block in model.blocks:
            block.attn.smear_gate.data.fill_(2.0)
    tokens, positions, segment_ids = packed_row()
    with torch.no_grad():
        base = model(tokens, positions, segment_ids)
        for changed, unchanged in [(3, [0, 1, 2, 6, 7, 8, 9]), (7, [0, 1, 2, 3, 4, 5, 6])]:
            edited = tokens.clone()
            edited[0, changed] = (edited[0, changed] + 1) % SMALL["vocab_size"]
            out = model(edited, positions, segment_ids)
            torch.testing.assert_close(out[0, unchanged], base[0, unchanged], rtol=0, atol=0)
            assert not torch.allclose(out[0, changed], base[0, changed])


def test_closed_smear_gate_equals_plain_model():
    plain, smeared = make_model(), make_model(seed=1, smear_keys=True)
    missing, unexpected = smeared.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(name.endswith("smear_gate") for name in missing)
    tokens, positions, segment_ids = packed_row()
    with torch.no_grad():
        for block in smeared.blocks:
            block.attn.smear_gate.fill_(-float("inf"))
        torch.testing.assert_close(
            smeared(tokens, positions, segment_ids),
            plain(tokens, positions, segment_ids),
            rtol=0,
            atol=0,
        )
        for block in smeared.blocks:
            block.attn.smear_gate.fill_(2.0)
        assert not torch.allclose(
            smeared(tokens, positions, segment_ids), plain(tokens, positions, segment_ids)
        )


def test_param_count_by_hand():
    D, Lyr, F, V = SMALL["d_model"], SMALL["n_layers"], SMALL["mlp_dim"], SMALL["vocab_size"]
    per_layer = 4 * D * D + 3 * D * F + 2 * D  # attention, SwiGLU, two RMSNorm scales
    assert param_count(make_model()) == V * D + Lyr * per_layer + D
    untied_layernorm = make_model(tied=False, norm="layernorm")
    assert param_count(untied_layernorm) == 2 * V * D + Lyr * (per_layer - 2 * D)


def torch_from_jax(params: dict, cfg: ModelConfig) -> TorchLM:
    """A TorchLM holding the JAX model's weights (q/k/v and gate/up fused into one matrix)."""
    model = TorchLM(
        cfg.d_model,
        cfg.n_layers,
        cfg.n_heads,
        cfg.mlp_dim,
        cfg.vocab_size,
        cfg.norm,
        cfg.tied_embeddings,
        cfg.smear_keys,
    )
    p = jax.tree.map(lambda x: torch.from_numpy(np.array(x)), params)
    state = {"embedding": p["embedding"]}
    if cfg.norm == "rms":
        state["final_norm.scale"] = p["final_norm"]["scale"]
    if not cfg.tied_embeddings:
        state["unembed"] = p["unembed"]
    for i in range(cfg.n_layers):
        block, prefix = p[f"block_{i}"], f"blocks.{i}."
        attn, mlp = block["attn"], block["mlp"]
        qkv = torch.stack([attn["q"], attn["k"], attn["v"]], dim=1)  # D 3 H K
        state[prefix + "attn.w_qkv"] = qkv.reshape(cfg.d_model, -1)
        state[prefix + "attn.w_out"] = attn["out"].reshape(-1, cfg.d_model)
        state[prefix + "w_in"] = torch.cat([mlp["w_gate"], mlp["w_up"]], dim=-1)
        state[prefix + "w_down"] = mlp["wo"]
        if cfg.smear_keys:
            state[prefix + "attn.smear_gate"] = attn["smear_gate"]
        if cfg.norm == "rms":
            state[prefix + "attn_norm.scale"] = block["attn_norm"]["scale"]
            state[prefix + "mlp_norm.scale"] = block["mlp_norm"]["scale"]
    model.load_state_dict(state, strict=True)
    return model


@pytest.mark.parametrize(
    "norm,tied,smear_keys", [("rms", True, False), ("layernorm", False, True), ("rms", True, True)]
)
def test_matches_jax_model(norm, tied, smear_keys):
    cfg = ModelConfig(max_len=12, norm=norm, tied_embeddings=tied, smear_keys=smear_keys, **SMALL)
    tokens, positions, segment_ids = packed_row()
    jax_model = Transformer(cfg)
    params = nn.unbox(
        jax_model.init(jax.random.key(0), tokens.numpy(), positions.numpy(), segment_ids.numpy())[
            "params"
        ]
    )
    # Open the smear gates (initialised at 0) so that the test sees them at work.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: np.asarray(x) + (1.5 if path[-1].key == "smear_gate" else 0.0), params
    )
    model = torch_from_jax(params, cfg)
    jax_logits, _ = jax_model.apply(
        {"params": params}, tokens.numpy(), positions.numpy(), segment_ids.numpy()
    )
    with torch.no_grad():
        torch_logits = model(tokens, positions, segment_ids)
    real = segment_ids[0] > 0  # padding rows differ by design (see attention_mask)
    np.testing.assert_allclose(
        torch_logits[0, real].numpy(), np.asarray(jax_logits)[0, real], rtol=1e-4, atol=1e-5
    )


def test_time_train_steps_reports_throughput():
    result = time_train_steps(SMALL, batch_size=2, seq_len=8, steps=1, warmup=1)
    assert result["tokens_per_s"] > 0
    assert result["step_s"] == pytest.approx(16 / result["tokens_per_s"])


def test_train_flops_by_hand():
    # d=4, 2 layers, mlp 8, vocab 10, seq 3:
    # matmul params = 2 * (4 * 16 + 3 * 4 * 8) + 4 * 10 = 360 -> 6 * 360 = 2160;
    # attention = 6 * 2 * 2 layers * 3 tokens * 4 = 288.
    cfg = ModelConfig(vocab_size=10, d_model=4, n_layers=2, n_heads=2, mlp_dim=8, max_len=3)
    flops = flops_per_token(cfg, seq_len=3)
    assert flops == 2160 + 288
