"""Figures: datasets, embeddings, training curves, results.

Everything here is a pure function of arrays (numpy or torch) or tables that returns a
:class:`matplotlib.figure.Figure` and, given ``out_dir``, also writes it as PNG and SVG.
Figures are built with the object-oriented API (no pyplot state), so tests and
papermill runs never accumulate open figures; notebooks display the returned figure.

Figures drawn over a fundus image from a model's attention or reconstruction are in
:mod:`fundus_lab.model_viz`; the maps themselves and their scores against lesion masks are
an evaluation and live in :mod:`fundus_lab.eval.explain`. A finished run's key figures for
the README are written by :mod:`fundus_lab.key_figures`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from fundus_lab.eval.explain import load_record_masks, to_numpy, upsample_map
from fundus_lab.eval.zero_shot import has_text_encoder

__all__ = [
    "save_figure",
    "to_hwc",
    "umap_embed",
    "plot_embeddings",
    "plot_training_curves",
    "LiveLossPlot",
    "plot_confusion_matrix",
    "plot_per_class",
    "plot_comparison",
    "record_label_name",
    "plot_fundus_grid",
    "plot_dataset_grid",
    "label_counts",
    "plot_label_distribution",
    "dataset_embeddings",
    "plot_shot_curves",
]


# ---------------------------------------------------------------------------------------
# helpers


def _new_figure(nrows: int, ncols: int, cell: tuple[float, float] = (2.6, 2.6), **kwargs):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(cell[0] * ncols, cell[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes


def save_figure(fig, out_dir: str | Path | None, name: str, formats: Sequence[str] = ("png", "svg"), dpi: int = 120) -> list[Path]:
    """Write ``fig`` as ``out_dir/name.<fmt>`` for each format; nothing when ``out_dir`` is None.

    PNG for the index page and notebooks, SVG for papers (vector, editable).
    """
    if out_dir is None:
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = out / f"{name}.{fmt}"
        fig.savefig(path, format=fmt, dpi=dpi)
        paths.append(path)
    return paths


def to_hwc(image: Any) -> np.ndarray:
    """An image as float ``[H, W, 3]`` in [0, 1] from CHW/HWC, uint8/float, tensor/PIL/array."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        image = np.asarray(image.convert("RGB"))
    arr = to_numpy(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3:
        raise ValueError(f"image: expected [3,H,W] or [H,W,3] (or [H,W]), got shape {arr.shape}")
    if arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = np.moveaxis(arr, 0, -1)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    arr = arr.astype(np.float64)
    if arr.max(initial=0.0) > 1.0 + 1e-6:  # uint8 range
        arr = arr / 255.0
    return np.clip(arr, 0.0, 1.0)


# ---------------------------------------------------------------------------------------
# embeddings


def umap_embed(features: Any, n_neighbors: int = 15, min_dist: float = 0.1, metric: str = "cosine", seed: int = 0) -> np.ndarray:
    """UMAP to 2-D; ``n_neighbors`` is capped at ``n - 1`` so a handful of points still works.

    Spectral initialisation needs more points than a smoke run has; below 16 points a
    random initialisation is used instead.
    """
    import umap

    x = to_numpy(features).astype(np.float32)
    n = x.shape[0]
    if x.ndim != 2 or n < 3:
        raise ValueError(f"umap_embed: need features [N, D] with N >= 3, got shape {x.shape}")
    reducer = umap.UMAP(
        n_components=2,
        n_neighbors=max(2, min(n_neighbors, n - 1)),
        min_dist=min_dist,
        metric=metric,
        random_state=seed,
        init="spectral" if n >= 16 else "random",
        n_jobs=1,
    )
    return reducer.fit_transform(x)


def _colours(values: Sequence[Any]):
    from matplotlib import colormaps

    cats = sorted({str(v) for v in values})
    cmap = colormaps["tab10" if len(cats) <= 10 else "tab20"]
    return {c: cmap(i % cmap.N) for i, c in enumerate(cats)}


def plot_embeddings(
    methods: Mapping[str, Mapping[str, Any]],
    meta: Mapping[str, Sequence[Any]],
    color_by: Sequence[str] = ("disease", "camera", "split"),
    n_neighbors: int = 15,
    seed: int = 0,
    out_dir=None,
    name: str = "embeddings",
):
    """UMAP of image (circles) and text (crosses) embeddings: one column per method, one row per colouring.

    Args:
        methods: method -> ``{"image": [N, D], "text": [N, D] (optional, paired with the images)}``.
            Image and text embeddings of a method are projected together, so their
            distance in the plot reflects the modality gap.
        meta: column -> N values (e.g. a DataFrame with ``disease``, ``camera``, ``split``).
    """
    color_by = [c for c in color_by if c in meta]
    if not color_by:
        raise ValueError(f"plot_embeddings: none of the colourings is in meta (columns: {list(meta)})")
    fig, axes = _new_figure(len(color_by), len(methods), cell=(3.4, 3.2))
    for j, (method, emb) in enumerate(methods.items()):
        img = to_numpy(emb["image"])
        txt = to_numpy(emb["text"]) if emb.get("text") is not None else None
        n = len(img)
        xy = umap_embed(np.concatenate([img, txt]) if txt is not None else img, n_neighbors=n_neighbors, seed=seed)
        for i, col in enumerate(color_by):
            values = [str(v) for v in list(meta[col])]
            if len(values) != n:
                raise ValueError(f"plot_embeddings: meta[{col!r}] has {len(values)} values for {n} images of {method!r}")
            colours = _colours(values)
            ax = axes[i, j]
            for cat, colour in colours.items():
                sel = np.array([v == cat for v in values])
                ax.scatter(xy[:n][sel, 0], xy[:n][sel, 1], s=12, color=colour, label=cat, marker="o", alpha=0.8)
                if txt is not None:
                    ax.scatter(xy[n:][sel, 0], xy[n:][sel, 1], s=14, color=colour, marker="x", alpha=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(method)
            if j == 0:
                ax.set_ylabel(col)
            if j == len(methods) - 1:
                ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    save_figure(fig, out_dir, name)
    return fig


# ---------------------------------------------------------------------------------------
# training curves and results


def _loss_columns(df) -> list[str]:
    return [c for c in df.columns if (c == "loss" or c.endswith("_loss") or c.endswith("/loss")) and df[c].dtype.kind in "fi"]


def plot_training_curves(metrics: Any, keys: Sequence[str] | None = None, x: str = "step", log_y: bool = False, out_dir=None, name: str = "training_curves"):
    """Loss terms against steps from a run's ``metrics.csv`` (path or DataFrame); learning rate beside.

    Rows where a column is empty (e.g. validation logged less often) are skipped per curve.
    """
    import pandas as pd

    df = pd.read_csv(metrics) if isinstance(metrics, (str, Path)) else pd.DataFrame(metrics)
    if x not in df.columns:
        raise ValueError(f"plot_training_curves: {metrics if isinstance(metrics, (str, Path)) else 'metrics'} has no column {x!r} (columns: {list(df.columns)})")
    keys = list(keys) if keys else _loss_columns(df)
    missing = [k for k in keys if k not in df.columns]
    if missing:
        raise ValueError(f"plot_training_curves: no column(s) {missing} in metrics (columns: {list(df.columns)})")
    lr_col = next((c for c in df.columns if c in ("lr", "train/lr", "learning_rate")), None)
    fig, axes = _new_figure(1, 2 if lr_col else 1, cell=(4.5, 3.2))
    ax = axes[0, 0]
    for k in keys:
        d = df[[x, k]].dropna()
        ax.plot(d[x], d[k], label=k, lw=1.2)
    ax.set_xlabel(x)
    ax.set_ylabel("loss")
    if log_y:
        ax.set_yscale("log")
    if keys:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if lr_col:
        d = df[[x, lr_col]].dropna()
        axes[0, 1].plot(d[x], d[lr_col], color="k", lw=1.2)
        axes[0, 1].set_xlabel(x)
        axes[0, 1].set_ylabel("learning rate")
        axes[0, 1].grid(alpha=0.3)
    save_figure(fig, out_dir, name)
    return fig


class LiveLossPlot:
    """Trainer callback ``cb(step, logs)`` that redraws the loss curves in place in a notebook.

    Pass it in ``fl.train.pretrain(cfg, callbacks=[LiveLossPlot()])``. Outside IPython it
    only collects the rows (``.history``), so the same notebook runs headless.
    """

    def __init__(self, keys: Sequence[str] | None = None, every: int = 1):
        self.keys = list(keys) if keys else None
        self.every = max(1, int(every))
        self.history: list[dict] = []
        self._handle = None
        self._calls = 0

    def __call__(self, step: int, logs: Mapping[str, Any]) -> None:
        row = {"step": int(step)}
        for k, v in logs.items():
            try:
                row[k] = float(v)
            except (TypeError, ValueError):
                continue
        self.history.append(row)
        self._calls += 1
        if self._calls % self.every == 0:
            self.show()

    def figure(self):
        import pandas as pd

        return plot_training_curves(pd.DataFrame(self.history), keys=self.keys)

    def show(self):
        try:
            from IPython import get_ipython
            from IPython.display import display
        except ImportError:
            return
        if get_ipython() is None or not self.history:
            return
        fig = self.figure()
        if self._handle is None:
            self._handle = display(fig, display_id=True)
        else:
            self._handle.update(fig)


def plot_confusion_matrix(y_true: Any, y_pred: Any, classes: Sequence[str], normalize: bool = True, out_dir=None, name: str = "confusion_matrix"):
    """Confusion matrix (rows = true class); row-normalised so rare classes are readable."""
    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(to_numpy(y_true), to_numpy(y_pred), labels=list(range(len(classes)))).astype(np.float64)
    shown = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1) if normalize else cm
    k = len(classes)
    fig, axes = _new_figure(1, 1, cell=(0.6 * k + 2.5, 0.6 * k + 2))
    ax = axes[0, 0]
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    for i in range(k):
        for j in range(k):
            text = f"{shown[i, j]:.2f}" if normalize else f"{int(cm[i, j])}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if shown[i, j] > 0.5 * (shown.max() or 1) else "black")
    ax.set_xticks(range(k), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, shrink=0.8)
    save_figure(fig, out_dir, name)
    return fig


def plot_per_class(values: Mapping[str, float] | Mapping[str, Mapping[str, float]], metric: str = "score", errors=None, out_dir=None, name: str = "per_class"):
    """Bars per class; ``values`` is class -> value, or series -> (class -> value) for grouped bars."""
    first = next(iter(values.values()))
    series = values if isinstance(first, Mapping) else {metric: values}
    errors = errors if errors is None or isinstance(next(iter(errors.values())), Mapping) else {metric: errors}
    classes = list(next(iter(series.values())).keys())
    width = 0.8 / len(series)
    fig, axes = _new_figure(1, 1, cell=(max(4.0, 0.7 * len(classes) * max(1, len(series) / 2)), 3.2))
    ax = axes[0, 0]
    x = np.arange(len(classes))
    for s, (label, vals) in enumerate(series.items()):
        err = [errors[label].get(c, 0.0) for c in classes] if errors and label in errors else None
        ax.bar(x + (s - (len(series) - 1) / 2) * width, [vals[c] for c in classes], width, yerr=err, capsize=3, label=label)
    ax.set_xticks(x, classes, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    save_figure(fig, out_dir, name)
    return fig


def plot_comparison(
    table: Any,
    value: str = "mean",
    error: str | tuple[str, str] | None = "std",
    group: str | None = "protocol",
    hue: str = "method",
    facet: str | None = None,
    out_dir=None,
    name: str = "comparison",
):
    """Grouped bar chart with error bars from a long results table (path to CSV or DataFrame).

    One bar per ``hue`` (method) inside each ``group`` (protocol; None: a single group),
    one panel per ``facet`` value (e.g. protocol, when each has its own metric). ``error``
    is a spread column (symmetric) or a pair of CI columns ``(low, high)``; None for no
    error bars. Missing values (a protocol a method cannot do) leave a gap marked "n/a".
    """
    import pandas as pd

    source = str(table) if isinstance(table, (str, Path)) else "table"
    df = pd.read_csv(table) if isinstance(table, (str, Path)) else pd.DataFrame(table)
    needed = [value, hue] + ([group] if group else []) + ([facet] if facet else [])
    needed += list(error) if isinstance(error, tuple) else ([error] if error else [])
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(f"plot_comparison: {source} has no column(s) {missing} (columns: {list(df.columns)})")
    facets = list(dict.fromkeys(df[facet])) if facet else [None]
    fig, axes = _new_figure(1, len(facets), cell=(4.8, 3.4))
    hues = list(dict.fromkeys(df[hue]))
    width = 0.8 / len(hues)
    for f, fv in enumerate(facets):
        ax = axes[0, f]
        d = df[df[facet] == fv] if facet else df
        if group is None:  # one bar per method, named on the axis
            d = d.assign(_group="")
            width = 0.8
        gcol = group or "_group"
        groups = list(dict.fromkeys(d[gcol]))
        x = np.arange(len(groups)) if group else np.zeros(1)
        for h, hv in enumerate(hues):
            sel = d[d[hue] == hv].drop_duplicates(gcol).set_index(gcol).reindex(groups)
            y = sel[value].to_numpy(dtype=float)
            if isinstance(error, tuple):
                yerr = np.vstack([y - sel[error[0]].to_numpy(dtype=float), sel[error[1]].to_numpy(dtype=float) - y])
            elif error:
                yerr = sel[error].to_numpy(dtype=float)
            else:
                yerr = None
            xs = x + (h - (len(hues) - 1) / 2) * width if group else np.array([float(h)])
            ax.bar(xs, y, width, yerr=yerr, capsize=3, label=str(hv), color=f"C{h}")
            for xi, yi in zip(xs, y):
                if not np.isfinite(yi):
                    ax.text(xi, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
        if group:
            ax.set_xticks(x, [str(g) for g in groups], fontsize=8)
        else:
            ax.set_xticks(np.arange(len(hues)), [str(hv) for hv in hues], fontsize=8, rotation=30, ha="right")
        ax.set_ylabel(value)
        ax.grid(axis="y", alpha=0.3)
        if fv is not None:
            ax.set_title(str(fv))
    if group:
        axes[0, -1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    save_figure(fig, out_dir, name)
    return fig


# ---------------------------------------------------------------------------------------
# datasets: image grids and label counts


def record_label_name(ds, record) -> str:
    """A record's label as class names (multi-label: positives joined with '+'; none: 'none')."""
    label = record.label
    if isinstance(label, (list, tuple, np.ndarray)):
        names = [c for c, v in zip(ds.classes, label) if v]
        return "+".join(names) if names else "none"
    return ds.classes[int(label)]


def plot_fundus_grid(
    images: Sequence[Any],
    titles: Sequence[str] | None = None,
    masks: Sequence[Mapping[str, Any]] | None = None,
    ncols: int = 6,
    out_dir=None,
    name: str = "fundus_grid",
):
    """Images in a grid; lesion masks (lesion -> bool [H, W]) outlined in one colour per lesion type."""
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = _new_figure(nrows, ncols, cell=(2.3, 2.5))
    lesion_colours = _colours(sorted({k for m in (masks or []) for k, v in m.items() if np.any(v)})) if masks else {}
    for ax in axes.ravel():
        ax.set_axis_off()
    for i, image in enumerate(images):
        ax = axes.ravel()[i]
        im = to_hwc(image)
        ax.imshow(im)
        if masks is not None:
            for lesion, m in masks[i].items():
                m = np.asarray(m, dtype=bool)
                if m.any():
                    if m.shape != im.shape[:2]:
                        m = upsample_map(m.astype(float), im.shape[:2], normalize=False) > 0.5
                    ax.contour(m, levels=[0.5], colors=[lesion_colours[lesion]], linewidths=0.8)
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
    if lesion_colours:
        from matplotlib.lines import Line2D

        handles = [Line2D([0], [0], color=c, lw=2, label=k) for k, c in lesion_colours.items()]
        fig.legend(handles=handles, loc="outside right center", fontsize=7, frameon=False)
    save_figure(fig, out_dir, name)
    return fig


def plot_dataset_grid(ds, by: str = "class", per_group: int = 2, show_masks: bool = True, max_groups: int = 12, out_dir=None, name: str | None = None):
    """The first ``per_group`` images of each class (``by="class"``) or meta value (``by="camera"``).

    Images are read from disk at their stored size so lesion masks line up with them.
    """
    from PIL import Image

    groups: dict[str, list] = {}
    for rec in ds.records:
        key = record_label_name(ds, rec) if by == "class" else str((rec.meta or {}).get(by, getattr(rec, by, None)))
        if len(groups.setdefault(key, [])) < per_group:
            groups[key].append(rec)
    picked = [(k, r) for k in sorted(groups)[:max_groups] for r in groups[k]]
    if not picked:
        raise ValueError(f"plot_dataset_grid: dataset {getattr(ds, 'root', '')} has no records")
    images = [np.asarray(Image.open(r.path).convert("RGB")) for _, r in picked]
    masks = [load_record_masks(ds, r) for _, r in picked] if show_masks else None
    titles = [k if len(k) <= 30 else k[:29] + "…" for k, _ in picked]
    return plot_fundus_grid(images, titles, masks, ncols=6, out_dir=out_dir, name=name or f"grid_by_{by}")


def label_counts(ds):
    """Counts of each class per split (multi-label: each positive class counts): a DataFrame."""
    import pandas as pd

    rows = []
    for rec in ds.records:
        label = rec.label
        positives = [c for c, v in zip(ds.classes, label) if v] if isinstance(label, (list, tuple, np.ndarray)) else [ds.classes[int(label)]]
        rows += [{"class": c, "split": rec.split or "all"} for c in positives]
    df = pd.DataFrame(rows, columns=["class", "split"])
    table = df.groupby(["class", "split"]).size().unstack(fill_value=0)
    return table.reindex([c for c in ds.classes if c in table.index])


def plot_label_distribution(datasets: Mapping[str, Any], out_dir=None, name: str = "label_distribution"):
    """One panel per dataset: images per class, one bar per split (held-out camera = test)."""
    fig, axes = _new_figure(1, len(datasets), cell=(4.2, 3.2))
    for ax, (title, ds) in zip(axes[0], datasets.items()):
        counts = label_counts(ds)
        x = np.arange(len(counts))
        width = 0.8 / max(1, counts.shape[1])
        for s, split in enumerate(counts.columns):
            ax.bar(x + (s - (counts.shape[1] - 1) / 2) * width, counts[split], width, label=split)
        ax.set_xticks(x, [c if len(c) <= 14 else c[:13] + "…" for c in counts.index], rotation=45, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("images")
        ax.legend(fontsize=7)
    save_figure(fig, out_dir, name)
    return fig


# ---------------------------------------------------------------------------------------
# from a model


def dataset_embeddings(model, ds, max_items: int = 300, batch_size: int = 32) -> dict[str, Any]:
    """Image (and, where the model has a text encoder and records have text, report) embeddings.

    Returns dict(image ``[N, D]``, text ``[N, D]`` or None, meta DataFrame with ``disease``,
    ``camera``, ``split``) for the first ``max_items`` records.
    """
    import pandas as pd
    import torch

    n = min(len(ds), max_items)
    records = ds.records[:n]
    image_emb, text_emb = [], []
    texts = [r.text for r in records]
    use_text = all(isinstance(t, str) and t for t in texts) and has_text_encoder(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                idx = range(start, min(n, start + batch_size))
                images = torch.stack([ds[i]["image"] for i in idx])
                image_emb.append(model.encode_image(images).float().cpu().numpy())
                if use_text:
                    text_emb.append(model.encode_text([texts[i] for i in idx]).float().cpu().numpy())
    finally:
        model.train(was_training)
    meta = pd.DataFrame(
        {
            "disease": [record_label_name(ds, r) for r in records],
            "camera": [str((r.meta or {}).get("camera", "unknown")) for r in records],
            "split": [r.split or "all" for r in records],
        }
    )
    return {"image": np.concatenate(image_emb), "text": np.concatenate(text_emb) if use_text else None, "meta": meta}


def plot_shot_curves(table: Any, value: str = "mean", error: str | None = "std", x: str = "k", hue: str = "method", out_dir=None, name: str = "few_shot",
                     facet: str | None = None):
    """Few-shot score against shots per class (log-2 axis), mean +- spread over seeds, one line per method.

    ``facet`` (a column, e.g. ``"head"``): one panel per value, a line per ``hue`` in each, the
    colours the same in every panel and one legend beside them: a dozen curves stay readable.
    The y axis is named by the table's ``metric`` column when it has one value, else by ``value``."""
    import pandas as pd

    df = pd.read_csv(table) if isinstance(table, (str, Path)) else pd.DataFrame(table)
    missing = [c for c in [value, x, hue] + ([error] if error else []) + ([facet] if facet else []) if c not in df.columns]
    if missing:
        raise ValueError(f"plot_shot_curves: no column(s) {missing} (columns: {list(df.columns)})")
    panels = list(df.groupby(facet, sort=False)) if facet else [(None, df)]
    fig, axes = _new_figure(1, len(panels), cell=(3.4, 3.0) if facet else (4.6, 3.4))
    colours = {label: f"C{i % 10}" for i, label in enumerate(df[hue].unique())}
    metrics = df["metric"].unique() if "metric" in df.columns else []
    for col, (title, part) in enumerate(panels):
        ax = axes[0, col]
        for label, d in part.groupby(hue, sort=False):
            d = d.sort_values(x)
            ax.errorbar(d[x], d[value], yerr=d[error] if error else None, marker="o", capsize=3, label=str(label),
                        color=colours[label])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("labelled images per class")
        if title is not None:
            ax.set_title(str(title), fontsize=9)
        if col == 0:
            ax.set_ylabel(f"{metrics[0]} ({value} over seeds)" if len(metrics) == 1 else value)
        ax.grid(alpha=0.3)
    if facet:
        handles = {}
        for ax in axes[0]:
            handles.update({label: h for h, label in zip(*ax.get_legend_handles_labels())})
        fig.legend(list(handles.values()), list(handles.keys()), loc="outside right center", fontsize=8, frameon=False)
    else:
        axes[0, 0].legend(fontsize=8)
    save_figure(fig, out_dir, name)
    return fig
