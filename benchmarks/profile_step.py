"""Where a pretraining step spends its time on XLA:CPU, by part of the model.

Traces the production train step (`benchmarks/pretrain.py`'s `production_step`) with
`jax.profiler`, reads each XLA op's duration on the worker thread that ran it, and groups the ops
by the model part their HLO metadata names (attention core, q/k/v projections, MLP, ...) and by
forward/backward. For matmuls it also gives the FLOPs (from the optimised HLO's dot shapes) and
the rate each part's matmuls ran at inside the step. A diagnostic, not a benchmark: this is how
benchmarks/RESULTS.md found the slow attention-gradient contractions. Needs the `bench` extra and
TensorFlow's XPlane protos (installed with seqio).

    python benchmarks/profile_step.py [--variant tiny] [--steps 3] [--set model.attention_block=0]

Prints a table and writes benchmarks/results/profile_step_<variant>.json.

Times are thread-milliseconds per step: an op's duration on its own thread, which includes
waiting for helpers when it runs in parallel, and leaves out the helper thread's share. The
column totals can therefore differ from wall time x threads; compare parts with each other.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import math
import pathlib
import re
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# First: its malloc settings (echo_jax/core/host.py) must precede any thread that allocates.
import echo_jax  # noqa: E402,F401,I001
import jax  # noqa: E402

from benchmarks.pretrain import production_step, time_steps  # noqa: E402
from echo_jax.core.config import load_config  # noqa: E402
from echo_jax.lm import pretrain  # noqa: E402

# Model parts by a substring of the op's HLO metadata, first match wins.
PARTS = (
    ("smear", "smeared keys"),
    ("attn/BLD,DHK", "q/k/v projections"),
    ("/attn/dot_general", "q/k/v projections"),  # lm/cpu/dense.py's `project` (x @ w)
    ("BLHK,HKD", "attention output projection"),
    ("/attn/", "attention core (RoPE, scores, softmax)"),
    ("/mlp/", "MLP"),
    ("_norm", "norms"),
    ("BLD,VD", "logits + loss"),
    ("BLD,DV", "logits + loss"),
    ("jvp(loss)", "logits + loss"),
    ("log_softmax", "logits + loss"),
    ("take_along_axis", "logits + loss"),
)
# An instruction: its name, its array shape's dims (None for a tuple, e.g. a custom call's), its
# opcode and the rest of the line.
_INSTRUCTION = re.compile(
    r"\s*(?:ROOT )?%([\w.\-]+) = (?:\w+\[([\d,]*)\]\S*|\(.*?\)) (\w[\w\-]*)\((.*)"
)


def parse_hlo(text: str) -> dict[str, tuple[str, float]]:
    """Per instruction of the optimised HLO: its op_name metadata and the FLOPs of its dots (its
    own for a dot, those of the computation it calls for a fusion)."""
    shapes, metadata, own_flops, called_by = {}, {}, {}, {}
    computation_flops = collections.Counter()
    computation = None
    for line in text.splitlines():
        header = re.match(r"^(?:ENTRY )?%([\w.\-]+) ", line)
        if header:
            computation = header.group(1)
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, dims, opcode, rest = match.groups()
        shape = [int(d) for d in (dims or "").split(",") if d]
        shapes[computation, name] = shape
        op_name = re.search(r'op_name="([^"]+)"', rest)
        metadata[name] = op_name.group(1) if op_name else ""
        called = re.search(r"calls=%([\w.\-]+)", rest)
        if called:
            called_by[name] = called.group(1)
        if opcode == "dot":
            lhs = re.match(r"%([\w.\-]+)", rest).group(1)
            contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
            flops = (
                2.0
                * math.prod(shape)
                * math.prod(
                    shapes[computation, lhs][int(d)]
                    for d in (contracting.group(1).split(",") if contracting else ())
                    if d
                )
            )
            own_flops[name] = flops
            computation_flops[computation] += flops
    return {
        name: (op_name, own_flops.get(name) or computation_flops.get(called_by.get(name), 0.0))
        for name, op_name in metadata.items()
    }


def op_durations_ms(trace_dir: str) -> collections.Counter:
    """Total duration of each XLA op on the XLA:CPU worker threads, in ms."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2  # TensorFlow comes with seqio.

    space = xplane_pb2.XSpace()
    with open(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0], "rb") as f:
        space.ParseFromString(f.read())
    durations = collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLAEigen"):
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if "::" not in name and not name.startswith("end:"):  # runtime bookkeeping
                    durations[name] += event.duration_ps / 1e9
    if not durations:
        raise RuntimeError(
            f"no XLA:CPU op events (threads named tf_XLAEigen*) in {trace_dir}: "
            "this jax version's profiler names its threads differently"
        )
    return durations


def part_of(op_name: str) -> tuple[str, str]:
    if "jvp(" not in op_name:
        return "optimizer, loss mean, other", ""
    direction = "backward" if "transpose(jvp(" in op_name else "forward"
    for key, part in PARTS:
        if key in op_name:
            return part, direction
    return "residual stream, embedding", direction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="tiny")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], help="config override a.b=v")
    args = parser.parse_args()
    config = load_config(str(REPO / f"configs/lm_pretrain.py:{args.variant}"), args.set)
    step, state, batch, mesh = production_step(config)
    tokens = config.train.batch_size * config.data.seq_len
    with jax.set_mesh(mesh):
        # The very executable that is traced, so its HLO names the ops in the trace.
        compiled = step.lower(state, batch, jax.random.key(0)).compile()
        step_s, state = time_steps(compiled, state, batch, args.steps)
        with tempfile.TemporaryDirectory() as trace_dir:
            with jax.profiler.trace(trace_dir):
                time_steps(compiled, state, batch, args.steps, warmup=0)
            durations = op_durations_ms(trace_dir)
    hlo = parse_hlo(compiled.as_text())
    step_ms = step_s * 1e3
    rows = collections.defaultdict(lambda: {"matmul_ms": 0.0, "matmul_gflop": 0.0, "other_ms": 0.0})
    for op, total_ms in durations.items():
        op_name, op_flops = hlo.get(op, ("", 0.0))
        row = rows[part_of(op_name)]
        if op_flops:
            row["matmul_ms"] += total_ms / args.steps
            row["matmul_gflop"] += op_flops / 1e9
        else:
            row["other_ms"] += total_ms / args.steps
    model_gflop = (
        pretrain.flops_per_token(pretrain.model_config(config), config.data.seq_len) * tokens / 1e9
    )
    print(
        f"{args.variant}: {step_ms:.1f} ms per step, {tokens / step_ms * 1e3:,.0f} tokens/s, "
        f"{model_gflop:.1f} model GFLOP per step (PaLM count), {sys.argv[1:]}\n"
    )
    print(
        "| part | pass | matmul thread-ms | matmul GFLOP | matmul GFLOP/s in the step "
        "| other thread-ms |"
    )
    print("|---|---|---|---|---|---|")
    table = []
    for (part, direction), row in sorted(
        rows.items(), key=lambda kv: -sum((kv[1]["matmul_ms"], kv[1]["other_ms"]))
    ):
        rate = row["matmul_gflop"] / row["matmul_ms"] * 1e3 if row["matmul_ms"] else None
        table.append({"part": part, "pass": direction, **row, "matmul_gflops": rate})
        print(
            f"| {part} | {direction} | {row['matmul_ms']:.1f} | {row['matmul_gflop']:.2f} | "
            f"{'' if rate is None else f'{rate:.0f}'} | {row['other_ms']:.1f} |"
        )
    out = REPO / "benchmarks" / "results" / f"profile_step_{args.variant}.json"
    out.write_text(
        json.dumps(
            {
                "variant": args.variant,
                "overrides": args.set,
                "step_ms": step_ms,
                "model_gflop_per_step": model_gflop,
                "jax": jax.__version__,
                "rows": table,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
