"""Two pretraining jobs at one thread each against one job at two threads, side by side.

    python benchmarks/parallel_jobs.py                          # default preset, clip, 2 rounds
    python benchmarks/parallel_jobs.py --method ours --rounds 3 --steps 6

``fundus-lab compare --jobs N`` runs independent (method, seed) pretraining jobs in N
processes of ``cores / N`` threads each. Whether that beats one job at a time on every
core depends on how well the model's matrices (tokens x 192 x 768 at the default preset)
use two threads. This measures it on the trainer's own step
(``benchmarks/train_throughput.py``'s ``measure``: forward, backward, clipping, AdamW on a
fixed in-memory batch): configuration A is one process with ``--cores`` threads;
configuration B is ``--cores`` processes at one thread each, started together, whose img/s
add up. A and B alternate (A B B A ...) so that a drift in the machine's load hits both;
the ratio B / A of each round is printed, and the median of the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _start(method: str, preset: str, steps: int, warmup: int, threads: int, overrides: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, os.path.join(HERE, "train_throughput.py"), "--child", method, "--preset", preset,
           "--steps", str(steps), "--warmup", str(warmup), "--device", "cpu", *overrides]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate()
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"a job failed: {(err.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(lines[-1])


def one_job(method, preset, steps, warmup, cores, overrides) -> float:
    """img/s of one process at ``cores`` threads."""
    return _result(_start(method, preset, steps, warmup, cores, overrides))["images_per_s"]


def parallel_jobs(method, preset, steps, warmup, cores, overrides) -> float:
    """Summed img/s of ``cores`` one-thread processes started together."""
    procs = [_start(method, preset, steps, warmup, 1, overrides) for _ in range(cores)]
    return sum(_result(p)["images_per_s"] for p in procs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="clip")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--cores", type=int, default=2, help="threads of A = processes of B")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per job")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="A B B A pairs; each round gives one ratio")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.batch_size=16")
    args = parser.parse_args(argv)
    if args.cores < 2:
        raise SystemExit(f"--cores {args.cores}: the comparison needs at least 2")
    ratios = []
    start = time.perf_counter()
    for r in range(args.rounds):
        order = ("A", "B") if r % 2 == 0 else ("B", "A")
        got = {}
        for which in order:
            fn = one_job if which == "A" else parallel_jobs
            got[which] = fn(args.method, args.preset, args.steps, args.warmup, args.cores, args.overrides)
        ratios.append(got["B"] / got["A"])
        print(f"round {r + 1} ({' then '.join(order)}): A one job x {args.cores} threads {got['A']:.1f} img/s, "
              f"B {args.cores} jobs x 1 thread {got['B']:.1f} img/s in total, B/A {ratios[-1]:.2f}", flush=True)
    print(f"{args.method} at {args.preset}: B/A median {statistics.median(ratios):.2f} over {len(ratios)} rounds "
          f"({time.perf_counter() - start:.0f} s wall); load average now {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
