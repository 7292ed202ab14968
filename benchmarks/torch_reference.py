"""PyTorch (CPU, eager) twin of `echo_jax.lm.model.Transformer`, for speed comparisons.

The layers follow the JAX model, so both do the same FLOPs at the same shape: RoPE
(rotate-half), packed-sequence masking, SwiGLU, pre-norm, no biases, f32 throughout. The q/k/v
and gate/up projections are each one fused matrix here (one GEMM instead of three or two, same
FLOPs); tests/test_torch_reference.py checks that the logits equal the JAX model's.

Shape legend: B batch, L length, D d_model, H heads, K head dim, F mlp hidden, V vocabulary.
"""

from __future__ import annotations

import math
import os
import time

import torch
from torch import nn
from torch.nn import functional as F

INIT_STD = 0.02
ROPE_THETA = 10_000.0
EPS = 1e-6


def _weight(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) * INIT_STD)


class Norm(nn.Module):
    """RMSNorm with a learned scale, or LayerNorm without scale or bias (as in OLMo)."""

    def __init__(self, d_model: int, kind: str):
        super().__init__()
        if kind not in ("rms", "layernorm"):
            raise ValueError(f"norm must be 'rms' or 'layernorm', got {kind!r}")
        self.kind = kind
        self.scale = nn.Parameter(torch.ones(d_model)) if kind == "rms" else None

    def forward(self, x_BxLxD: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            x_BxLxD = x_BxLxD - x_BxLxD.mean(-1, keepdim=True)
        x_BxLxD = x_BxLxD * torch.rsqrt(x_BxLxD.pow(2).mean(-1, keepdim=True) + EPS)
        return x_BxLxD if self.scale is None else x_BxLxD * self.scale


def rope(x_BxLxHxK: torch.Tensor, positions_BxL: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotate-half convention on pairs (i, i + K/2)."""
    half = x_BxLxHxK.shape[-1] // 2
    freq = ROPE_THETA ** (-torch.arange(half, dtype=torch.float32) / half)
    angle = positions_BxL[..., None, None].float() * freq  # B L 1 K/2
    sin, cos = angle.sin(), angle.cos()
    x1, x2 = x_BxLxHxK[..., :half], x_BxLxHxK[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, smear_keys: bool):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.w_qkv = _weight(d_model, 3 * d_model)
        self.w_out = _weight(d_model, d_model)
        self.smear_gate = nn.Parameter(torch.zeros(n_heads)) if smear_keys else None

    def forward(
        self, x_BxLxD: torch.Tensor, positions_BxL: torch.Tensor, mask_Bx1xLxL: torch.Tensor
    ) -> torch.Tensor:
        B, L, _ = x_BxLxD.shape
        qkv = (x_BxLxD @ self.w_qkv).view(B, L, 3, self.n_heads, self.head_dim)
        q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = qkv.unbind(2)
        if self.smear_gate is not None:
            k_BxLxHxK = self._smear(k_BxLxHxK, positions_BxL)
        q_BxHxLxK = rope(q_BxLxHxK, positions_BxL).transpose(1, 2)
        k_BxHxLxK = rope(k_BxLxHxK, positions_BxL).transpose(1, 2)
        out_BxHxLxK = F.scaled_dot_product_attention(
            q_BxHxLxK, k_BxHxLxK, v_BxLxHxK.transpose(1, 2), attn_mask=mask_Bx1xLxL
        )
        return out_BxHxLxK.transpose(1, 2).reshape(B, L, -1) @ self.w_out

    def _smear(self, k_BxLxHxK: torch.Tensor, positions_BxL: torch.Tensor) -> torch.Tensor:
        """Mixes each raw key with the previous token's, within its segment."""
        s_Hx1 = torch.sigmoid(self.smear_gate)[:, None]
        prev = torch.cat([k_BxLxHxK[:, :1], k_BxLxHxK[:, :-1]], dim=1)
        prev = torch.where((positions_BxL > 0)[..., None, None], prev, k_BxLxHxK)
        return k_BxLxHxK + s_Hx1 * (prev - k_BxLxHxK)


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, mlp_dim: int, norm: str, smear_keys: bool):
        super().__init__()
        self.attn_norm, self.mlp_norm = Norm(d_model, norm), Norm(d_model, norm)
        self.attn = Attention(d_model, n_heads, smear_keys)
        self.w_in = _weight(d_model, 2 * mlp_dim)  # gate and up, fused
        self.w_down = _weight(mlp_dim, d_model)

    def forward(
        self, x_BxLxD: torch.Tensor, positions_BxL: torch.Tensor, mask_Bx1xLxL: torch.Tensor
    ) -> torch.Tensor:
        x_BxLxD = x_BxLxD + self.attn(self.attn_norm(x_BxLxD), positions_BxL, mask_Bx1xLxL)
        gate_BxLxF, up_BxLxF = (self.mlp_norm(x_BxLxD) @ self.w_in).chunk(2, dim=-1)
        return x_BxLxD + (F.silu(gate_BxLxF) * up_BxLxF) @ self.w_down


def attention_mask(positions_BxL: torch.Tensor, segment_ids_BxL: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, L] boolean, True where a query may attend to a key.

    Same rule as the JAX model (same segment, not padding, earlier or equal position), plus the
    diagonal so padding rows are not fully masked (SDPA would return NaN for them; their
    outputs are masked out of the loss either way).
    """
    seg_q, seg_k = segment_ids_BxL[:, :, None], segment_ids_BxL[:, None, :]
    allowed = (seg_q == seg_k) & (seg_q > 0) & (positions_BxL[:, :, None] >= positions_BxL[:, None])
    return (allowed | torch.eye(positions_BxL.shape[1], dtype=torch.bool))[:, None]


class TorchLM(nn.Module):
    """`forward(tokens, positions, segment_ids) -> logits_BxLxV` (f32)."""

    def __init__(
        self,
        d_model: int,
        n_layers: int,
        n_heads: int,
        mlp_dim: int,
        vocab_size: int,
        norm: str = "rms",
        tied: bool = True,
        smear_keys: bool = False,
    ):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.embedding = _weight(vocab_size, d_model)
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, mlp_dim, norm, smear_keys) for _ in range(n_layers)
        )
        self.final_norm = Norm(d_model, norm)
        self.unembed = None if tied else _weight(d_model, vocab_size)

    def forward(
        self, tokens_BxL: torch.Tensor, positions_BxL: torch.Tensor, segment_ids_BxL: torch.Tensor
    ) -> torch.Tensor:
        mask_Bx1xLxL = attention_mask(positions_BxL, segment_ids_BxL)
        x_BxLxD = self.embedding[tokens_BxL]
        for block in self.blocks:
            x_BxLxD = block(x_BxLxD, positions_BxL, mask_Bx1xLxL)
        x_BxLxD = self.final_norm(x_BxLxD)
        return x_BxLxD @ (self.embedding.T if self.unembed is None else self.unembed)


def loss_fn(
    logits_BxLxV: torch.Tensor, targets_BxL: torch.Tensor, loss_mask_BxL: torch.Tensor
) -> torch.Tensor:
    """Mean next-token cross-entropy over the tokens the mask keeps."""
    nll_BxL = F.cross_entropy(
        logits_BxLxV.flatten(0, 1), targets_BxL.flatten(), reduction="none"
    ).view_as(targets_BxL)
    mask = loss_mask_BxL.float()
    return (nll_BxL * mask).sum() / mask.sum().clamp(min=1.0)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def random_batch(
    batch_size: int, seq_len: int, vocab_size: int, segments: int = 4, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random tokens packed as `segments` equal examples per row (positions restart in each)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(vocab_size, (batch_size, seq_len + 1), generator=gen)
    seg_len = math.ceil(seq_len / segments)
    index = torch.arange(seq_len).expand(batch_size, seq_len)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": index % seg_len,
        "segment_ids": index // seg_len + 1,
        "loss_mask": torch.ones(batch_size, seq_len, dtype=torch.bool),
    }


def time_train_steps(
    cfg: dict, batch_size: int, seq_len: int, steps: int, warmup: int
) -> dict[str, float]:
    """Times full AdamW steps (forward, backward, clipping, update) on one random batch.

    `cfg` holds TorchLM's keyword arguments. The optimizer mirrors the JAX one: global-norm
    clipping then AdamW, weight decay only on matrices.
    """
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    model = TorchLM(**cfg)
    params = list(model.parameters())
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim > 1]},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ],
        lr=3e-4,
        weight_decay=0.1,
    )
    batch = random_batch(batch_size, seq_len, cfg["vocab_size"])

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
        loss_fn(logits, batch["targets"], batch["loss_mask"]).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    step_s = (time.perf_counter() - start) / steps
    return {"tokens_per_s": batch_size * seq_len / step_s, "step_s": step_s}
