"""Synthetic generator throughput: images written per second (PNG + masks + labels.csv).

    python benchmarks/synth_speed.py --n 200 --workers 1 2 --size 224

Prints a Markdown table (workers, images, seconds, images/s, ms per image per worker).
The target is 1,000 images of 224 px in under a minute on 2 cores, i.e. <= ~100 ms per
image per core. Times include process start-up (spawn) for workers > 1, so small n
understates the parallel speed; on a shared machine run it when the cores are idle.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from fundus_lab.data.synth import write_dataset


def measure(task: str, n: int, workers: int, size: int, seed: int = 0) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_dataset(tmp, task, n=n, seed=seed, image_size=size, workers=workers)
        return time.perf_counter() - t0


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="images per run")
    p.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--task", default="odir")
    args = p.parse_args(argv)
    rows = []
    print(f"task={args.task} size={args.size}px cpu_count={os.cpu_count()}")
    print("| workers | images | seconds | images/s | ms/image/worker |")
    print("|---:|---:|---:|---:|---:|")
    for w in args.workers:
        s = measure(args.task, args.n, w, args.size)
        row = {"workers": w, "images": args.n, "seconds": s, "images_per_s": args.n / s,
               "ms_per_image_per_worker": 1000 * s * w / args.n}
        rows.append(row)
        print(f"| {w} | {args.n} | {s:.2f} | {row['images_per_s']:.1f} | {row['ms_per_image_per_worker']:.0f} |")
    return rows


if __name__ == "__main__":
    main()
