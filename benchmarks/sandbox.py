"""Throughput of the fork-server sandbox vs. one fresh interpreter per program.

Runs TinyGSM-style functions (`call="simple_math_problem"`) through `echo_jax.lm.sandbox` and
through ``subprocess.run([sys.executable, "-I", "-c", runner])`` per program, both with the same
concurrency (one worker per CPU). The baseline gets the same rlimits (set by its runner before
the program runs) and an empty environment; it skips the uid drop and namespaces, which a plain
interpreter start cannot do cheaply, so the comparison flatters the baseline.

Usage: python benchmarks/sandbox.py [--pool-programs 500] [--subprocess-programs 200]
Prints a markdown table and writes benchmarks/results/sandbox.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from echo_jax.lm import sandbox

RESULTS = Path(__file__).resolve().parent / "results" / "sandbox.json"
# The baseline's runner: same rlimits as the sandbox child, then exec + call, repr on stdout.
RUNNER = """\
import resource, sys
cpu, mem = int(sys.argv[1]), int(sys.argv[2]) << 20
for lim, val in ((resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_AS, (mem, mem)),
                 (resource.RLIMIT_FSIZE, (16 << 20, 16 << 20)), (resource.RLIMIT_CORE, (0, 0)),
                 (resource.RLIMIT_NOFILE, (128, 128))):
    resource.setrlimit(lim, val)
namespace = {"__name__": "__main__"}
exec(compile(sys.stdin.read(), "<program>", "exec"), namespace)
print(repr(namespace["simple_math_problem"]()))
"""


def tinygsm_program(i: int) -> tuple[str, str]:
    """A short TinyGSM-style solution and the repr of its expected return value."""
    code = (
        "def simple_math_problem() -> int:\n"
        f'    """A shop sells {i % 17 + 2} boxes of {i % 11 + 3} pens; {i % 5} pens are lost."""\n'
        f"    boxes = {i % 17 + 2}\n"
        f"    pens_per_box = {i % 11 + 3}\n"
        f"    lost = {i % 5}\n"
        "    total = boxes * pens_per_box - lost\n"
        "    result = total\n"
        "    return result\n"
    )
    return code, repr((i % 17 + 2) * (i % 11 + 3) - i % 5)


def run_subprocess(code: str, timeout_s: float = 2.0, memory_mb: int = 256) -> str | None:
    proc = subprocess.run(
        [sys.executable, "-I", "-c", RUNNER, str(max(1, int(timeout_s))), str(memory_mb)],
        input=code,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        start_new_session=True,
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


def throughput(run_batch: Callable[[list[str]], list[str | None]], n: int) -> tuple[float, int]:
    """Programs per second over n programs, and how many returned the wrong value."""
    programs = [tinygsm_program(i) for i in range(n)]
    start = time.perf_counter()
    values = run_batch([code for code, _ in programs])
    elapsed = time.perf_counter() - start
    return n / elapsed, sum(v != want for v, (_, want) in zip(values, programs))


def latency_ms(run_one: Callable[[str], str | None], n: int = 30) -> float:
    """Median wall time of one program run alone, in milliseconds."""
    code = tinygsm_program(0)[0]
    times = []
    for _ in range(n):
        start = time.perf_counter()
        run_one(code)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool-programs", type=int, default=500)
    parser.add_argument("--subprocess-programs", type=int, default=200)
    args = parser.parse_args()
    workers = max(2, os.cpu_count() or 1)

    start = time.perf_counter()
    with sandbox.Sandbox(num_workers=workers) as sb:
        startup_s = time.perf_counter() - start
        isolation = sb.isolation()

        def pool_batch(codes: list[str]) -> list[str | None]:
            return [r.value for r in sb.run_many(codes, call="simple_math_problem")]

        pool_batch([tinygsm_program(0)[0]] * workers)  # warm up
        pool_rate, pool_wrong = throughput(pool_batch, args.pool_programs)
        pool_latency = latency_ms(lambda code: sb.run(code, call="simple_math_problem").value)

    def subprocess_batch(codes: list[str]) -> list[str | None]:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            return list(pool.map(run_subprocess, codes))

    sub_rate, sub_wrong = throughput(subprocess_batch, args.subprocess_programs)
    sub_latency = latency_ms(run_subprocess, n=10)
    if pool_wrong or sub_wrong:
        raise SystemExit(f"wrong values: pool {pool_wrong}, subprocess {sub_wrong}")

    print(
        f"| runner ({workers} workers, {os.cpu_count()} CPUs) | programs | programs/s "
        "| median latency (ms) |"
    )
    print("|---|---:|---:|---:|")
    print(f"| fork-server pool | {args.pool_programs} | {pool_rate:.0f} | {pool_latency:.1f} |")
    print(
        f"| subprocess per program | {args.subprocess_programs} | {sub_rate:.0f} "
        f"| {sub_latency:.1f} |"
    )
    print(
        f"| **ratio** | | **{pool_rate / sub_rate:.1f}x** | **{sub_latency / pool_latency:.1f}x** |"
    )
    print(f"\npool start-up {startup_s:.2f} s; isolation: {isolation}")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "workers": workers,
                "cpu_count": os.cpu_count(),
                "python": platform.python_version(),
                "machine": platform.machine(),
                "kernel": platform.release(),
                "pool": {
                    "programs": args.pool_programs,
                    "programs_per_s": pool_rate,
                    "median_latency_ms": pool_latency,
                    "startup_s": startup_s,
                },
                "subprocess": {
                    "programs": args.subprocess_programs,
                    "programs_per_s": sub_rate,
                    "median_latency_ms": sub_latency,
                },
                "speedup": pool_rate / sub_rate,
                "isolation": isolation,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
