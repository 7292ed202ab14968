"""Figures written as PNGs into `workdir/plots/`."""

from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from echo_jax.core.metrics import read_jsonl  # noqa: E402


def plot_curves(workdir: str, prefixes: Sequence[str], filename: str, title: str,
                logy: bool = False) -> str | None:
    """Plots every metric whose name starts with one of `prefixes` against step."""
    rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    keys = sorted({k for r in rows for k in r if any(k.startswith(p) for p in prefixes)})
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in keys:
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*points), label=key, marker="." if len(points) < 30 else None)
    ax.set_xlabel("step")
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out_dir = os.path.join(workdir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, filename)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
