"""The `source_bias_study` job: the whole source-bias study, resumable.

Phases 1 and 2 (`jobs/phases.py`, into `WORKDIR/phases`), then phase 3, the feedback loop
(`recsys/feedback_loop.py`), once without the debiaser and, unless `debias.alpha` and
`debias.beta` are both 0, once with it (`WORKDIR/loop/<arm>/seed<s>`). Writes `WORKDIR/report.md`
(tables and figures), `WORKDIR/results.json` and `WORKDIR/plots/loop.png` (mean over seeds, the
band spans min to max).
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from echo_jax.core import workdir as workdir_lib
from echo_jax.core.files import write_json
from echo_jax.core.plots import plt, save_figure
from echo_jax.recsys import phases
from echo_jax.recsys.feedback_loop import UNDEBIASED, LoopData, arm_name, check_settings, run_arm
from echo_jax.recsys.jobs.phases import GRID_MAY_CHANGE, run_phases

LOOP_COLUMNS = (
    "aigc_click_share",
    "llm_ratio",
    "rela_delta_ndcg@5",
    "ndcg@5/human_target",
    "ndcg@5/llm_target",
    "ndcg@5",
    "hit@5",
    "mrr@5",
    "exposure/aigc_share@10",
    "exposure/coverage@10",
    "exposure/gini@10",
)


def phase_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The `source_bias_phases` config of phases 1 and 2 (no loop, no debiaser)."""
    sub = ml_collections.ConfigDict(config.to_dict())
    del sub["loop"], sub["debias"]
    sub.kind = "source_bias_phases"
    return sub


def arm_configs(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """The undebiased loop and, if `debias` switches it on, the debiased one."""
    plain = ml_collections.ConfigDict(config.to_dict())
    plain.debias.alpha, plain.debias.beta = 0.0, 0.0
    arms = {UNDEBIASED: plain}
    if config.debias.alpha or config.debias.beta:
        arms[arm_name(config.debias)] = config
    return arms


def summarise_loop(results: dict[str, dict[int, list[dict]]]) -> dict:
    """arm -> metric -> per iteration [mean, min, max] over seeds."""
    out = {}
    for arm, by_seed in results.items():
        runs = list(by_seed.values())
        # records written before a metric existed (a resumed loop) leave that metric out
        shared = set.intersection(*(set(r) for run in runs for r in run))
        out[arm] = {
            k: np.stack([[r[k] for r in run] for run in runs])
            for k in runs[0][0]
            if k in shared and isinstance(runs[0][0][k], (int, float))
        }
        out[arm] = {
            k: np.stack([v.mean(0), v.min(0), v.max(0)], -1).tolist() for k, v in out[arm].items()
        }
    return out


def run_study(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Phases 1 and 2 (if `loop.with_phases`), both loops, then the report and figures."""
    check_settings(config.loop)
    workdir_lib.record_run(
        workdir,
        config,
        may_change=(*GRID_MAY_CHANGE, "loop.iterations", "loop.seeds"),
        label="study",
        started=any(os.path.isdir(os.path.join(workdir, d)) for d in ("phases", "loop")),
    )
    cache_dir = config.model.cache_dir or os.path.join(workdir, "item_cache")
    phase_summary = None
    if config.loop.with_phases:
        sub = phase_config(config)
        sub.model.cache_dir = cache_dir
        phase_summary = run_phases(sub, os.path.join(workdir, "phases"))
    data = LoopData(config, cache_dir)  # the arms differ only in the debiaser
    results = {
        arm: run_arm(cfg, os.path.join(workdir, "loop", arm), data, label=arm)
        for arm, cfg in arm_configs(config).items()
    }
    summary = {
        "seeds": list(config.loop.seeds),
        "loop": summarise_loop(results),
        "phases": phase_summary,
    }
    write_json(os.path.join(workdir, "results.json"), summary)
    if jax.process_index() == 0:
        plot_loop(summary["loop"], workdir)
        with open(os.path.join(workdir, "report.md"), "w") as f:
            f.write(report(config, summary))
    return summary


def plot_loop(loop: dict, workdir: str) -> str:
    """Click share, RelaΔ NDCG@5 and NDCG@5 per iteration, per arm, with min-max bands."""
    panels = (
        ("aigc_click_share", "AIGC click share"),
        ("exposure/aigc_share@10", "AIGC share of every user's top 10"),
        ("rela_delta_ndcg@5", "RelaΔ NDCG@5 % (< 0: AIGC preferred)"),
        ("ndcg@5", "NDCG@5 (dev, HGC lists)"),
    )
    present = next(iter(loop.values()))
    panels = tuple(p for p in panels if p[0] in present)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2))
    for ax, (key, title) in zip(axes, panels):
        for arm, metrics in loop.items():
            values = np.asarray(metrics[key])
            iters = np.arange(len(values))
            (line,) = ax.plot(iters, values[:, 0], marker="o", label=arm)
            ax.fill_between(iters, values[:, 1], values[:, 2], color=line.get_color(), alpha=0.2)
        if "aigc" in key:
            ax.axhline(0.5, color="grey", lw=0.8)
        if key.startswith("rela"):
            ax.axhline(0.0, color="grey", lw=0.8)
        ax.set(xlabel="loop iteration (0: trained on human text only)", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, workdir, "loop.png")


def _fmt(value: list[float], digits: int = 3) -> str:
    mean, lo, hi = value
    spread = f" [{lo:.{digits}f}, {hi:.{digits}f}]" if hi > lo else ""
    return f"{mean:.{digits}f}{spread}"


def loop_markdown(loop: dict, seeds: list[int]) -> str:
    """Per arm, the per-iteration table; then first against last click share and NDCG@5."""
    lines = [
        f"### Phase 3: the feedback loop (mean over seeds {seeds}, [min, max])",
        "",
        "`ndcg@5/*_target`: the paired dev lists (both copies of every candidate) with the "
        "human or the AIGC copy as the relevant one; `ndcg@5`: the dev lists of human "
        "copies, as shown; `hit@5`, `mrr@5`: those lists too; `exposure/*@10`: each dev user's "
        "top 10 of the whole paired catalogue (history excluded): the AIGC share of the slots, "
        "the catalogue coverage and the Gini index of item exposure.",
        "",
    ]
    for arm, m in loop.items():
        columns = [c for c in LOOP_COLUMNS if c in m]
        lines += [
            f"**{arm}**",
            "",
            "| iteration | " + " | ".join(columns) + " |",
            "|---" * (len(columns) + 1) + "|",
        ]
        for t in range(len(m["iteration"])):
            cells = [_fmt(m[c][t], 1 if c.startswith("rela") else 3) for c in columns]
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "Iteration 0 trains on human text only; its click share is 0 by construction. "
        "Last iteration against the first with simulated clicks:",
        "",
        "| arm | click share, iteration 1 | click share, last | mean NDCG@5, iterations 1..T |",
        "|---|---|---|---|",
    ]
    for arm, m in loop.items():
        ndcg = np.mean([v[0] for v in m["ndcg@5"][1:]])
        lines.append(
            f"| {arm} | {_fmt(m['aigc_click_share'][1])} | "
            f"{_fmt(m['aigc_click_share'][-1])} | {ndcg:.3f} |"
        )
    return "\n".join(lines) + "\n"


def report(config: ml_collections.ConfigDict, summary: dict) -> str:
    """`report.md`: the setup in one paragraph, the loop figure and tables, phases 1 and 2."""
    d, loop = config.data, config.loop
    parts = [
        f"# Source bias in the recommender feedback loop ({config.variant})",
        "",
        f"Data `{d.name}`, item tower `{config.model.item_tower}`, loop recommender "
        f"`{config.model.user_encoder}`; {loop.iterations} loop iterations of "
        f"{loop.train_steps} steps (batch {config.train.batch_size}) from scratch, clicks "
        + (
            "on the better-ranked copy"
            if loop.click_eta <= 0
            else f"position-biased (eta {loop.click_eta})"
        )
        + f"; debiaser alpha {config.debias.alpha}, beta {config.debias.beta}.",
        "",
        "![loop](plots/loop.png)",
        "",
        loop_markdown(summary["loop"], summary["seeds"]),
    ]
    if summary["phases"] is not None:
        parts += [
            "## Phases 1 and 2",
            "",
            "![phase 2](phases/plots/phase2.png)",
            "",
            phases.markdown(summary["phases"]),
        ]
    return "\n".join(parts)
