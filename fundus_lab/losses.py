"""Loss terms, one plain function per equation.

Notation: ``z_img``, ``z_text`` ``[N, D]`` are L2-normalised embeddings, ``s = exp(t)`` the
learnt logit scale (inverse temperature, clamped to 100 as in CLIP), ``S = s * z_img z_text^T``.

- eq. 2  :func:`contrastive_loss`   symmetric InfoNCE (CLIP)
- eq. 4  :func:`masked_image_loss`  MSE on masked patches (MAE)
- eq. 6  :func:`caption_loss`       cross-entropy over target tokens
- eq. 8  :func:`total_loss`         weighted sum of the terms
- :func:`label_aware_contrastive_loss` (FLAIR), :func:`weighted_similarity_coupling_loss`
  (ViLReF), :func:`feature_regression_loss` (EVA-02)

Under ``torch.distributed`` the contrastive losses call :func:`gather_features` so that
negatives come from the global batch while gradients still reach every rank's encoder
(open_clip's ``local_loss=False, gather_with_grad=True``): every rank computes the same
global loss, and DDP's gradient averaging then gives exactly the gradient of the
single-process loss on the concatenated batch. The model never sees processes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's ``[N, ...]`` tensor; backward sums the gradient of the
    gathered tensor over ranks and hands each rank its own slice."""

    @staticmethod
    def forward(ctx, x):
        rank, world = _world()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = rank, x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every rank's loss depends on every rank's features
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_features(*features: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """All-gather ``[N, ...]`` tensors along dim 0 across ranks, keeping the autograd graph.

    Backward sums each rank's gradient contributions back to the owner (open_clip's
    ``gather_with_grad``), so with DDP's averaging the gradient is that of the global
    loss. Ranks must hold equal ``N``. A single process gets its inputs back unchanged.
    """
    _, world = _world()
    if world == 1:
        return features
    sizes = gather_no_grad(torch.tensor([f.shape[0] for f in features], device=features[0].device).view(1, -1))
    if (sizes != sizes[:1]).any():
        raise ValueError(f"gather_features: ranks hold different batch sizes {sizes[:, 0].tolist()}; use drop_last=True")
    return tuple(_AllGatherWithGrad.apply(f) for f in features)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather without gradient (labels, momentum keys for a queue)."""
    _, world = _world()
    if world == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float,
                     directions: str = "symmetric") -> torch.Tensor:
    """InfoNCE (eq. 2), symmetric as CLIP trains it or image-to-text as the paper writes it.

        symmetric:      L_con = 1/2 [ CE(S, I) + CE(S^T, I) ],   S_ij = s * <z_img_i, z_text_j>
        image_to_text:  L_con = CE(S, I) = -1/N sum_i log softmax_j S_ij |_{j=i}

    Args:
        image_features, text_features: ``[N, D]`` L2-normalised (features are gathered
            across ranks first when distributed).
        logit_scale: the scale ``s`` itself (already exponentiated and clamped).
        directions: ``symmetric`` or ``image_to_text`` (``method.contrastive_directions``).
    """
    if directions not in ("symmetric", "image_to_text"):
        raise ValueError(f"method.contrastive_directions={directions!r}; expected 'symmetric' or 'image_to_text'")
    image_features, text_features = gather_features(image_features, text_features)
    logits = logit_scale * image_features @ text_features.t()  # [N, N]
    target = torch.arange(logits.shape[0], device=logits.device)
    if directions == "image_to_text":
        return F.cross_entropy(logits, target)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def labels_as_matrix(labels: torch.Tensor, num_labels: int | None = None) -> torch.Tensor:
    """Integer ``[N]`` or multi-hot ``[N, C]`` labels -> float ``[N, C]``."""
    if labels.ndim == 1:
        if labels.dtype.is_floating_point:
            raise ValueError("labels: a 1-D label tensor must hold integer class ids")
        if num_labels is None:
            num_labels = int(labels.max().item()) + 1
        if labels.min() < 0 or labels.max() >= num_labels:
            raise ValueError(f"labels: class ids must lie in [0, {num_labels}), got {labels.min().item()}..{labels.max().item()}")
        return F.one_hot(labels.long(), num_labels).float()
    if labels.ndim != 2:
        raise ValueError(f"labels must be [N] class ids or [N, C] multi-hot, got shape {list(labels.shape)}")
    if num_labels is not None and labels.shape[1] != num_labels:
        raise ValueError(f"labels have {labels.shape[1]} columns, expected method.num_labels={num_labels}")
    return labels.float()


def label_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of label vectors ``[N, C]`` x ``[M, C]`` -> ``[N, M]`` in [0, 1].

    One-hot labels give 1 for the same class and 0 otherwise; two empty (all-zero)
    multi-hot rows count as the same label ("no finding").
    """
    na, nb = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
    sim = (a @ b.t()) / (na * nb.t()).clamp_min(1e-12)
    both_empty = (na == 0) & (nb.t() == 0)
    return torch.where(both_empty, torch.ones_like(sim), sim)


def label_aware_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FLAIR's soft targets, row-normalised in both directions.

    ``labels [N]`` (one sampled category per pair, as FLAIR forms its positives: same
    category = positive) or ``[N, C]`` multi-hot (pairs that share any category). With
    ``P_ij = 1[i = j or y_i ~ y_j]``:

        T_i2t = P / rowsum(P),   T_t2i = P^T / rowsum(P^T)

    Both have rows summing to 1, also when "shares a category" is not transitive
    (multi-hot), where ``T_i2t^T`` would not.
    """
    y = labels_as_matrix(labels)
    positive = (y @ y.t()) > 0
    positive |= torch.eye(len(y), dtype=torch.bool, device=y.device)
    p = positive.float()
    return p / p.sum(dim=1, keepdim=True), p.t() / p.t().sum(dim=1, keepdim=True)


def label_aware_contrastive_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """FLAIR's label-aware InfoNCE: every pair that shares a category is a positive.

        L = 1/2 [ CE_soft(S, T_i2t) + CE_soft(S^T, T_t2i) ],  CE_soft(S, T) = -1/N sum_ij T_ij log softmax_j S_ij

    with the targets of :func:`label_aware_targets`.

    Args:
        labels: ``[N]`` class ids (one sampled category per pair) or ``[N, C]`` multi-hot
            (gathered with the features).
    """
    image_features, text_features = gather_features(image_features, text_features)
    labels = gather_no_grad(labels.to(image_features.device))
    if labels.shape[0] != image_features.shape[0]:
        raise ValueError(f"labels: {labels.shape[0]} rows for {image_features.shape[0]} image-text pairs")
    target_i, target_t = label_aware_targets(labels)
    logits = logit_scale * image_features @ text_features.t()
    loss_i = -(target_i * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    loss_t = -(target_t * F.log_softmax(logits.t(), dim=1)).sum(dim=1).mean()
    return 0.5 * (loss_i + loss_t)


def weighted_similarity_coupling_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: torch.Tensor | float,
    image_queue: torch.Tensor | None = None,
    text_queue: torch.Tensor | None = None,
    label_queue: torch.Tensor | None = None,
) -> torch.Tensor:
    """ViLReF-style weighted similarity coupling, with a memory queue of extra negatives.

    Each negative's pull on the softmax is coupled to how different its label is: with
    ``w_ij = 1 - sim(y_i, y_j)`` (cosine of label vectors) for ``j != i`` and ``w_ii = 1``,

        L_i2t = -1/N sum_i log [ exp(S_ii) / sum_j w_ij exp(S_ij) ]

    over the candidates ``j`` = the (gathered) batch followed by the queue (momentum
    features from earlier batches, which make up for the negatives removed), and
    ``L_t2i`` likewise with image candidates; ``L = (L_i2t + L_t2i) / 2``. Negatives with
    the same label (``w = 0``, false negatives) are removed, partly similar ones are pushed
    apart more slowly, unrelated ones as in InfoNCE. This is our reading of ViLReF's
    loss (its exact published form may differ); with distinct labels and no queue it
    reduces to :func:`contrastive_loss`.

    Args:
        image_features, text_features: ``[N, D]`` L2-normalised (online encoders).
        labels: ``[N]`` class ids or ``[N, C]`` multi-hot.
        image_queue, text_queue: ``[K, D]`` (no gradient), label_queue ``[K, C]``.
    """
    image_features, text_features = gather_features(image_features, text_features)
    num_labels = label_queue.shape[1] if label_queue is not None else None
    y = labels_as_matrix(gather_no_grad(labels.to(image_features.device)), num_labels)
    n = image_features.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"labels: {y.shape[0]} rows for {n} image-text pairs")
    text_cand, image_cand, y_cand = text_features, image_features, y
    if image_queue is not None and len(image_queue):
        text_cand = torch.cat([text_features, text_queue.detach()], dim=0)
        image_cand = torch.cat([image_features, image_queue.detach()], dim=0)
        y_cand = torch.cat([y, label_queue.to(y.dtype)], dim=0)
    weight = 1.0 - label_similarity(y, y_cand)  # [N, N + K]
    idx = torch.arange(n, device=weight.device)
    weight[idx, idx] = 1.0
    log_w = torch.log(weight.clamp_min(0.0))  # -inf removes a candidate
    loss_i = F.cross_entropy(logit_scale * image_features @ text_cand.t() + log_w, idx)
    loss_t = F.cross_entropy(logit_scale * text_features @ image_cand.t() + log_w, idx)
    return 0.5 * (loss_i + loss_t)


def masked_image_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = False) -> torch.Tensor:
    """MSE on the masked patches only (eq. 4, MAE's ``forward_loss``).

        L_img = sum_l m_l * ||x̂_l - x_l||^2 / D  /  sum_l m_l

    Args:
        pred, target: ``[N, L, D]`` patch predictions and patchified images.
        mask: ``[N, L]``, 1 = masked (counted), 0 = visible.
        norm_pix: normalise each target patch by its own mean and variance first.
    """
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)  # [N, L]
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


def feature_regression_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Regress a frozen teacher's patch features on the masked patches (EVA-02's MIM).

        cosine:    L = sum_l m_l (1 - cos(f̂_l, f_l)) / sum_l m_l
        smooth_l1: L = sum_l m_l SmoothL1(f̂_l, f_l) / sum_l m_l  (mean over feature dims)

    Args:
        pred, target: ``[N, L, D]``; target comes from the teacher without gradient.
        mask: ``[N, L]``, 1 = masked.
    """
    target = target.detach()
    if kind == "cosine":
        per_patch = 1.0 - F.cosine_similarity(pred, target, dim=-1)
    elif kind == "smooth_l1":
        per_patch = F.smooth_l1_loss(pred, target, reduction="none").mean(dim=-1)
    else:
        raise ValueError(f"method.teacher_loss={kind!r}; expected 'cosine' or 'smooth_l1'")
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


def caption_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Token cross-entropy over the target positions (eq. 6).

        L_cap = -1/|M| sum_{(n,t) in M} log p(w_nt | context),  M = {targets != ignore_index}

    Masked mode: targets are every (non-padding) token of the original text, t = 1..T as
    eq. 6 sums (``caption_targets: all``), or only the masked ones (``masked``).
    Autoregressive mode (CoCa): the logits at ``t`` against ``ids[t + 1]``, padding ignored.

    Args:
        logits: ``[N, T, V]``; targets: ``[N, T]``.
    """
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=ignore_index)


def total_loss(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum (eq. 8): ``L_total = sum_k w_k L_k`` over the named terms.

    Returns the total and the weighted terms (what the model reports as ``*_loss``).
    """
    missing = sorted(set(terms) - set(weights))
    if missing:
        raise KeyError(f"total_loss: no weight for {missing}")
    weighted = {k: weights[k] * v for k, v in terms.items()}
    if not weighted:
        raise ValueError("total_loss: no loss term is switched on")
    return sum(weighted.values()), weighted
