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

``--augment`` times the training augmentation alone, ``fundus_lab.data.images.augment`` (one
``affine_grid``/``grid_sample`` warp of image and FOV mask, one gain on all channels) beside
the closest ``torchvision.transforms.v2`` pipeline (``RandomAffine`` + ``RandomHorizontalFlip``
on the image and its ``Mask``, ``ColorJitter``, ``adjust_gamma``), per image as the dataset
calls it, old and new repetitions interleaved, with the load average before and after
(docs/fidelity.md, "Hand code kept").

    nice -n 10 python benchmarks/data_loading.py --augment --image-size 128 --images 200 --reps 5
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import v2

from fundus_lab import train as T
from fundus_lab.config import load_config
from fundus_lab.data import collate
from fundus_lab.data.images import augment


def measure_data(cfg, batches: int, warmup: int = 2) -> dict:
    """images/s of ``batches`` batches from the trainer's own data path after ``warmup``."""
    t0 = time.perf_counter()
    ds = T.open_training_data(cfg)
    open_s = time.perf_counter() - t0
    loader = DataLoader(ds, batch_size=cfg.train.batch_size, shuffle=True, num_workers=cfg.data.num_workers,
                        collate_fn=collate, drop_last=True, generator=torch.Generator().manual_seed(0))
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


def torchvision_augment(rotation: float = 15.0, scale: tuple[float, float] = (1.0, 1.12), shift: float = 0.03,
                        brightness: float = 0.15, contrast: float = 0.15, gamma: float = 0.15):
    """The nearest ``torchvision.transforms.v2`` pipeline to :func:`fundus_lab.data.images.augment`
    with its defaults: the FOV mask warped with the image (as a ``Mask``: nearest, not bilinear
    then thresholded), integer-pixel shifts, contrast about the whole image's grey mean (not the
    FOV's), gamma drawn apart; the background re-blackened with the warped mask."""
    geometry = v2.Compose([v2.RandomAffine(degrees=rotation, translate=(shift, shift), scale=scale,
                                           interpolation=v2.InterpolationMode.BILINEAR),
                           v2.RandomHorizontalFlip()])
    photometric = v2.ColorJitter(brightness=brightness, contrast=contrast)

    def run(x: torch.Tensor) -> torch.Tensor:
        mask = tv_tensors.Mask(x.mean(0, keepdim=True) > 0.04)
        img, m = geometry(tv_tensors.Image(x), mask)
        img = photometric(img)
        img = v2.functional.adjust_gamma(img, float(torch.empty(()).uniform_(1 - gamma, 1 + gamma)))
        return img.as_subclass(torch.Tensor) * m.as_subclass(torch.Tensor)

    return run


def compare_augment(image_size: int, images: int, reps: int, seed: int = 0) -> dict:
    """ms per image of the hand augmentation and the torchvision one, ``reps`` interleaved rounds
    over the same ``images`` prepared fundus-like tensors (a bright disc on black)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, image_size), torch.linspace(-1, 1, image_size), indexing="ij")
    disc = ((xx ** 2 + yy ** 2) < 0.9).float()
    batch = [(0.2 + 0.6 * torch.rand(3, image_size, image_size, generator=g)) * disc for _ in range(images)]
    candidates = {"hand (affine_grid + jitter)": augment, "torchvision.transforms.v2": torchvision_augment()}
    for fn in candidates.values():  # warm up allocator and kernels
        fn(batch[0])
    times = {name: [] for name in candidates}
    load_before = os.getloadavg()
    for _ in range(reps):
        for name, fn in candidates.items():
            start = time.perf_counter()
            for x in batch:
                fn(x)
            times[name].append(1000 * (time.perf_counter() - start) / images)
    return {"image_size": image_size, "images": images, "ms_per_image": times,
            "load_before": load_before, "load_after": os.getloadavg()}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="default")
    p.add_argument("--method", default="clip")
    p.add_argument("--batches", type=int, default=30, help="timed data batches per setting")
    p.add_argument("--model-steps", type=int, default=5, help="timed model-only steps (0: skip)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--augment", action="store_true", help="time only the augmentation, hand code vs torchvision v2")
    p.add_argument("--image-size", type=int, default=128, help="--augment: side of the prepared images")
    p.add_argument("--images", type=int, default=200, help="--augment: images per round")
    p.add_argument("--reps", type=int, default=5, help="--augment: interleaved rounds of each")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.num_workers=1")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.augment:
        r = compare_augment(args.image_size, args.images, args.reps)
        print(f"augmentation, {args.image_size}x{args.image_size}, {args.images} images x {args.reps} interleaved rounds, "
              f"threads={args.threads}, load average {r['load_before'][0]:.2f} -> {r['load_after'][0]:.2f}")
        print("| augmentation | ms/image, median | min | max |")
        print("|---|---:|---:|---:|")
        for name, ms in r["ms_per_image"].items():
            print(f"| {name} | {sorted(ms)[len(ms) // 2]:.3f} | {min(ms):.3f} | {max(ms):.3f} |")
        return [r]

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
