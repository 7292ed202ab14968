"""Phases 1 and 2 of the source-bias study: their sub-runs, tables and figure (the job that runs
them is `echo_jax.recsys.jobs.phases`).

Phase 1 (HGC dominant): train on human-text histories for every user encoder and rank paired
lists (each candidate in both sources). Phase 2 (coexisting): swap a share rho of history slots
to their AIGC text and, with `phases.retrain` (echo_jax's choice), retrain one encoder per rho on
train and dev histories swapped alike; without it (the study's), score the dev histories swapped
at each rho under the phase-1 model.
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np

from echo_jax.core.plots import plt

TABLE_KS = (1, 3, 5)


def run_name(encoder: str, rho: float, seed: int) -> str:
    return f"{encoder}-rho{rho:.2f}-seed{seed}"


def plan(phases: ml_collections.ConfigDict) -> list[tuple[str, float, int]]:
    """Phase 1: every encoder at rho 0; phase 2: `rho_encoder` at every rho (rho 0 shared, and
    trained before the others when phase 2 does not retrain)."""
    runs = [(e, 0.0, s) for s in phases.seeds for e in phases.encoders]
    if not phases.get("retrain", True):  # the model the other rhos are scored under
        runs += [(phases.rho_encoder, 0.0, s) for s in phases.seeds]
    runs += [(phases.rho_encoder, float(r), s) for s in phases.seeds for r in phases.rhos]
    return list(dict.fromkeys(runs))


def _mean_std(rows: list[dict]) -> dict[str, list[float]]:
    return {
        k: [float(np.mean([r[k] for r in rows])), float(np.std([r[k] for r in rows]))]
        for k in rows[0]
    }


def summarise(phases: ml_collections.ConfigDict, results: dict[str, dict]) -> dict:
    """Per encoder (phase 1) and per rho (phase 2): metric -> [mean, std] over seeds."""

    def over_seeds(encoder, rho):
        return _mean_std([results[run_name(encoder, rho, s)] for s in phases.seeds])

    return {
        "seeds": list(phases.seeds),
        "rho_encoder": phases.rho_encoder,
        "phase1": {e: over_seeds(e, 0.0) for e in phases.encoders},
        "phase2": {f"{r:.2f}": over_seeds(phases.rho_encoder, float(r)) for r in phases.rhos},
    }


def _cell(value: list[float], digits: int = 3) -> str:
    mean, std = value
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std > 0 else "")


def markdown(summary: dict) -> str:
    """The phase-1 source-bias and accuracy tables and the phase-2 table."""
    cols = [f"{m}@{k}" for m in ("ndcg", "map") for k in TABLE_KS]
    header = " | ".join(c.upper() for c in cols)
    lines = [
        f"### Phase 1: trained on HGC histories (seeds {summary['seeds']})",
        "",
        f"| encoder | target | {header} | llm_ratio |",
        "|---|---|" + "---|" * (len(cols) + 1),
    ]
    for enc, m in summary["phase1"].items():
        for label, prefix, digits in (
            ("Human", "human", 3),
            ("LLM", "llm", 3),
            ("RelaΔ %", "rela_delta", 1),
        ):
            cells = " | ".join(_cell(m[f"bias/{prefix}/{c}"], digits) for c in cols)
            ratio = _cell(m["bias/llm_ratio"]) if prefix == "human" else ""
            lines.append(f"| {enc if prefix == 'human' else ''} | {label} | {cells} | {ratio} |")
    lines += [
        "",
        "Accuracy on the shown (HGC) impression lists and full ranking over the catalogue:",
        "",
        "| encoder | NDCG@5 | MAP@5 | Recall@1 | full Recall@10 | full NDCG@10 |",
        "|---|---|---|---|---|---|",
    ]
    for enc, m in summary["phase1"].items():
        keys = (
            "eval/ndcg@5",
            "eval/map@5",
            "eval/recall@1",
            "eval/full/recall@10",
            "eval/full/ndcg@10",
        )
        lines.append(f"| {enc} | " + " | ".join(_cell(m[k]) for k in keys) + " |")
    lines += [
        "",
        f"### Phase 2: share rho of history items in AIGC text ({summary['rho_encoder']})",
        "",
        "| rho | llm_ratio | RelaΔ NDCG@1 % | RelaΔ NDCG@5 % | RelaΔ MAP@5 % | "
        "Human NDCG@5 | LLM NDCG@5 | NDCG@5 (shown list) |",
        "|---" * 8 + "|",
    ]
    for rho, m in summary["phase2"].items():
        keys = ("bias/rela_delta/ndcg@1", "bias/rela_delta/ndcg@5", "bias/rela_delta/map@5")
        lines.append(
            f"| {rho} | {_cell(m['bias/llm_ratio'])} | "
            + " | ".join(_cell(m[k], 1) for k in keys)
            + " | "
            + " | ".join(
                _cell(m[k]) for k in ("bias/human/ndcg@5", "bias/llm/ndcg@5", "eval/ndcg@5")
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def plot_phase2(summary: dict, path: str) -> str:
    """RelaDelta (NDCG@1/3/5) and llm_ratio against rho."""
    rhos = [float(r) for r in summary["phase2"]]
    rows = list(summary["phase2"].values())
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for k in TABLE_KS:
        ax1.errorbar(
            rhos,
            [m[f"bias/rela_delta/ndcg@{k}"][0] for m in rows],
            yerr=[m[f"bias/rela_delta/ndcg@{k}"][1] for m in rows],
            marker="o",
            label=f"NDCG@{k}",
            capsize=3,
        )
    ax1.axhline(0, color="grey", lw=0.8)
    ax1.set(xlabel="share rho of AIGC history items", ylabel="RelaΔ % (< 0: AIGC preferred)")
    ax1.legend()
    ax2.errorbar(
        rhos,
        [m["bias/llm_ratio"][0] for m in rows],
        yerr=[m["bias/llm_ratio"][1] for m in rows],
        marker="o",
        capsize=3,
    )
    ax2.axhline(0.5, color="grey", lw=0.8)
    ax2.set(xlabel="share rho of AIGC history items", ylabel="llm_ratio")
    fig.suptitle(f"Phase 2 ({summary['rho_encoder']})")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
