"""Is the synthetic benchmark learnable at a budget? Pixels vs a supervised ViT, per task.

    nice -n 10 python benchmarks/learnability.py --preset default            # val split
    nice -n 10 python benchmarks/learnability.py --lesion-scale 1 --camera-shift 1 --steps 300
    nice -n 10 python benchmarks/learnability.py --eval-split test           # report once

For each synthetic eval task (odir: the single-label eyes as an 8-class problem, the
accuracy the eval reports for zero-shot ODIR; fives: 4-class accuracy; aptos: quadratic
weighted kappa of the 5 grades) it prints, on the chosen evaluation split and on the
held-out camera (``test_camera``):

- ``pixels``: a logistic regression on downsampled pixels (C chosen on ``val``);
- ``supervised``: the preset's ViT trained from scratch on the task's train split for a
  fixed number of steps (AdamW, warm-up + cosine, flips), scored once at the end.

Before that it prints the distribution of lesion sizes in pixels at the working
resolution per task (``synth.lesions.lesion_sizes``). Parameters are chosen on ``val``;
``--eval-split test`` is for reporting the final setting once. The generator settings
come from the preset's data section unless given on the command line, and datasets are
written (or reused when up to date) under ``--root``.

Measured 2026-11-30 on the shared 2-core CPU (load 5-7), n=2000 per task rendered at 128 px,
pixels = 16x16x3 logistic regression, supervised = ``--arch cnn --steps 300 --lr 2e-3``
(the default ViT ran at ~10 s per 32-image step there, too slow to train to a budget):

    setting                      split        pixels odir/fives/aptos   CNN odir/fives/aptos
    realistic (1.0, 1.0, 1.0)    val          .624 / .681 / .357        .594 / .830* / .910*
                                 test_camera  .235 / .470 / .056        .099 / .673* / .663*
    calibrated (2.5, 1.5, 0.5)   val          .667 / .731 / .692        .745 / .967* / .957*
                                 test_camera  .310 / .668 / .000        .610 / .904* / .895*
    calibrated, reported once    test         .593 / .751 / .673        .769 / .956  / .955
                                 test_camera  .310 / .668 / .000        .610 / .788  / .917
    (* class-balanced loss; odir/fives accuracy, aptos quadratic kappa)
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fundus_lab.data import open_dataset
from fundus_lab.data.synth import generate
from fundus_lab.data.synth.lesions import lesion_size_table, lesion_sizes
from fundus_lab.eval.metrics import accuracy, quadratic_weighted_kappa

TASKS = ("odir", "fives", "aptos")


def metric_of(task: str):
    """(name, fn(y_true, probs)) of the figure the lead's targets are stated in."""
    if task == "aptos":
        return "kappa", lambda y, p: quadratic_weighted_kappa(y, p.argmax(1), n_classes=p.shape[1])
    return "acc", lambda y, p: accuracy(y, p.argmax(1))


def load_split(manifest: Path, task: str, split: str, size: int, cache: bool) -> tuple[torch.Tensor, np.ndarray]:
    """All images of one split as uint8 [N, 3, S, S] and integer labels [N]."""
    kwargs = {"image_cache": True} if cache else {}
    ds = open_dataset(manifest, split=split, image_size=size, **kwargs)
    if task == "odir":
        ds = ds.single_label()
    images = torch.stack([(ds.load_image(i, augment=False) * 255).round().to(torch.uint8) for i in range(len(ds))])
    return images, np.asarray([r.label for r in ds.records], dtype=np.int64)


def pixel_probe(data: dict, task: str, pixels: int) -> dict[str, float]:
    """Logistic regression on ``pixels`` x ``pixels`` x 3 area-downsampled images."""
    from fundus_lab.eval.probe import fit_probe

    def feats(x):
        x = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, pixels)
        return x.flatten(1).numpy()

    xtr, ytr = feats(data["train"][0]), data["train"][1]
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    n_classes = int(max(y.max() for _, y in data.values())) + 1
    probe, _ = fit_probe((xtr - mu) / sd, ytr, (feats(data["val"][0]) - mu) / sd, data["val"][1], "multiclass", n_classes)
    _, fn = metric_of(task)
    return {s: fn(y, probe.predict_proba((feats(x) - mu) / sd)) for s, (x, y) in data.items() if s != "train"}


class Supervised(nn.Module):
    def __init__(self, vit: nn.Module, n_classes: int):
        super().__init__()
        self.vit, self.head = vit, nn.Linear(vit.embed_dim, n_classes)

    def forward(self, x):
        return self.head(self.vit(x)["cls"])


def small_cnn(n_classes: int) -> nn.Module:
    """A 4-layer CNN (~0.1 M parameters, ~20x cheaper than the default ViT per image): a
    cheap stand-in that shows whether learnt local features beat pixels when the ViT
    cannot be trained to its budget on the machine at hand."""
    layers, c = [], 3
    for w, k in ((24, 5), (48, 3), (64, 3), (96, 3)):
        layers += [nn.Conv2d(c, w, k, stride=2, padding=k // 2), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        c = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, n_classes))


def supervised(data: dict, task: str, model_cfg, steps: int, batch_size: int, lr: float, seed: int = 0,
               arch: str = "vit", balanced: bool = False) -> dict:
    """The preset's ViT (or ``small_cnn``) from scratch on the train split; metrics on the other splits."""
    from fundus_lab.models.model import build_vision_transformer

    torch.manual_seed(seed)
    x, y = data["train"]
    n_classes = int(max(v.max() for _, v in data.values())) + 1
    net = Supervised(build_vision_transformer(model_cfg), n_classes) if arch == "vit" else small_cnn(n_classes)
    decay = [p for n, p in net.named_parameters() if p.ndim > 1 and "token" not in n]
    rest = [p for n, p in net.named_parameters() if not (p.ndim > 1 and "token" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}], lr=lr)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    counts = np.bincount(y, minlength=n_classes)
    # class-balanced weights trade plain accuracy (the odir/fives targets) for balanced accuracy
    weight = torch.tensor(len(y) / np.maximum(counts, 1) / n_classes, dtype=torch.float32) if balanced else None
    g = torch.Generator().manual_seed(seed)
    net.train()
    t0, losses = time.time(), []
    for step in range(steps):
        idx = torch.randint(len(x), (batch_size,), generator=g)
        xb = x[idx].float() / 255
        flip = torch.rand(batch_size, generator=g) < 0.5
        xb[flip] = xb[flip].flip(-1)
        loss = nn.functional.cross_entropy(net(xb), torch.as_tensor(y[idx.numpy()]), weight=weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    seconds = time.time() - t0
    net.eval()
    _, fn = metric_of(task)
    out = {"seconds": seconds, "loss": float(np.mean(losses[-20:]))}
    with torch.no_grad():
        for s, (xs, ys) in data.items():
            if s == "train":
                continue
            probs = torch.cat([net(xs[i:i + 128].float() / 255).softmax(-1) for i in range(0, len(xs), 128)]).numpy()
            out[s] = fn(ys, probs)
    return out


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="default")
    p.add_argument("--root", default="/tmp/learnability", help="where the datasets are written (reused when up to date)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--n", type=int, help="images per eval task (default: the preset's data.synth_eval_n)")
    p.add_argument("--synth-size", type=int, help="generation size (default: the preset's data.synth_image_size)")
    p.add_argument("--lesion-scale", type=float)
    p.add_argument("--lesion-contrast", type=float)
    p.add_argument("--camera-shift", type=float)
    p.add_argument("--steps", type=int, default=300, help="supervised optimizer steps (0: pixels only)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--arch", default="vit", choices=["vit", "cnn"], help="supervised model: the preset's ViT or a small CNN")
    p.add_argument("--balanced", action="store_true", help="class-balanced cross-entropy (default: plain)")
    p.add_argument("--pixels", type=int, default=16, help="side of the downsampled pixel-probe input")
    p.add_argument("--eval-split", default="val", choices=["val", "test"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-cache", action="store_true", help="decode images without the image cache")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from fundus_lab.config import load_config
    cfg = load_config(preset=args.preset)
    d = cfg.data
    n = args.n or d.synth_eval_n
    synth_size = args.synth_size or d.synth_image_size
    calib = {"lesion_scale": args.lesion_scale if args.lesion_scale is not None else getattr(d, "synth_lesion_scale", 1.0),
             "lesion_contrast": args.lesion_contrast if args.lesion_contrast is not None else getattr(d, "synth_lesion_contrast", 1.0),
             "camera_shift": args.camera_shift if args.camera_shift is not None else getattr(d, "synth_camera_shift", 1.0)}
    size = cfg.model.img_size
    tag = f"n{n}-s{synth_size}-ls{calib['lesion_scale']:g}-lc{calib['lesion_contrast']:g}-cs{calib['camera_shift']:g}"
    print(f"preset={args.preset} working size={size}px generated at {synth_size}px n={n} {calib} "
          f"supervised={args.arch} (ViT width={cfg.model.vision_width} depth={cfg.model.vision_depth}) steps={args.steps}x{args.batch_size} "
          f"eval split={args.eval_split}", flush=True)
    rows = []
    for task in args.tasks:
        t0 = time.time()
        out = Path(args.root) / tag / f"synth-{task}"
        manifest = generate(out, task, n=n, seed=d.synth_seed, image_size=synth_size, workers=args.threads, **calib)
        gen_s = time.time() - t0
        print(lesion_size_table(lesion_sizes(out, size, limit=400), f"synth-{task} at {size}px"), flush=True)
        splits = ["train", "val"] + (["test"] if args.eval_split == "test" else []) + ["test_camera"]
        data = {s: load_split(manifest, task, s, size, not args.no_cache) for s in splits}
        name, _ = metric_of(task)
        row = {"task": task, "metric": name, "gen_s": gen_s, "n": {s: len(v[1]) for s, v in data.items()}}
        row["pixels"] = pixel_probe(data, task, args.pixels)
        if args.steps:
            row["supervised"] = supervised(data, task, cfg.model, args.steps, args.batch_size, args.lr, arch=args.arch,
                                           balanced=args.balanced)
        rows.append(row)
        print(f"synth-{task}: n per split {row['n']}; generated in {gen_s:.0f} s"
              + (f"; supervised trained in {row['supervised']['seconds']:.0f} s" if args.steps else ""), flush=True)
    cols = [args.eval_split, "test_camera"]
    print(f"\n| task | metric | pixels {cols[0]} | pixels {cols[1]} | supervised {cols[0]} | supervised {cols[1]} |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        sup = r.get("supervised", {})
        print(f"| synth-{r['task']} | {r['metric']} | {r['pixels'][cols[0]]:.3f} | {r['pixels'][cols[1]]:.3f} | "
              f"{sup.get(cols[0], float('nan')):.3f} | {sup.get(cols[1], float('nan')):.3f} |")
    return rows


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
