"""A finished run's key figures as small PNGs, for the README and for readers on the web.

    python -m fundus_lab.key_figures runs/latest results/default/figures
    fl.key_figures.export_key_figures("runs/latest", "results/default/figures")

The committed notebooks are stored without outputs, so a reader on the web sees no picture;
these five files are what the README shows:

    attention_lesions.png   attention rollout beside the generator's lesion masks
    reconstruction.png      masked reconstruction at 25 / 50 / 75 % masking
    umap.png                image and report embeddings by disease and camera
    few_shot.png            the few-shot score over k labelled images per class
    table1.png              Table 1 as bars with their 95 % CIs

Everything is read from the run folder through the same :class:`~fundus_lab.experiment.Run`
the notebooks use (its preset, data and methods from ``parameters.json``). Nothing is
trained: a missing checkpoint raises :class:`fundus_lab.experiment.CheckpointMissing`, and the
evaluations are the cached ones the notebooks made. Each PNG is drawn at a low dpi and
stored with an adaptive palette, so five together stay at a few hundred KB.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image

from fundus_lab import model_viz, viz
from fundus_lab.data import text_source
from fundus_lab.eval import explain
from fundus_lab.config import resolve_path
from fundus_lab.eval.tables import long_format
from fundus_lab.experiment import LATEST, CheckpointMissing, Run, latest_run, shot_curve_rows
from fundus_lab.experiment.table import CURVE_HEADS

KEY_FIGURES = ("attention_lesions", "reconstruction", "umap", "few_shot", "table1")
MASK_RATIOS = (0.25, 0.5, 0.75)
DIFFUSE_SHARE = explain.DIFFUSE_SHARE  # a lesion mask over more of the image than this is diffuse, not a place


def save_small_png(fig, path: Path, dpi: int = 72, colors: int = 128) -> Path:
    """``fig`` as a PNG with an adaptive palette of ``colors`` (plots and overlays survive;
    the file is several times smaller than a true-colour one)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    buffer.seek(0)
    image = Image.open(buffer).convert("RGB")
    image.quantize(colors=colors, method=Image.Quantize.MEDIANCUT).save(path, format="PNG", optimize=True)
    return path


def _attention_beside_lesions(ctx, method: str, n_images: int):
    """Per image: the photograph, its lesion masks in colour, the attention rollout of ``method``."""
    model = ctx.model(method)
    ds = ctx.dataset("synth-odir", split="test")  # the task whose images carry lesion masks (as notebook 02)
    picked = focal_lesion_images(ds)[:n_images]
    if not picked:
        raise ValueError(f"{ds.root}: no test image with a lesion mask; the attention figure needs one")
    images = torch.stack([ds[i]["image"] for i in picked])
    maps = explain.attention_explanations(model, images)["rollout"]  # [N, H, W]
    fig, axes = viz._new_figure(len(picked), 3, cell=(2.2, 2.2))
    for row, i in enumerate(picked):
        image = viz.to_hwc(images[row])
        masks = explain.load_record_masks(ds, ds.records[i])
        lesion = np.zeros(image.shape[:2])
        names = []
        for k, (name, mask) in enumerate(sorted(masks.items()), 1):
            if mask.any():
                lesion = np.where(_resize_mask(mask, image.shape[:2]), k, lesion)
                names.append(name)
        shown = np.ma.masked_where(lesion == 0, lesion)
        model_viz._overlay(axes[row, 0], image, None, "image" if row == 0 else None)
        axes[row, 1].imshow(image)
        axes[row, 1].imshow(shown, cmap="tab10", alpha=0.8, vmin=0, vmax=10, interpolation="nearest")
        axes[row, 1].set_title(", ".join(names)[:40], fontsize=7)
        axes[row, 1].set_axis_off()
        model_viz._overlay(axes[row, 2], image, maps[row], f"{method}: attention rollout" if row == 0 else None)
    return fig


def focal_lesion_images(ds, max_share: float = DIFFUSE_SHARE) -> list[int]:
    """The records of :func:`explain.lesion_images` whose lesions are focal first: a mask over
    most of the fundus (media opacity covers it all) says nothing beside an attention map, so
    images whose every lesion mask covers at most ``max_share`` of the image lead, the rest
    follow in record order."""
    focal, diffuse = [], []
    for i in explain.lesion_images(ds):
        masks = [m for m in explain.load_record_masks(ds, ds.records[i]).values() if m.any()]
        (focal if all(m.mean() <= max_share for m in masks) else diffuse).append(i)
    return focal + diffuse


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if mask.shape == tuple(size):
        return mask
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size[::-1], Image.NEAREST)) > 0


def _reconstruction(ctx, method: str):
    model = ctx.model(method)
    if "reconstruction" not in model.capabilities:
        raise ValueError(f"{method} has no pixel decoder: pick a method with reconstruction (e.g. ours) for this figure")
    ds = ctx.dataset("synth-odir", split="test")
    picked = (focal_lesion_images(ds) or [0])[:1]
    images = torch.stack([ds[i]["image"] for i in picked])
    texts = text_source.paired_texts(ds, picked, ctx.config(method).data.text_source)
    with torch.no_grad():
        results = {r: model.reconstruct(images, r, texts=texts) for r in MASK_RATIOS}
    return model_viz.plot_reconstruction(images, results, model.model_cfg.patch_size)


def _umap(ctx, methods: Sequence[str], max_items: int):
    ds = ctx.dataset("synth-fives", split="all")
    embeddings = {m: viz.dataset_embeddings(ctx.model(m), ds, max_items=max_items) for m in methods}
    meta = next(iter(embeddings.values()))["meta"]
    return viz.plot_embeddings(embeddings, meta, color_by=("disease", "camera"))


def _few_shot(ctx, methods: Sequence[str]):
    """The k-shot curves notebook 05 draws: few-shot fine-tuning, the linear probe and the
    prompt head, from the run's cached evaluations."""
    rows = []
    for m in methods:
        rows += shot_curve_rows(m, {p: [ctx.evaluate(m, p)] for p in ("few_shot", "linear_probe")})
    if not rows:
        raise ValueError(f"{ctx.run_dir}: no few-shot evaluation of {list(methods)} to plot")
    curves = pd.DataFrame(rows)
    curves["head"] = curves["head"].map({h: label for _, h, label in CURVE_HEADS}).fillna(curves["head"])
    return viz.plot_shot_curves(curves, hue="model", facet="head")


def _table1(run_dir: Path):
    csv, results = run_dir / "table1.csv", run_dir / "results.json"
    for path in (csv, results):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: Table 1 is written by notebook 07 (make reproduce)")
    headers = json.loads(results.read_text()).get("headers")
    if not isinstance(headers, dict):
        raise ValueError(f"{results}: field 'headers' must map Table 1's columns to their titles")
    long = long_format(csv, headers)
    # one panel per protocol, its two test columns side by side: compact, and the pairs read across
    split = long["column"].str.rsplit(", ", n=1)
    long["protocol"], long["test"] = split.str[0], split.str[-1]
    return viz.plot_comparison(long, error=("ci_low", "ci_high"), group="test", hue="method", facet="protocol")


def export_key_figures(run_dir: str | Path, out_dir: str | Path, method: str = "ours", n_images: int = 3,
                       max_items: int = 200, dpi: int = 72, colors: int = 128) -> dict[str, Path]:
    """Write the run's :data:`KEY_FIGURES` as ``out_dir/<name>.png``; returns {name: path}.

    Args:
        run_dir: a finished run folder (``runs/<name>``, or ``runs/latest``).
        out_dir: where the PNGs go (``results/default/figures`` for the default run).
        method: the method whose attention and reconstruction are shown.
        n_images: images in the attention figure.
        max_items: images per method in the UMAP.
        dpi, colors: resolution and palette size of the PNGs (their size in bytes).
    """
    run_dir = Path(run_dir)
    if run_dir.name == LATEST and not run_dir.is_dir():  # the runs/latest pointer file
        run_dir = latest_run(run_dir)
        if run_dir is None:
            raise FileNotFoundError("runs/latest does not exist yet: `make reproduce` writes it")
    run_dir = resolve_path(run_dir)
    if not (run_dir / "parameters.json").is_file():
        raise FileNotFoundError(f"{run_dir}/parameters.json does not exist: export_key_figures reads a run folder "
                                "written by fundus-lab reproduce")
    ctx = Run(run_dir=run_dir, notebook="key_figures")
    methods = list(ctx.methods)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    draw = {
        "attention_lesions": lambda: _attention_beside_lesions(ctx, method, n_images),
        "reconstruction": lambda: _reconstruction(ctx, method),
        "umap": lambda: _umap(ctx, methods, max_items),
        "few_shot": lambda: _few_shot(ctx, methods),
        "table1": lambda: _table1(run_dir),
    }
    written = {}
    for name in KEY_FIGURES:
        written[name] = save_small_png(draw[name](), out / f"{name}.png", dpi=dpi, colors=colors)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fundus_lab.key_figures RUN_DIR OUT_DIR``: the README's figures of a finished run."""
    parser = argparse.ArgumentParser(prog="python -m fundus_lab.key_figures", description=main.__doc__)
    parser.add_argument("run_dir", help="a finished run folder, or runs/latest")
    parser.add_argument("out_dir", help="where the PNGs go, e.g. results/default/figures")
    parser.add_argument("--method", default="ours", help="whose attention and reconstruction are shown")
    args = parser.parse_args(argv)
    try:
        written = export_key_figures(args.run_dir, args.out_dir, method=args.method)
    except (CheckpointMissing, FileNotFoundError, ValueError) as err:
        print(f"key_figures: {err}", file=sys.stderr)
        return 1
    for name, path in written.items():
        print(f"{path} ({path.stat().st_size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
