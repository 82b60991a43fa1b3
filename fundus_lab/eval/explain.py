"""Explanation maps and their scores against lesion masks: an evaluation, no plotting.

Attention rollout, CLS attention, patch-prompt similarity and cross-attention give heat
maps; the pointing game and the share of a map's mass inside a lesion mask score them
(:func:`score_explanations`, :func:`summarize_explanations`). :func:`lesion_attention_summary`
is notebook 02's whole table in one call. Pure numpy/torch: ``fundus_lab.viz`` draws
these maps and re-exports every name here under its old ``viz.<name>``.

Shape conventions (ViT with ``P`` prefix tokens, usually P = 1 for CLS):

    attention   [N, heads, T, T]   T = P + L tokens, rows = queries, each row sums to 1
    patch grid  L = g * g          row-major, as timm's PatchEmbed flattens it
    heat map    [H, W]             non-negative; "mass" is its sum
    lesion mask [H, W] bool        as the synthetic generator writes ``masks/<id>.npz``
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

# a lesion mask over more of the image than this is diffuse (media opacity covers the whole
# fundus), not a place an explanation could point at
DIFFUSE_SHARE = 0.25

__all__ = [
    "DIFFUSE_SHARE",
    "to_numpy",
    "attention_rollout",
    "cls_attention",
    "tokens_to_grid",
    "upsample_map",
    "rollout_maps",
    "patch_prompt_similarity",
    "cross_attention_map",
    "mass_in_mask",
    "pointing_game",
    "score_explanations",
    "summarize_explanations",
    "load_record_masks",
    "lesion_images",
    "attention_explanations",
    "lesion_attention_summary",
]


def to_numpy(x: Any) -> np.ndarray:
    """Tensor (any device, with grad) or array-like -> float64-or-native numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def _as_attention(a: Any, where: str) -> np.ndarray:
    arr = to_numpy(a).astype(np.float64)
    if arr.ndim == 3:  # one image without the batch axis
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != arr.shape[-2]:
        raise ValueError(f"{where}: expected attention of shape [N, heads, T, T], got {arr.shape}")
    return arr


def _grid_side(num_patches: int, where: str = "tokens") -> int:
    g = int(round(math.sqrt(num_patches)))
    if g * g != num_patches:
        raise ValueError(f"{where}: {num_patches} patch tokens do not form a square grid; pass grid=(gh, gw)")
    return g


# ---------------------------------------------------------------------------------------
# attention maps


def attention_rollout(attentions: Sequence[Any], residual: bool = True, head_fusion: str = "mean") -> np.ndarray:
    """Attention rollout (Abnar & Zuidema, 2020): how much each output token draws on each input token.

    Per layer l, heads are fused (mean by default) and the skip connection is modelled as
    an identity added to the attention, then rows are renormalised:

        A_l = norm_rows(0.5 * mean_h(attn_l) + 0.5 * I)
        R   = A_L @ A_{L-1} @ ... @ A_1

    Args:
        attentions: per-layer attention, each ``[N, heads, T, T]`` (first layer first).
        residual: add the identity for the residual stream (the paper's choice).
        head_fusion: ``"mean"`` | ``"max"`` | ``"min"`` over heads.

    Returns:
        ``[N, T, T]``; row ``i`` is the share of token ``i``'s final representation that
        flows from each input token (rows sum to 1).
    """
    if len(attentions) == 0:
        raise ValueError("attention_rollout: got no layers")
    fuse = {"mean": np.mean, "max": np.max, "min": np.min}
    if head_fusion not in fuse:
        raise ValueError(f"attention_rollout: head_fusion={head_fusion!r}; expected one of {sorted(fuse)}")
    rollout = None
    for i, layer in enumerate(attentions):
        a = fuse[head_fusion](_as_attention(layer, f"attention_rollout layer {i}"), axis=1)  # [N,T,T]
        if residual:
            a = 0.5 * a + 0.5 * np.eye(a.shape[-1])[None]
        a = a / a.sum(axis=-1, keepdims=True)
        rollout = a if rollout is None else a @ rollout
    return rollout


def cls_attention(attention: Any, num_prefix: int = 1) -> np.ndarray:
    """Attention from the CLS token (query 0) to each patch token, per head: ``[N, heads, L]``."""
    a = _as_attention(attention, "cls_attention")
    return a[:, :, 0, num_prefix:]


def tokens_to_grid(values: Any, grid: tuple[int, int] | None = None) -> np.ndarray:
    """``[..., L]`` per-patch values -> ``[..., gh, gw]`` (row-major, as timm flattens patches)."""
    v = to_numpy(values)
    if grid is None:
        g = _grid_side(v.shape[-1])
        grid = (g, g)
    return v.reshape(*v.shape[:-1], *grid)


def upsample_map(heat: Any, size: tuple[int, int], normalize: bool = True) -> np.ndarray:
    """Bilinear upsampling of ``[..., gh, gw]`` maps to ``[..., H, W]``; optionally min-max to [0, 1]."""
    import torch
    import torch.nn.functional as F

    h = torch.as_tensor(to_numpy(heat), dtype=torch.float64)
    lead = h.shape[:-2]
    h = h.reshape(-1, 1, *h.shape[-2:])
    up = F.interpolate(h, size=tuple(size), mode="bilinear", align_corners=False)
    up = up.reshape(*lead, *size).numpy()
    if normalize:
        lo = up.min(axis=(-2, -1), keepdims=True)
        hi = up.max(axis=(-2, -1), keepdims=True)
        # a flat map (up to rounding) stays flat instead of amplifying float noise to [0, 1]
        span = hi - lo
        flat = span <= 1e-9 * np.maximum(np.abs(hi), 1e-300)
        up = np.where(flat, 0.0, (up - lo) / np.where(flat, 1.0, span))
    return up


def rollout_maps(attentions: Sequence[Any], image_size: tuple[int, int], num_prefix: int = 1, grid=None) -> np.ndarray:
    """CLS row of the rollout over the patches, upsampled to the image: ``[N, H, W]`` in [0, 1]."""
    rollout = attention_rollout(attentions)
    return upsample_map(tokens_to_grid(rollout[:, 0, num_prefix:], grid), image_size)


def patch_prompt_similarity(patch_embeddings: Any, text_embeddings: Any, grid=None) -> np.ndarray:
    """Cosine similarity of each (projected) patch token with each prompt embedding.

        sim[n, p, i] = <u_{n,i} / |u_{n,i}|, t_p / |t_p|>

    Args:
        patch_embeddings: ``[N, L, D]`` patch tokens already in the joint embedding space.
        text_embeddings: ``[P, D]`` (one per prompt).

    Returns:
        ``[N, P, gh, gw]`` similarities in [-1, 1].
    """
    u = to_numpy(patch_embeddings).astype(np.float64)
    t = to_numpy(text_embeddings).astype(np.float64)
    if u.ndim == 2:
        u = u[None]
    if u.ndim != 3 or t.ndim != 2 or u.shape[-1] != t.shape[-1]:
        raise ValueError(
            f"patch_prompt_similarity: expected patches [N, L, D] and prompts [P, D] with the same D, "
            f"got {u.shape} and {t.shape}"
        )
    u = u / np.maximum(np.linalg.norm(u, axis=-1, keepdims=True), 1e-12)
    t = t / np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), 1e-12)
    sim = np.einsum("nld,pd->npl", u, t)
    return tokens_to_grid(sim, grid)


def cross_attention_map(cross_attention: Any, token_index: int | Sequence[int], num_prefix: int = 0, grid=None) -> np.ndarray:
    """Attention from text token(s) to image patches, averaged over heads (and over the tokens given).

    Args:
        cross_attention: ``[N, heads, T_text, P + L]`` (or ``[N, T_text, P + L]``, or a per-layer
            list: the last layer is used, the one that feeds the decoder, or the dict of
            ``model.cross_attention_maps`` with its ``maps`` list).
        token_index: the text position(s) to show.
        num_prefix: image tokens before the patches (1 when the image CLS token is a key).

    Returns:
        ``[N, gh, gw]``.
    """
    if isinstance(cross_attention, Mapping):
        cross_attention = cross_attention["maps"]
    if isinstance(cross_attention, (list, tuple)):
        cross_attention = cross_attention[-1]
    a = to_numpy(cross_attention).astype(np.float64)
    if a.ndim == 3:
        a = a[:, None]
    if a.ndim != 4:
        raise ValueError(f"cross_attention_map: expected [N, heads, T_text, L], got {a.shape}")
    idx = [token_index] if isinstance(token_index, int) else list(token_index)
    if max(idx) >= a.shape[2] or min(idx) < -a.shape[2]:
        raise ValueError(f"cross_attention_map: token_index {idx} out of range for {a.shape[2]} text tokens")
    return tokens_to_grid(a[:, :, idx, num_prefix:].mean(axis=(1, 2)), grid)


# ---------------------------------------------------------------------------------------
# explanation quality against lesion masks


def _heat_on_mask_grid(heat: Any, shape: tuple[int, int]) -> np.ndarray:
    h = to_numpy(heat).astype(np.float64)
    if h.ndim != 2:
        raise ValueError(f"explanation map: expected [H, W], got shape {h.shape}")
    if h.shape != tuple(shape):
        h = upsample_map(h, shape, normalize=False)
    return np.clip(h, 0.0, None)  # negative evidence carries no mass


def mass_in_mask(heat: Any, mask: Any) -> float:
    """Share of a map's mass that falls inside the mask: ``sum(h * m) / sum(h)``.

    The map is resized (bilinear) to the mask when the sizes differ and negative values
    are clipped to 0. A uniform map scores the mask's area fraction, so compare with that.
    Returns NaN for an all-zero map (it points nowhere).
    """
    m = np.asarray(mask, dtype=bool)
    h = _heat_on_mask_grid(heat, m.shape)
    total = h.sum()
    return float(h[m].sum() / total) if total > 0 else float("nan")


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    if radius <= 0:
        return mask
    from scipy.ndimage import binary_dilation

    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return binary_dilation(mask, structure=(yy**2 + xx**2) <= radius**2)


def pointing_game(heat: Any, mask: Any, tolerance: float = 0.03) -> bool:
    """Pointing game (Zhang et al., 2016): is the map's maximum on the lesion?

    A hit when the argmax pixel lies inside the mask dilated by ``tolerance`` x the
    longer image side (the original uses 15 px at ~224 px; 0.03 is ~7 px at 224,
    tighter because synthetic lesions are small and placed exactly).
    """
    m = np.asarray(mask, dtype=bool)
    h = _heat_on_mask_grid(heat, m.shape)
    radius = int(round(tolerance * max(m.shape)))
    y, x = np.unravel_index(int(np.argmax(h)), h.shape)
    return bool(_dilate(m, radius)[y, x])


def score_explanations(maps: Mapping[str, Sequence[Any]], masks: Sequence[Mapping[str, Any]], tolerance: float = 0.03):
    """Score explanation maps of several methods against per-image lesion masks.

    Args:
        maps: method name -> one ``[H, W]`` (or patch-grid) map per image.
        masks: per image, lesion key -> boolean mask (the generator's ``masks/<id>.npz``).
        tolerance: pointing-game tolerance (fraction of the image side).

    Returns:
        A long :class:`pandas.DataFrame`, one row per (method, image, lesion) with
        ``mass_in_mask``, ``pointing_hit``, ``area_fraction`` (the uniform-map baseline)
        and ``mask_pixels``. Empty masks are kept as rows with NaN scores, never dropped.
    """
    import pandas as pd

    rows = []
    for method, method_maps in maps.items():
        if len(method_maps) != len(masks):
            raise ValueError(f"score_explanations: method {method!r} has {len(method_maps)} maps for {len(masks)} images")
        for i, (heat, lesions) in enumerate(zip(method_maps, masks)):
            for lesion, mask in lesions.items():
                m = np.asarray(mask, dtype=bool)
                pixels = int(m.sum())
                rows.append(
                    {
                        "method": method,
                        "image": i,
                        "lesion": lesion,
                        "mass_in_mask": mass_in_mask(heat, m) if pixels else float("nan"),
                        "pointing_hit": float(pointing_game(heat, m, tolerance)) if pixels else float("nan"),
                        "area_fraction": pixels / m.size,
                        "mask_pixels": pixels,
                    }
                )
    return pd.DataFrame(rows, columns=["method", "image", "lesion", "mass_in_mask", "pointing_hit", "area_fraction", "mask_pixels"])


def summarize_explanations(scores, max_share: float = DIFFUSE_SHARE):
    """Mean scores per method and lesion type, and ``all``, with the number of scored masks.

    ``all`` averages the focal masks only (covering at most ``max_share`` of the image): a
    diffuse mask (media opacity: the whole fundus) holds nearly all of any map's mass, which
    would lift every method's overall score towards 1 whatever it attends to. Diffuse lesion
    types keep their own rows."""
    import pandas as pd

    valid = scores.dropna(subset=["mass_in_mask"])
    cols = ["mass_in_mask", "pointing_hit", "area_fraction"]
    per = valid.groupby(["method", "lesion"])[cols].mean()
    per["n"] = valid.groupby(["method", "lesion"]).size()
    focal = valid[valid["area_fraction"] <= max_share]
    overall = focal.groupby("method")[cols].mean().reindex(per.index.unique(level="method"))
    overall["n"] = focal.groupby("method").size().reindex(overall.index).fillna(0).astype(int)
    overall.index = pd.MultiIndex.from_product([overall.index, ["all"]], names=["method", "lesion"])
    out = pd.concat([per, overall])
    order = sorted(out.index, key=lambda ml: (ml[0], ml[1] == "all", ml[1]))  # "all" last per method
    return out.loc[order]


# ---------------------------------------------------------------------------------------
# from a dataset and models: notebook 02's table


def load_record_masks(ds, record) -> dict[str, np.ndarray]:
    """The lesion masks of a record (``meta["mask"]``, an .npz relative to the dataset root); {} if none."""
    rel = (record.meta or {}).get("mask")
    if not rel or (isinstance(rel, float) and rel != rel):
        return {}
    path = Path(ds.root) / str(rel)
    if not path.is_file():
        raise FileNotFoundError(f"{ds.root}: mask file {rel!r} of {record.path} does not exist")
    with np.load(path) as z:
        return {k: z[k].astype(bool) for k in z.files}


def attention_explanations(model, images, mask_size: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """Attention-based explanation maps of a ViT model, ``{name: [N, H, W]}`` in [0, 1].

    ``rollout`` (all layers, :func:`attention_rollout`) and ``last_layer`` (CLS attention of
    the last block, mean over heads), upsampled to ``mask_size`` (default: the image size).
    """
    import torch

    with torch.no_grad():
        attn = model.attention_maps(images)
    size = tuple(mask_size) if mask_size is not None else tuple(images.shape[-2:])
    last = cls_attention(attn[-1]).mean(axis=1)  # [N, L]
    return {
        "rollout": rollout_maps(attn, size),
        "last_layer": upsample_map(tokens_to_grid(last), size),
    }



def lesion_images(ds) -> list[int]:
    """Indices of the records with at least one non-empty lesion mask, in record order.

    Only these can be scored: an image without a lesion has nothing to point at.
    """
    return [i for i, r in enumerate(ds.records) if any(m.any() for m in load_record_masks(ds, r).values())]


def lesion_attention_summary(models: Mapping[str, Any], dataset, n_images: int = 48, batch_size: int = 16):
    """Attention explanations of each model scored against the lesion masks: notebook 02's table.

    The first ``n_images`` records with a lesion (:func:`lesion_images`) are explained in
    batches of ``batch_size`` by every model (:func:`attention_explanations`, maps at the
    masks' resolution), scored (:func:`score_explanations`) and summarised
    (:func:`summarize_explanations`); explanation kinds are named ``<model>/<kind>``
    (``ours/rollout``).

    Args:
        models: name -> model with ``attention_maps(images)`` (a ViT image tower).
        dataset: a :class:`~fundus_lab.data.FundusDataset` whose records carry ``meta["mask"]``.
    """
    if n_images < 1 or batch_size < 1:
        raise ValueError(f"lesion_attention_summary: n_images={n_images} and batch_size={batch_size} must both be >= 1")
    picked = lesion_images(dataset)[:n_images]
    if not picked:
        raise ValueError(
            f"lesion_attention_summary: no record of {getattr(dataset, 'root', 'the dataset')} has a non-empty lesion "
            "mask (meta['mask']); explanations are scored against lesion masks (the synthetic datasets have them)"
        )
    import torch

    masks = [load_record_masks(dataset, dataset.records[i]) for i in picked]
    mask_size = next(m.shape for ms in masks for m in ms.values())  # the generator's resolution
    maps: dict[str, list] = {}
    for name, model in models.items():
        for start in range(0, len(picked), batch_size):
            batch = torch.stack([dataset[i]["image"] for i in picked[start : start + batch_size]])
            for kind, heat in attention_explanations(model, batch, mask_size).items():
                maps.setdefault(f"{name}/{kind}", []).extend(heat)
    return summarize_explanations(score_explanations(maps, masks))
