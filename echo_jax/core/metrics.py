"""Metric writers (metrics.jsonl + TensorBoard) and progress output."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath
from tensorboardX import SummaryWriter

from echo_jax.core.files import read_jsonl


def _scalar(value: Any) -> float | int:
    value = np.asarray(value).item()
    return value if isinstance(value, int) else float(value)


class MetricWriter:
    """Writes one JSON object per logged step to `workdir/metrics.jsonl` and the same scalars to
    TensorBoard event files in `workdir/tensorboard`.

    On resume from step S the rows logged after S by the interrupted run are dropped, so the file
    always describes one consistent run; without a resume step (a fresh run) every row is.
    """

    def __init__(self, workdir: str, resume_step: int | None = None, enabled: bool = True):
        self.enabled = enabled
        self.path = epath.Path(workdir) / "metrics.jsonl"
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = [
            r
            for r in read_jsonl(self.path, repair=True)
            if resume_step is not None and r.get("step", 0) <= resume_step
        ]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        # events at steps >= purge_step are hidden: the rows after the resume step (all on a
        # fresh run), not the resume step's own
        purge = 0 if resume_step is None else resume_step + 1
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge)

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        row = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            for key, value in row.items():
                if key != "step" and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
        return row

    def close(self) -> None:
        if self.enabled:
            self._tb.close()


class Progress:
    """One progress line per log step: step, a few metrics, steps/s, tokens/s and ETA.

    A line per log step (rather than a carriage-return bar) reads well both in a terminal and in
    a log file on a TPU VM or in CI.
    """

    def __init__(
        self,
        total_steps: int,
        start_step: int,
        tokens_per_step: int = 0,
        label: str = "train",
        stream=sys.stderr,
    ):
        self.total, self.tokens_per_step, self.label, self.stream = (
            total_steps,
            tokens_per_step,
            label,
            stream,
        )
        self._last_step, self._last_time = start_step, time.perf_counter()

    def rates(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        steps_per_s = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        rates = {"perf/steps_per_s": steps_per_s}
        if self.tokens_per_step:
            rates["perf/tokens_per_s"] = steps_per_s * self.tokens_per_step
        return rates

    def show(self, step: int, row: Mapping[str, Any]) -> None:
        shown = [
            f"{k}={v:.4g}"
            for k, v in row.items()
            if k != "step" and not k.startswith("perf/") and isinstance(v, float)
        ][:6]
        line = f"[{self.label}] step {step}/{self.total} {100 * step / self.total:5.1f}% | "
        line += " ".join(shown)
        if "perf/steps_per_s" in row:
            steps_per_s = row["perf/steps_per_s"]
            eta = (self.total - step) / steps_per_s if steps_per_s > 0 else float("nan")
            line += f" | {steps_per_s:.2f} steps/s"
            if "perf/tokens_per_s" in row:
                line += f", {row['perf/tokens_per_s']:,.0f} tok/s"
            line += f" | eta {_duration(eta)}"
        print(line, file=self.stream, flush=True)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"
