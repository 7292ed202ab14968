"""The experiment grid's report (`lm/jobs/grid.py`): `results.json`, `report.md` and `plots/`
from whatever cells are finished; means over seeds with their min and max.

A group is a cell without its seed (mixture, size, algo, KL). Per group: the dominant style after
RL (the largest sampled share in the evaluation after RL) and its rollout share at each RL step;
the first step whose rollout share of that style passes `grid.share_threshold` ("never" if
none); greedy pass@1, pass@n and maj@n before and after RL, overall and per level.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from echo_jax.core.files import read_json, read_jsonl, write_json
from echo_jax.core.plots import plt, save_figure
from echo_jax.lm.data.mixtures import mixture_shares
from echo_jax.lm.grading import STYLE_LABELS
from echo_jax.lm.report import COLORS

STYLES = STYLE_LABELS[:3]  # the pretraining styles ("other" is never dominant in practice)


def _summary(evaluation: dict) -> dict[str, Any]:
    n = str(evaluation["num_samples"])
    out = {
        "greedy_pass@1": evaluation["greedy_pass@1"],
        "pass@n": evaluation["pass@k"].get(n),
        "maj@n": evaluation["maj@k"].get(n),
        "n": int(n),
        "sampled_share": {s: evaluation["styles"]["sampled"][s]["share"] for s in STYLES},
        "greedy_share": {s: evaluation["styles"]["greedy"][s]["share"] for s in STYLES},
    }
    out["by_level"] = {
        level: block["greedy_pass@1"] for level, block in evaluation.get("by_level", {}).items()
    }
    return out


def cell_result(
    workdir: str, cell: Any, threshold: float, transfer: Sequence[str] = ()
) -> dict[str, Any]:
    """One cell's record: its axes, its evaluations and its RL trajectory (None where missing)."""
    base = os.path.join(workdir, "cells", cell.name)
    before = read_json(os.path.join(workdir, "eval_before", cell.pretraining, "eval.json"))
    after = read_json(os.path.join(base, "eval_after", "eval.json"))
    metrics = read_jsonl(os.path.join(base, "rl", "metrics.jsonl"))
    rows = [r for r in metrics if "accuracy" in r]
    greedy = {r["step"]: r["eval/greedy_pass@1"] for r in metrics if "eval/greedy_pass@1" in r}
    record = {
        "name": cell.name,
        "mixture": cell.mixture,
        "size": cell.size,
        "algo": cell.algo,
        "kl_coef": cell.kl_coef,
        "seed": cell.seed,
        "finished": after is not None,
        "failed": os.path.exists(os.path.join(base, "error.txt")),
        "before": _summary(before) if before else None,
        "after": _summary(after) if after else None,
        "steps": [r["step"] for r in rows],
        "rollout_share": {s: [r.get(f"style_share/{s}", 0.0) for r in rows] for s in STYLES},
        "rollout_accuracy": [r["accuracy"] for r in rows],
        "greedy_during_rl": {str(step): value for step, value in sorted(greedy.items())},
        "transfer": _transfer(workdir, cell, transfer),
    }
    if after is not None:
        top = max(STYLES, key=lambda s: record["after"]["sampled_share"][s])
        passed = [
            step
            for step, share in zip(record["steps"], record["rollout_share"][top], strict=True)
            if share >= threshold
        ]
        record.update(dominant=top, steps_to_threshold=passed[0] if passed else None)
    return record


def _transfer(workdir: str, cell: Any, names: Sequence[str]) -> dict[str, dict]:
    """Per `transfer.<name>` evaluation of the config written before and after RL: greedy
    pass@1 (evaluations moved aside, `<name>.old1`, are not read)."""
    after_dir = os.path.join(workdir, "cells", cell.name, "transfer_after")
    out = {}
    for name in sorted(names):
        before = read_json(
            os.path.join(workdir, "transfer_before", cell.pretraining, name, "eval.json")
        )
        after = read_json(os.path.join(after_dir, name, "eval.json"))
        if before and after:
            out[name] = {w: e["greedy_pass@1"] for w, e in (("before", before), ("after", after))}
    return out


def _group_key(record: dict) -> tuple:
    return record["mixture"], record["size"], record["algo"], record["kl_coef"]


def _stats(values: Sequence[float | None]) -> dict[str, float] | None:
    xs = [v for v in values if v is not None]
    if not xs:
        return None
    return {"mean": float(np.mean(xs)), "min": float(np.min(xs)), "max": float(np.max(xs))}


def groups(records: Sequence[dict]) -> list[dict]:
    """Finished cells grouped over seeds."""
    by_key: dict[tuple, list[dict]] = collections.defaultdict(list)
    for record in records:
        if record["finished"] and record["before"]:
            by_key[_group_key(record)].append(record)
    out = []
    for (mixture, size, algo, kl), runs in by_key.items():
        top = collections.Counter(r["dominant"] for r in runs).most_common(1)[0][0]
        group = {
            "mixture": mixture,
            "size": size,
            "algo": algo,
            "kl_coef": kl,
            "seeds": [r["seed"] for r in runs],
            "dominant": top,
            "dominant_agreement": sum(r["dominant"] == top for r in runs) / len(runs),
            "dominant_share_after": _stats([r["after"]["sampled_share"][top] for r in runs]),
            "steps_to_threshold": [r["steps_to_threshold"] for r in runs],
            "tinygsm_in_mixture": mixture_shares(mixture).get("tinygsm", 0.0),
        }
        for metric in ("greedy_pass@1", "pass@n", "maj@n"):
            for when in ("before", "after"):
                group[f"{metric}/{when}"] = _stats([r[when][metric] for r in runs])
            group[f"{metric}/gain"] = _stats(
                [r["after"][metric] - r["before"][metric] for r in runs]
            )
        levels = sorted({lv for r in runs for lv in r["before"]["by_level"]})
        group["by_level"] = {
            lv: {
                when: _stats([r[when]["by_level"].get(lv) for r in runs])
                for when in ("before", "after")
            }
            for lv in levels
        }
        benchmarks = sorted({name for r in runs for name in r.get("transfer", {})})
        group["transfer"] = {
            name: {
                when: _stats([r["transfer"].get(name, {}).get(when) for r in runs])
                for when in ("before", "after")
            }
            for name in benchmarks
        }
        group["n"] = runs[0]["after"]["n"]
        out.append(group)
    return out


def _pct(stats: dict | None) -> str:
    if stats is None:
        return "–"
    if stats["min"] == stats["max"]:
        return f"{100 * stats['mean']:.0f}"
    return f"{100 * stats['mean']:.0f} [{100 * stats['min']:.0f}, {100 * stats['max']:.0f}]"


def _steps(values: Sequence[int | None]) -> str:
    return ", ".join("never" if v is None else str(v) for v in values)


def _label(group: dict) -> str:
    return f"{group['mixture']} {group['size']} {group['algo']} KL {group['kl_coef']:g}"


def plot_trajectories(workdir: str, records: Sequence[dict], threshold: float) -> str | None:
    """Per group: the rollout share of each style against the RL step (log x), mean over seeds
    with a min-max band, the rollout accuracy (dashed) and the greedy pass@1 of RL's own
    evaluations (black dots, at the steps every seed evaluated)."""
    by_key: dict[tuple, list[dict]] = collections.defaultdict(list)
    for r in records:
        if r["finished"] and r["steps"]:
            by_key[_group_key(r)].append(r)
    if not by_key:
        return None
    cols = min(3, len(by_key))
    rows = -(-len(by_key) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (key, runs) in zip(axes.flat, by_key.items(), strict=False):
        length = min(len(r["steps"]) for r in runs)
        steps = runs[0]["steps"][:length]
        for style in STYLES:
            ys = np.array([r["rollout_share"][style][:length] for r in runs])
            ax.plot(steps, ys.mean(0), color=COLORS[style], label=style)
            ax.fill_between(steps, ys.min(0), ys.max(0), color=COLORS[style], alpha=0.2)
        accuracy = np.array([r["rollout_accuracy"][:length] for r in runs])
        ax.plot(steps, accuracy.mean(0), "k--", label="rollout accuracy")
        shared = set.intersection(*(set(r.get("greedy_during_rl", {})) for r in runs))
        evaluated = sorted(int(step) for step in shared if int(step) > 0)
        if evaluated:
            greedy = [np.mean([r["greedy_during_rl"][str(t)] for r in runs]) for t in evaluated]
            ax.plot(evaluated, greedy, "ko:", ms=3, label="greedy pass@1")
        ax.axhline(threshold, color="gray", lw=0.5)
        ax.set(xscale="log", ylim=(0, 1), title=" ".join(map(str, key)), xlabel="RL step")
    for ax in list(axes.flat)[len(by_key) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Style share of the rollouts during RL (mean over seeds, min-max band)")
    return save_figure(fig, workdir, "style_share.png")


def plot_gain_vs_tinygsm(workdir: str, grouped: Sequence[dict]) -> str | None:
    """Greedy pass@1 gain from RL against TinyGSM's share of the pretraining mixture, one line
    per size, for the (algorithm, KL) run on the most mixtures (the mixture sweep's)."""
    mixtures_of = collections.defaultdict(set)
    for g in grouped:
        mixtures_of[(g["algo"], g["kl_coef"])].add(g["mixture"])
    setting = max(mixtures_of, key=lambda k: len(mixtures_of[k]), default=None)
    if setting is None or len(mixtures_of[setting]) < 2:
        return None
    swept = [g for g in grouped if (g["algo"], g["kl_coef"]) == setting]
    fig, ax = plt.subplots(figsize=(6, 4))
    for size in sorted({g["size"] for g in swept}):
        points = sorted(
            (
                (g["tinygsm_in_mixture"], g["greedy_pass@1/gain"])
                for g in swept
                if g["size"] == size
            ),
            key=lambda point: point[0],
        )
        xs = [x for x, _ in points]
        ax.errorbar(
            xs,
            [s["mean"] for _, s in points],
            yerr=[
                [s["mean"] - s["min"] for _, s in points],
                [s["max"] - s["mean"] for _, s in points],
            ],
            fmt="o-",
            label=size,
            capsize=3,
        )
    ax.set(
        xlabel="TinyGSM share of the pretraining mixture",
        ylabel="greedy pass@1 gain",
        title=f"{setting[0]}, KL {setting[1]:g}",
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, workdir, "gain_vs_tinygsm.png")


def plot_before_after(workdir: str, grouped: Sequence[dict]) -> str | None:
    """Greedy pass@1, pass@n and maj@n before and after RL, per group."""
    if not grouped:
        return None
    metrics = ("greedy_pass@1", "pass@n", "maj@n")
    fig, axes = plt.subplots(1, 3, figsize=(13, 0.45 * len(grouped) + 1.5), sharey=True)
    ys = np.arange(len(grouped))
    for ax, metric in zip(axes, metrics, strict=True):
        for offset, when, color in ((-0.2, "before", "tab:gray"), (0.2, "after", "tab:red")):
            ax.barh(
                ys + offset,
                [g[f"{metric}/{when}"]["mean"] for g in grouped],
                height=0.4,
                color=color,
                label=when,
            )
        ax.set(title=metric.replace("@n", f"@{grouped[0]['n']}"), xlim=(0, 1))
    axes[0].set_yticks(ys, [_label(g) for g in grouped], fontsize=7)
    axes[0].legend(fontsize=8)
    return save_figure(fig, workdir, "before_after.png")


def _tables(grouped: Sequence[dict], threshold: float) -> list[str]:
    n = grouped[0]["n"]
    lines = [
        "## Every group (mean over seeds [min, max], in %)",
        "",
        f"| mixture | size | algo | KL | seeds | dominant style (agreement) | its share after | "
        f"steps to {threshold:.0%} | greedy pass@1 before | after | pass@{n} before | after | "
        f"maj@{n} before | after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in grouped:
        lines.append(
            f"| {g['mixture']} | {g['size']} | {g['algo']} | {g['kl_coef']:g} | {len(g['seeds'])} "
            f"| {g['dominant']} ({g['dominant_agreement']:.0%}) "
            f"| {_pct(g['dominant_share_after'])} "
            f"| {_steps(g['steps_to_threshold'])} | {_pct(g['greedy_pass@1/before'])} | "
            f"{_pct(g['greedy_pass@1/after'])} | {_pct(g['pass@n/before'])} | "
            f"{_pct(g['pass@n/after'])} | {_pct(g['maj@n/before'])} | {_pct(g['maj@n/after'])} |"
        )
    lines += ["", *_scale_table(grouped), "", *_algorithm_table(grouped, threshold)]
    lines += _before_after_table(
        grouped,
        "by_level",
        "## Transfer: greedy pass@1 per level, before -> after (in %)",
        "level ",
    )
    if any(g.get("transfer") for g in grouped):
        title = "## Transfer to other problems (`transfer.<name>`): greedy pass@1, before -> after"
        lines += _before_after_table(grouped, "transfer", f"{title} (in %)")
    return lines


def _before_after_table(
    grouped: Sequence[dict], field: str, title: str, prefix: str = ""
) -> list[str]:
    """One row per group, one column per key of `group[field]`: before -> after."""
    keys = sorted({key for g in grouped for key in g.get(field, {})})
    lines = ["", title, "", "| group | " + " | ".join(f"{prefix}{k}" for k in keys) + " |"]
    lines.append("|---|" + "---|" * len(keys))
    for g in grouped:
        values = g.get(field, {})
        cells = [
            f"{_pct(values[k]['before'])} -> {_pct(values[k]['after'])}" if k in values else "–"
            for k in keys
        ]
        lines.append(f"| {_label(g)} | " + " | ".join(cells) + " |")
    return lines


def _scale_table(grouped: Sequence[dict]) -> list[str]:
    """The dominant style (its share after RL) by mixture x size, for the first algorithm and KL
    of each (mixture, size): does the winner depend on the model's size?"""
    sizes = list(dict.fromkeys(g["size"] for g in grouped))
    first: dict[tuple, dict] = {}
    for g in grouped:
        first.setdefault((g["mixture"], g["size"]), g)
    lines = [
        "## The dominant style after RL by mixture and size",
        "",
        "| mixture | " + " | ".join(sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for mixture in dict.fromkeys(g["mixture"] for g in grouped):
        found = [first.get((mixture, s)) for s in sizes]
        row = [f"{g['dominant']} ({_pct(g['dominant_share_after'])})" if g else "–" for g in found]
        lines.append(f"| {mixture} | " + " | ".join(row) + " |")
    return lines


def _algorithm_table(grouped: Sequence[dict], threshold: float) -> list[str]:
    """Per algorithm and KL coefficient (every mixture and size): RL steps until the dominant
    style's rollout share passes the threshold, per seed, and the greedy pass@1 gain."""
    lines = [
        f"## Algorithm x KL: steps until the dominant style passes {threshold:.0%}, and the gain",
        "",
        "| mixture | size | algo | KL | steps (per seed) | greedy pass@1 gain (points) |",
        "|---|---|---|---|---|---|",
    ]
    for g in sorted(grouped, key=lambda g: (g["mixture"], g["size"], g["algo"], g["kl_coef"])):
        gain = g["greedy_pass@1/gain"]
        lines.append(
            f"| {g['mixture']} | {g['size']} | {g['algo']} | {g['kl_coef']:g} | "
            f"{_steps(g['steps_to_threshold'])} | {100 * gain['mean']:+.0f} "
            f"[{100 * gain['min']:+.0f}, {100 * gain['max']:+.0f}] |"
        )
    return lines


def write(workdir: str, config: Any, grid: Sequence[Any]) -> str:
    """`results.json`, the figures and `report.md`; returns the report's path."""
    threshold = config.grid.share_threshold
    transfer = list(config.get("transfer", {}))
    records = [cell_result(workdir, cell, threshold, transfer) for cell in grid]
    grouped = groups(records)
    write_json(
        os.path.join(workdir, "results.json"),
        {"threshold": threshold, "cells": records, "groups": grouped},
    )
    finished = sum(r["finished"] for r in records)
    failed = [r["name"] for r in records if r["failed"] and not r["finished"]]
    lines = [
        f"# Experiment grid `{config.variant}`",
        "",
        f"{finished} of {len(records)} cells finished"
        + (f"; failed: {', '.join(failed)}" if failed else "")
        + ". Style shares are of the sampled completions; the dominant style is the largest "
        "sampled share after RL. STUDIES.md A states the claims.",
        "",
    ]
    if grouped:
        lines += _tables(grouped, threshold)
    for path in (
        plot_trajectories(workdir, records, threshold),
        plot_before_after(workdir, grouped),
        plot_gain_vs_tinygsm(workdir, grouped),
    ):
        if path:
            lines += ["", f"![{os.path.basename(path)}]({os.path.relpath(path, workdir)})"]
    path = os.path.join(workdir, "report.md")
    with open(path + ".tmp", "w") as f:  # shards may write it at once: each whole
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)
    return path
