"""Figures written as PNGs into `workdir/plots/`."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
from etils import epath

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from echo_jax.core.files import read_jsonl  # noqa: E402


def plot_curves(
    workdir: str, prefixes: Sequence[str], filename: str, title: str, logy: bool = False
) -> str | None:
    """Plots every metric whose name starts with one of `prefixes` against step."""
    rows = read_jsonl(epath.Path(workdir) / "metrics.jsonl")
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
    return save_figure(fig, workdir, filename)


def save_figure(fig: plt.Figure, workdir: str, filename: str) -> str:
    """Writes `fig` to `workdir/plots/filename` (local or gs://) and closes it."""
    out_dir = epath.Path(workdir) / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    with (out_dir / filename).open("wb") as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    return str(out_dir / filename)
