"""Training data path vs model step: images/s with and without the image cache.

    nice -n 10 python benchmarks/data_loading.py                      # default preset, clip
    nice -n 10 python benchmarks/data_loading.py --batches 20 --model-steps 5 --method ours

Times the pretraining data path exactly as ``fundus_lab.train`` builds it
(``open_training_data``: the training split with augmentation, a DataLoader with
``data.num_workers`` workers and the trainer's collate), once decoding every PNG
(``data.image_cache=false``) and once from the memory-mapped uint8 cache
(``data.image_cache=true``; the one-off build time is printed apart), beside the model-only
rate of ``benchmarks/train_throughput.py`` (a fixed in-memory batch through the trainer's
``train_step``).

With ``num_workers = 0`` (the default preset) loading and the step run one after the
other, so the end-to-end rate is ``1 / (1 / data + 1 / model)``; the target is
end-to-end >= 95 % of model-only, i.e. the data path at least ~19x faster than the model.
On a shared machine run it when the cores are idle: both rates scale with load.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def measure_data(cfg, batches: int, warmup: int = 2) -> dict:
    """images/s of ``batches`` batches from the trainer's own data path after ``warmup``."""
    import torch
    from torch.utils.data import DataLoader

    from fundus_lab import train as T

    t0 = time.perf_counter()
    ds = T.open_training_data(cfg)
    open_s = time.perf_counter() - t0
    loader = DataLoader(ds, batch_size=cfg.train.batch_size, shuffle=True, num_workers=cfg.data.num_workers,
                        collate_fn=T.collate, drop_last=True, generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    n = 0
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        n += len(batch["image"])
    elapsed = time.perf_counter() - start
    return {"images_per_s": n / elapsed, "open_s": open_s, "images": len(ds)}


def main(argv=None) -> list[dict]:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="default")
    p.add_argument("--method", default="clip")
    p.add_argument("--batches", type=int, default=30, help="timed data batches per setting")
    p.add_argument("--model-steps", type=int, default=5, help="timed model-only steps (0: skip)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.num_workers=1")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from fundus_lab.config import load_config

    rows = []
    for cache in (False, True):
        cfg = load_config(preset=args.preset, method=args.method,
                          overrides=[*args.overrides, f"data.image_cache={str(cache).lower()}"])
        r = measure_data(cfg, args.batches)
        rows.append({"setting": "image cache" if cache else "decode PNG", **r})
        print(f"data path, {rows[-1]['setting']}: {r['images_per_s']:.0f} images/s "
              f"(open {r['open_s']:.1f} s incl. any cache build; {r['images']} images)", flush=True)
    model = None
    if args.model_steps:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from train_throughput import measure

        model = measure(args.preset, args.method, args.model_steps, 1, list(args.overrides))["images_per_s"]
    print(f"\npreset={args.preset} method={args.method} batch={cfg.train.batch_size} "
          f"num_workers={cfg.data.num_workers} threads={args.threads}")
    print("| data path | data images/s | model-only images/s | end-to-end images/s | end-to-end / model-only |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        if model:
            e2e = 1.0 / (1.0 / r["images_per_s"] + 1.0 / model)
            r.update(model_images_per_s=model, e2e_images_per_s=e2e, ratio=e2e / model)
            print(f"| {r['setting']} | {r['images_per_s']:.0f} | {model:.1f} | {e2e:.1f} | {100 * r['ratio']:.1f} % |")
        else:
            print(f"| {r['setting']} | {r['images_per_s']:.0f} | - | - | - |")
    return rows


if __name__ == "__main__":
    main()
