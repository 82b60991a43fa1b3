"""Figures of what a model sees and rebuilds: attention maps, prompt similarity, masked reconstructions.

Drawn over the fundus image itself, from a model's attention weights, patch-to-prompt
similarities and MAE reconstructions; the maps are computed in :mod:`fundus_lab.eval.explain`
(shapes documented there), their scores against lesion masks too. Figures of data, embeddings
and results are in :mod:`fundus_lab.viz`, whose conventions these follow (a returned
:class:`matplotlib.figure.Figure`, written as PNG and SVG given ``out_dir``). Notebook 02 and the
prompt playground draw these.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from fundus_lab.eval.explain import cls_attention, cross_attention_map, rollout_maps, to_numpy, tokens_to_grid, upsample_map
from fundus_lab.viz import _new_figure, save_figure, to_hwc

__all__ = [
    "plot_attention",
    "plot_cross_attention",
    "plot_prompt_similarity",
    "mask_to_pixels",
    "paste_visible",
    "plot_reconstruction",
]


# ---------------------------------------------------------------------------------------
# attention figures (the maps are computed in fundus_lab.eval.explain)


def _overlay(ax, image: np.ndarray, heat: np.ndarray | None, title: str | None = None, alpha: float = 0.5, cmap: str = "jet"):
    ax.imshow(image)
    if heat is not None:
        ax.imshow(heat, cmap=cmap, alpha=alpha, extent=(-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5))
    if title:
        ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def plot_attention(
    images: Any,
    attentions: Sequence[Any],
    num_prefix: int = 1,
    max_heads: int = 6,
    out_dir=None,
    name: str = "attention",
):
    """Per image: the fundus, last-layer CLS attention of each head, and the rollout.

    Args:
        images: ``[N, 3, H, W]`` (or a list of images).
        attentions: per-layer ``[N, heads, T, T]`` as ``model.attention_maps`` returns.
    """
    imgs = [to_hwc(im) for im in images]
    size = imgs[0].shape[:2]
    last = cls_attention(attentions[-1], num_prefix)  # [N, heads, L]
    heads = min(last.shape[1], max_heads)
    per_head = upsample_map(tokens_to_grid(last[:, :heads]), size)  # [N, heads, H, W]
    roll = rollout_maps(attentions, size, num_prefix)  # [N, H, W]
    fig, axes = _new_figure(len(imgs), heads + 2)
    for n, im in enumerate(imgs):
        _overlay(axes[n, 0], im, None, "image" if n == 0 else None)
        for h in range(heads):
            _overlay(axes[n, h + 1], im, per_head[n, h], f"head {h} (last layer)" if n == 0 else None)
        _overlay(axes[n, heads + 1], im, roll[n], "rollout" if n == 0 else None)
    save_figure(fig, out_dir, name)
    return fig


def plot_cross_attention(
    images: Any,
    cross_attention: Any,
    tokens: Sequence[str],
    token_indices: Sequence[int],
    num_prefix: int = 0,
    out_dir=None,
    name: str = "cross_attention",
):
    """Where in each image the chosen text tokens look (head mean of the last cross-attention layer).

    ``tokens`` names the text positions (for titles); ``num_prefix`` as in :func:`cross_attention_map`.
    """
    imgs = [to_hwc(im) for im in images]
    size = imgs[0].shape[:2]
    fig, axes = _new_figure(len(imgs), len(token_indices) + 1)
    for j, t in enumerate(token_indices):
        maps = upsample_map(cross_attention_map(cross_attention, t, num_prefix), size)
        for n, im in enumerate(imgs):
            if j == 0:
                _overlay(axes[n, 0], im, None, "image" if n == 0 else None)
            _overlay(axes[n, j + 1], im, maps[n], repr(tokens[t]) if n == 0 else None)
    save_figure(fig, out_dir, name)
    return fig


def plot_prompt_similarity(image: Any, similarity: Any, prompts: Sequence[str], probs: Sequence[float] | None = None, out_dir=None, name: str = "prompt_similarity"):
    """One image with a heat map per prompt (``similarity``: ``[P, gh, gw]``), on a shared colour scale.

    The shared scale (not per-map min-max) keeps prompts comparable: a prompt that matches
    nowhere stays cold everywhere.
    """
    im = to_hwc(image)
    sim = to_numpy(similarity)
    up = upsample_map(sim, im.shape[:2], normalize=False)
    lo, hi = float(up.min()), float(up.max())
    fig, axes = _new_figure(1, len(prompts) + 1)
    _overlay(axes[0, 0], im, None, "image")
    for p, prompt in enumerate(prompts):
        title = prompt if len(prompt) <= 28 else prompt[:27] + "…"
        if probs is not None:
            title += f"\np = {probs[p]:.2f}"
        axes[0, p + 1].imshow(im)
        mappable = axes[0, p + 1].imshow(up[p], cmap="jet", alpha=0.5, vmin=lo, vmax=hi)
        axes[0, p + 1].set_title(title, fontsize=8)
        axes[0, p + 1].set_axis_off()
    fig.colorbar(mappable, ax=axes[0, -1], shrink=0.7, label="cosine similarity")
    save_figure(fig, out_dir, name)
    return fig


# ---------------------------------------------------------------------------------------
# reconstruction


def mask_to_pixels(mask: Any, patch_size: int, image_size: tuple[int, int]) -> np.ndarray:
    """MAE patch mask ``[N, L]`` (0 keep, 1 remove) -> pixel mask ``[N, H, W]`` (1 = removed)."""
    m = to_numpy(mask).astype(np.float64)
    if m.ndim == 1:
        m = m[None]
    gh, gw = image_size[0] // patch_size, image_size[1] // patch_size
    if m.shape[1] != gh * gw:
        raise ValueError(f"mask_to_pixels: mask has {m.shape[1]} patches, image {image_size} / patch {patch_size} gives {gh * gw}")
    grid = m.reshape(-1, gh, gw)
    return np.kron(grid, np.ones((patch_size, patch_size)))


def paste_visible(original: Any, prediction: Any, pixel_mask: np.ndarray) -> np.ndarray:
    """Visible patches from the original, removed ones from the prediction (MAE's figure 2 style)."""
    o, p = to_hwc(original), to_hwc(prediction)
    m = np.asarray(pixel_mask, dtype=np.float64)[..., None]
    return o * (1 - m) + p * m


def plot_reconstruction(images: Any, results: Mapping[float, Mapping[str, Any]], patch_size: int, out_dir=None, name: str = "reconstruction"):
    """For each mask ratio and image: original, masked input, the raw output, and the removed patches filled in by it.

    Args:
        images: ``[N, 3, H, W]`` in [0, 1].
        results: mask ratio -> ``model.reconstruct(images, ratio, texts=...)``, i.e. a dict with
            ``pred_images`` ``[N, 3, H, W]`` and ``mask`` ``[N, L]`` (0 keep, 1 remove).
        patch_size: the ViT patch size.
    """
    imgs = [to_hwc(im) for im in images]
    size = imgs[0].shape[:2]
    rows = [(ratio, n) for ratio in results for n in range(len(imgs))]
    fig, axes = _new_figure(len(rows), 4)
    # the loss covers removed patches only (MAE), so the raw output at visible ones is untrained
    titles = ["original", "masked input", "raw output (visible: untrained)", "removed patches filled in"]
    for r, (ratio, n) in enumerate(rows):
        res = results[ratio]
        pix = mask_to_pixels(res["mask"], patch_size, size)[n]
        pred = to_hwc(res["pred_images"][n])
        masked = imgs[n] * (1 - pix[..., None]) + 0.5 * pix[..., None]  # grey where removed
        panels = [imgs[n], masked, pred, paste_visible(imgs[n], pred, pix)]
        for c, panel in enumerate(panels):
            axes[r, c].imshow(panel)
            axes[r, c].set_axis_off()
            if r == 0:
                axes[r, c].set_title(titles[c], fontsize=9)
        axes[r, 0].text(-0.08, 0.5, f"mask {ratio:.0%}", transform=axes[r, 0].transAxes, rotation=90, va="center", ha="right", fontsize=9)
    save_figure(fig, out_dir, name)
    return fig
