"""Figures of an RL run and the echo-chamber report (tables and figures in markdown).

`plot_rl(rl_workdir)` draws, from its metrics.jsonl, the study's main figure (the share of each
solution style among the sampled completions at every RL step, stacked, with greedy pass@1
overlaid) and the accuracy of each style. `write_report(workdir)` reads the stages of
`configs/echo_chamber.py` (pretrain/, eval_before/, rl/, eval_after/) and writes
`workdir/report.md` with a before/after figure in `workdir/plots/`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from etils import epath

from echo_jax.core.files import read_jsonl
from echo_jax.core.plots import plt, save_figure
from echo_jax.lm.grading import STYLE_LABELS

COLORS = {"tinygsm": "tab:blue", "omi1": "tab:orange", "omi2": "tab:green", "other": "tab:gray"}


def _series(rows: list[dict], key: str, shift: int = 0) -> tuple[list[int], list[float]]:
    points = [(r["step"] + shift, r[key]) for r in rows if key in r]
    return ([p[0] for p in points], [p[1] for p in points]) if points else ([], [])


def plot_rl(workdir: str, unit: str = "RL step") -> list[str]:
    """Writes `plots/style_share.png` and `plots/style_accuracy.png`; returns their paths.

    The rollout of step s is sampled before that step's update, so its metrics are drawn at
    x = s - 1 (the policy after s - 1 updates); evaluations after step s are drawn at x = s.
    `unit` names a step on the x axis (Expert Iteration's rounds are its steps).
    """
    rows = read_jsonl(epath.Path(workdir) / "metrics.jsonl")
    rollouts = [r for r in rows if "style_share/omi2" in r]
    if not rollouts:
        return []
    steps = [r["step"] - 1 for r in rollouts]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    shares = [[r.get(f"style_share/{s}", 0.0) for r in rollouts] for s in STYLE_LABELS]
    ax.stackplot(
        steps, shares, labels=STYLE_LABELS, colors=[COLORS[s] for s in STYLE_LABELS], alpha=0.75
    )
    evals = _series(rows, "eval/greedy_pass@1")
    ax.set(
        xlabel=f"{unit} (policy after that many)",
        ylabel="share of samples",
        ylim=(0, 1),
        xlim=(0, max(steps + evals[0] + [1])),
    )
    right = ax.twinx()
    right.plot(*evals, "k-o", label="greedy pass@1 (held out)")
    right.plot(*_series(rollouts, "accuracy", -1), "k--", alpha=0.7, label="rollout accuracy")
    right.set(ylabel="accuracy", ylim=(0, 1))
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="lower left")
    ax.set_title(f"Style share of sampled completions by {unit}, with pass@1")
    paths = [save_figure(fig, workdir, "style_share.png")]

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for style in STYLE_LABELS:
        xs, ys = _series(rollouts, f"style_accuracy/{style}", -1)
        if xs:
            ax.plot(xs, ys, "o-", color=COLORS[style], label=style, markersize=3)
    ax.plot(*_series(rollouts, "accuracy", -1), "k--", label="all")
    ax.set(
        xlabel=f"{unit} (policy after that many)",
        ylabel="accuracy of the rollout",
        ylim=(0, 1.02),
        title=f"Accuracy per style by {unit}",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(save_figure(fig, workdir, "style_accuracy.png"))
    return paths


def _load(path: str) -> dict | None:
    return json.loads(open(path).read()) if os.path.exists(path) else None


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _eval_tables(before: dict, after: dict) -> list[str]:
    n = str(max(int(k) for k in before["pass@k"]))
    lines = [
        f"| level | greedy pass@1 before | after | pass@{n} before | after | "
        f"maj@{n} before | after |",
        "|---|---|---|---|---|---|---|",
    ]
    groups = [
        (f"L{lv}", before["by_level"][lv], after["by_level"].get(lv, {}))
        for lv in before.get("by_level", {})
    ] + [("all", before, after)]
    for name, b, a in groups:
        lines.append(
            f"| {name} | {_pct(b['greedy_pass@1'])} | {_pct(a.get('greedy_pass@1'))} | "
            f"{_pct(b['pass@k'][n])} | {_pct(a.get('pass@k', {}).get(n))} | "
            f"{_pct(b['maj@k'][n])} | {_pct(a.get('maj@k', {}).get(n))} |"
        )
    lines += [
        "",
        "| style | sampled share before | after | sampled accuracy before | after | "
        "greedy share before | after |",
        "|---|---|---|---|---|---|---|",
    ]
    for style in STYLE_LABELS:
        b, a = before["styles"], after["styles"]
        lines.append(
            f"| {style} | {_pct(b['sampled'][style]['share'])} | "
            f"{_pct(a['sampled'][style]['share'])} | {_pct(b['sampled'][style]['accuracy'])} | "
            f"{_pct(a['sampled'][style]['accuracy'])} | {_pct(b['greedy'][style]['share'])} | "
            f"{_pct(a['greedy'][style]['share'])} |"
        )
    return lines


def plot_before_after(workdir: str, before: dict, after: dict) -> str:
    """Sampled style shares before and after RL (stacked bars) and greedy pass@1 per level."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    bottom = np.zeros(2)
    for style in STYLE_LABELS:
        share = np.array([d["styles"]["sampled"][style]["share"] for d in (before, after)])
        left.bar(["before RL", "after RL"], share, bottom=bottom, color=COLORS[style], label=style)
        bottom += share
    left.set(ylabel="share of sampled completions", ylim=(0, 1), title="Style share")
    left.legend(fontsize=8)
    levels = list(before.get("by_level", {}))
    x = np.arange(len(levels))
    for i, (name, d) in enumerate((("before RL", before), ("after RL", after))):
        right.bar(
            x + 0.4 * i - 0.2,
            [d["by_level"][lv]["greedy_pass@1"] for lv in levels],
            0.4,
            label=name,
            color=("0.65", "0.2")[i],
        )
    right.set(
        xticks=x,
        xticklabels=[f"level {lv}" for lv in levels],
        ylim=(0, 1),
        ylabel="greedy pass@1",
        title="Accuracy on held-out problems",
    )
    right.legend(fontsize=8)
    return save_figure(fig, workdir, "before_after.png")


def _rl_summary(rows: list[dict]) -> list[str]:
    rollouts = [r for r in rows if "style_share/omi2" in r]
    if not rollouts:
        return ["(no RL steps logged)"]
    first, last = rollouts[0], rollouts[-1]
    top = max(STYLE_LABELS, key=lambda s: last.get(f"style_share/{s}", 0.0))
    lines = [
        "| RL rollout | step | accuracy | " + " | ".join(STYLE_LABELS) + " |",
        "|---|---|---|" + "---|" * len(STYLE_LABELS),
    ]
    for name, r in (("first", first), ("last", last)):
        lines.append(
            f"| {name} | {r['step']} | {_pct(r['accuracy'])} | "
            + " | ".join(_pct(r.get(f"style_share/{s}")) for s in STYLE_LABELS)
            + " |"
        )
    seconds = {  # the loop logs the jitted step (every update of a rollout) as time/train_step
        k: sum(r.get(f"time/{key}", 0.0) for r in rollouts)
        for k, key in (("rollout", "rollout"), ("reward", "reward"), ("update", "train_step"))
    }
    lines += [
        "",
        f"The style that dominates at the end is **{top}**: "
        f"{_pct(first.get(f'style_share/{top}'))} % of the samples at the first rollout, "
        f"{_pct(last.get(f'style_share/{top}'))} % at the last. "
        f"Time over {len(rollouts)} steps: rollout {seconds['rollout']:.0f} s, reward "
        f"{seconds['reward']:.0f} s, update {seconds['update']:.0f} s.",
    ]
    return lines


def write_report(workdir: str, config: Any = None) -> str:
    """`workdir/report.md` from the stage sub-workdirs; returns its path."""
    before = _load(os.path.join(workdir, "eval_before", "eval.json"))
    after = _load(os.path.join(workdir, "eval_after", "eval.json"))
    rl_rows = read_jsonl(os.path.join(workdir, "rl", "metrics.jsonl"))
    lines = [
        "# Echo chamber in miniature",
        "",
        "Pretraining on a mixture of three solution styles (TinyGSM code, OMI1 text with "
        "code, OMI2 natural language), then RL with a 0/1 correctness reward; the study is "
        "STUDIES.md A. Evaluation: held-out synthetic test problems, greedy and sampled.",
    ]
    if config is not None:
        r = config.rl
        lines += [
            "",
            f"RL: **{r.algo}**, {r.train.num_steps} steps of {r.rl.prompts_per_step} "
            f"prompts x {r.rl.samples_per_prompt} samples at temperature "
            f"{r.rl.temperature}, lr {r.rl.lr:g}, KL coefficient {r.rl.kl_coef:g}; "
            f"pretraining: {config.pretrain.train.num_steps} steps on "
            f"`{config.pretrain.data.mixture}`.",
        ]
    if before and after:
        figure = os.path.relpath(plot_before_after(workdir, before, after), workdir)
        lines += [
            "",
            "## Before and after RL",
            "",
            *_eval_tables(before, after),
            "",
            f"![before and after]({figure})",
        ]
    lines += ["", "## During RL", "", *_rl_summary(rl_rows), ""]
    for name in ("style_share.png", "style_accuracy.png"):
        if os.path.exists(os.path.join(workdir, "rl", "plots", name)):
            lines.append(f"![{name}](rl/plots/{name})")
    path = os.path.join(workdir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
