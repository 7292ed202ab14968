"""The evaluation metrics of study A (STUDIES.md A, "Evaluation"), from graded completions; the
job that samples and grades them is `echo_jax.lm.jobs.eval`.

`summarize` gives the keys of `eval.json` in `METRIC_KEYS` that depend on the records only:
greedy pass@1; unbiased pass@k and maj@k for k = 1, 2, 4, ..., n (maj@k votes on the extracted
answer strings of the first k samples); per-style count, share and accuracy (greedy and
sampled); mean completion length in tokens (EOS excluded); the share of completions cut off by
the token budget.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from echo_jax.lm import grading

METRIC_KEYS = (
    "dataset",
    "checkpoint",
    "step",
    "num_prompts",
    "num_samples",
    "sampling",
    "greedy_pass@1",
    "pass@k",
    "maj@k",
    "styles",
    "mean_length",
    "truncated",
)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, eq. 1):
    1 - C(n - c, k) / C(n, k), as a numerically stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def majority_correct(preds: Sequence[str | None], correct: Sequence[bool]) -> bool:
    """Whether the most frequent extracted answer (ties: the one seen first; no answer does not
    vote) is correct."""
    votes = collections.Counter(p.strip() for p in preds if p is not None and p.strip())
    if not votes:
        return False
    top = max(votes.values())
    winner = next(p.strip() for p in preds if p is not None and votes.get(p.strip()) == top)
    return any(ok for p, ok in zip(preds, correct) if p is not None and p.strip() == winner)


def k_ladder(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    return sorted({2**i for i in range(int(math.log2(n)) + 1)} | {n}) if n else []


def _styles(completions: list[dict]) -> dict[str, dict[str, float | int | None]]:
    out = {}
    for style in grading.STYLE_LABELS:
        hits = [c["correct"] for c in completions if c["style"] == style]
        out[style] = {
            "count": len(hits),
            "share": len(hits) / max(len(completions), 1),
            "accuracy": float(np.mean(hits)) if hits else None,
        }
    return out


def summarize(records: list[dict]) -> dict[str, Any]:
    """The metrics of `METRIC_KEYS` that depend on the records only."""
    greedy = [r["greedy"] for r in records]
    sampled = [c for r in records for c in r["samples"]]
    n = min((len(r["samples"]) for r in records), default=0)
    mean = lambda xs: float(np.mean(xs)) if len(xs) else None
    return {
        "num_prompts": len(records),
        "num_samples": n,
        "greedy_pass@1": mean([g["correct"] for g in greedy]),
        "pass@k": {
            str(k): mean(
                [pass_at_k(n, sum(c["correct"] for c in r["samples"][:n]), k) for r in records]
            )
            for k in k_ladder(n)
        },
        "maj@k": {
            str(k): mean(
                [
                    majority_correct(
                        [c["pred"] for c in r["samples"][:k]],
                        [c["correct"] for c in r["samples"][:k]],
                    )
                    for r in records
                ]
            )
            for k in k_ladder(n)
        },
        "styles": {"greedy": _styles(greedy), "sampled": _styles(sampled)},
        "mean_length": {
            "greedy": mean([g["length"] for g in greedy]),
            "sampled": mean([c["length"] for c in sampled]),
        },
        "truncated": {
            "greedy": mean([not g["stopped"] for g in greedy]),
            "sampled": mean([not c["stopped"] for c in sampled]),
        },
    }
