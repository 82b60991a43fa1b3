"""Every loss against a hand-computed reference (python floats, explicit loops)."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fundus_lab import losses as L


def _unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1)


def _log_softmax_row(row, j):
    m = max(row)
    return row[j] - (m + math.log(sum(math.exp(v - m) for v in row)))


def test_contrastive_loss_matches_hand_computation_with_temperature():
    img, txt = _unit(4, 3, 0), _unit(4, 3, 1)
    scale = 1 / 0.07
    sim = [[scale * sum(a * b for a, b in zip(img[i].tolist(), txt[j].tolist())) for j in range(4)] for i in range(4)]
    i2t = -sum(_log_softmax_row(sim[i], i) for i in range(4)) / 4
    t2i = -sum(_log_softmax_row([sim[j][i] for j in range(4)], i) for i in range(4)) / 4
    expected = (i2t + t2i) / 2
    assert L.contrastive_loss(img, txt, scale).item() == pytest.approx(expected, rel=1e-5)
    # a different temperature gives a different loss (the scale is really applied)
    assert L.contrastive_loss(img, txt, 1.0).item() != pytest.approx(expected, rel=1e-3)


def test_contrastive_loss_is_small_for_aligned_pairs():
    z = _unit(5, 8, 3)
    assert L.contrastive_loss(z, z, 100.0).item() < 1e-3
    assert L.contrastive_loss(z, z.roll(1, 0), 100.0).item() > 1.0


def test_label_aware_contrastive_loss_hand_computed():
    img, txt = _unit(4, 3, 4), _unit(4, 3, 5)
    labels = torch.tensor([0, 1, 0, 2])
    scale = 5.0
    sim = [[scale * float(img[i] @ txt[j]) for j in range(4)] for i in range(4)]
    pos = [[1.0 if labels[i] == labels[j] else 0.0 for j in range(4)] for i in range(4)]
    tgt = [[p / sum(row) for p in row] for row in pos]
    i2t = -sum(tgt[i][j] * _log_softmax_row(sim[i], j) for i in range(4) for j in range(4)) / 4
    col = [[sim[j][i] for j in range(4)] for i in range(4)]
    t2i = -sum(tgt[j][i] * _log_softmax_row(col[i], j) for i in range(4) for j in range(4)) / 4
    assert L.label_aware_contrastive_loss(img, txt, labels, scale).item() == pytest.approx((i2t + t2i) / 2, rel=1e-5)
    # multi-hot labels: a shared category makes a positive; distinct labels reduce to CLIP
    multi = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 1], [0, 0, 1.0]])
    pos_m = (multi @ multi.t()) > 0
    assert pos_m[0, 2] and pos_m[2, 3] and not pos_m[0, 3]
    distinct = torch.arange(4)
    assert L.label_aware_contrastive_loss(img, txt, distinct, scale).item() == pytest.approx(
        L.contrastive_loss(img, txt, scale).item(), rel=1e-6
    )


def test_weighted_similarity_coupling_loss_hand_computed_with_queue():
    img, txt = _unit(3, 4, 6), _unit(3, 4, 7)
    qi, qt = _unit(2, 4, 8), _unit(2, 4, 9)
    labels = torch.tensor([[1, 0.0], [0, 1], [1, 1]])
    qlab = torch.tensor([[1, 0.0], [0, 0]])
    scale = 3.0
    y_all = torch.cat([labels, qlab])

    def cos(a, b):
        na, nb = a.norm().item(), b.norm().item()
        if na == 0 and nb == 0:
            return 1.0
        return float(a @ b) / max(na * nb, 1e-12)

    def side(q, cand):
        total = 0.0
        for i in range(3):
            num = math.exp(scale * float(q[i] @ cand[i]))
            den = 0.0
            for j in range(5):
                w = 1.0 if j == i else 1.0 - cos(labels[i], y_all[j])
                den += w * math.exp(scale * float(q[i] @ cand[j]))
            total += -math.log(num / den)
        return total / 3

    expected = 0.5 * (side(img, torch.cat([txt, qt])) + side(txt, torch.cat([img, qi])))
    got = L.weighted_similarity_coupling_loss(img, txt, labels, scale, qi, qt, qlab)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_weighted_similarity_coupling_removes_false_negatives_and_reduces_to_clip():
    img, txt = _unit(4, 5, 10), _unit(4, 5, 11)
    distinct = torch.arange(4)
    assert L.weighted_similarity_coupling_loss(img, txt, distinct, 4.0).item() == pytest.approx(
        L.contrastive_loss(img, txt, 4.0).item(), rel=1e-6
    )
    # samples 0 and 1 share a label: moving text 1 must not change image 0's i2t term
    same = torch.tensor([0, 0, 1, 2])
    log_w = torch.log(1 - (same[:, None] == same[None]).float() + torch.eye(4))  # -inf for false negatives

    def i2t(image, text):
        return F.cross_entropy(4.0 * image @ text.t() + log_w, torch.arange(4), reduction="none")

    txt2 = txt.clone()
    txt2[1] = _unit(1, 5, 99)[0]
    # samples 0 and 1 share a label: moving text 1 does not change image 0's term
    assert i2t(img, txt2)[0].item() == pytest.approx(i2t(img, txt)[0].item(), rel=1e-6)
    assert i2t(img, txt2)[2].item() != pytest.approx(i2t(img, txt)[2].item(), rel=1e-6)
    expected = 0.5 * (i2t(img, txt).mean() + i2t(txt, img).mean())
    assert L.weighted_similarity_coupling_loss(img, txt, same, 4.0).item() == pytest.approx(expected.item(), rel=1e-6)


def test_masked_image_loss_hand_computed_and_ignores_visible_patches():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    mask = torch.tensor([[1, 0, 1], [0, 0, 1.0]])
    per = [[sum((pred[n, l, d].item() - target[n, l, d].item()) ** 2 for d in range(4)) / 4 for l in range(3)] for n in range(2)]
    expected = (per[0][0] + per[0][2] + per[1][2]) / 3
    assert L.masked_image_loss(pred, target, mask).item() == pytest.approx(expected, rel=1e-6)
    changed = pred.clone()
    changed[0, 1] += 10  # a visible patch: not scored
    assert L.masked_image_loss(changed, target, mask).item() == pytest.approx(expected, rel=1e-6)
    # norm_pix: each target patch standardised by its own mean and (unbiased) variance
    t = target[0, 0]
    tn = (t - t.mean()) / (t.var() + 1e-6) ** 0.5
    one = torch.tensor([[1.0, 0, 0]])
    got = L.masked_image_loss(pred[:1], target[:1], one, norm_pix=True)
    assert got.item() == pytest.approx(((pred[0, 0] - tn) ** 2).mean().item(), rel=1e-5)


def test_feature_regression_loss_cosine_and_smooth_l1():
    pred = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]]])
    target = torch.tensor([[[0.0, 1.0], [0.0, 5.0], [4.0, 3.0]]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    # cos: patch0 = 0, patch1 = 1 -> (1 - 0 + 1 - 1) / 2
    assert L.feature_regression_loss(pred, target, mask, "cosine").item() == pytest.approx(0.5)
    # smooth-l1 (beta 1): patch0 |d| = 1,1 -> 0.5 each; patch1 |d| = 0,3 -> 0, 2.5
    assert L.feature_regression_loss(pred, target, mask, "smooth_l1").item() == pytest.approx((0.5 + 1.25) / 2)
    with pytest.raises(ValueError, match="teacher_loss"):
        L.feature_regression_loss(pred, target, mask, "l3")


def test_caption_loss_hand_computed_ignores_padding():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]], [[0.0, 1.0, 3.0], [1.0, 1.0, 1.0]]])
    targets = torch.tensor([[0, -100], [2, 1]])
    expected = -(
        _log_softmax_row(logits[0, 0].tolist(), 0) + _log_softmax_row(logits[1, 0].tolist(), 2) + _log_softmax_row(logits[1, 1].tolist(), 1)
    ) / 3
    assert L.caption_loss(logits, targets).item() == pytest.approx(expected, rel=1e-6)


def test_total_loss_weights_terms():
    total, weighted = L.total_loss({"a_loss": torch.tensor(2.0), "b_loss": torch.tensor(3.0)}, {"a_loss": 0.5, "b_loss": 2.0})
    assert total.item() == pytest.approx(7.0)
    assert weighted["a_loss"].item() == pytest.approx(1.0)
    with pytest.raises(KeyError):
        L.total_loss({"c_loss": torch.tensor(1.0)}, {})


def test_label_errors_are_clear():
    z = _unit(2, 3, 0)
    with pytest.raises(ValueError, match="num_labels"):
        L.weighted_similarity_coupling_loss(z, z, torch.ones(2, 3), 1.0, z, z, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="rows"):
        L.label_aware_contrastive_loss(z, z, torch.tensor([0, 1, 2]), 1.0)


# ---------------------------------------------------------------------------------------
# two processes (gloo): gathered negatives, gradients as on the concatenated batch


def _distributed_worker(rank: int, world: int, init_file: str, out_dir: str):
    import torch.distributed as dist

    torch.manual_seed(0)  # same data and "encoder" on every rank
    n, d_in, d = 3, 5, 4
    x_img, x_txt = torch.randn(world * n, d_in), torch.randn(world * n, d_in)
    labels = torch.tensor([0, 1, 0, 2, 1, 3])[: world * n]
    w_img, w_txt = torch.randn(d_in, d), torch.randn(d_in, d)
    queue = (F.normalize(torch.randn(2, d), dim=-1), F.normalize(torch.randn(2, d), dim=-1), F.one_hot(torch.tensor([0, 3]), 4).float())
    losses = {
        "infonce": lambda zi, zt, y: L.contrastive_loss(zi, zt, 2.5),
        "label_aware": lambda zi, zt, y: L.label_aware_contrastive_loss(zi, zt, y, 2.5),
        "vilref": lambda zi, zt, y: L.weighted_similarity_coupling_loss(zi, zt, F.one_hot(y, 4).float(), 2.5, *queue),
    }
    # the reference: one process on the concatenated batch (before any process group exists)
    refs = {}
    for name, fn in losses.items():
        wi, wt = w_img.clone().requires_grad_(), w_txt.clone().requires_grad_()
        ref = fn(F.normalize(x_img @ wi, dim=-1), F.normalize(x_txt @ wt, dim=-1), labels)
        ref.backward()
        refs[name] = (ref.detach(), wi.grad, wt.grad)

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        part = slice(rank * n, (rank + 1) * n)
        for name, fn in losses.items():
            ref, ref_gi, ref_gt = refs[name]
            # this rank's share of the batch, negatives gathered from the other rank
            wi2, wt2 = w_img.clone().requires_grad_(), w_txt.clone().requires_grad_()
            loss = fn(F.normalize(x_img[part] @ wi2, dim=-1), F.normalize(x_txt[part] @ wt2, dim=-1), labels[part])
            loss.backward()
            for g in (wi2.grad, wt2.grad):  # what DDP does: average gradients over ranks
                dist.all_reduce(g)
                g /= world
            assert torch.allclose(loss, ref, atol=1e-6), (name, loss.item(), ref.item())
            assert torch.allclose(wi2.grad, ref_gi, atol=1e-6), name
            assert torch.allclose(wt2.grad, ref_gt, atol=1e-6), name
        (Path(out_dir) / f"ok{rank}").write_text("ok")
    finally:
        dist.destroy_process_group()


def test_gathered_losses_equal_single_process_loss_on_concatenated_batch(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()


def test_flair_targets_rows_sum_to_one_in_both_directions_for_non_transitive_labels():
    from fundus_lab.losses import label_aware_targets

    # 0 shares with 1 (class a), 1 shares with 2 (class b), 0 and 2 share nothing: not transitive
    y = torch.tensor([[1.0, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1]])
    t_i2t, t_t2i = label_aware_targets(y)
    assert torch.allclose(t_i2t.sum(1), torch.ones(4)) and torch.allclose(t_t2i.sum(1), torch.ones(4))
    assert t_i2t[0, 2] == 0 and t_i2t[0, 1] > 0 and t_i2t[1, 2] > 0
    # the old form (the transpose of the image-to-text targets) does not sum to 1 per row
    assert not torch.allclose(t_i2t.t().sum(1), torch.ones(4))
    # one sampled category per pair (FLAIR): same category = positive
    t_i2t, t_t2i = label_aware_targets(torch.tensor([2, 0, 2, 1]))
    assert torch.allclose(t_i2t[0], torch.tensor([0.5, 0, 0.5, 0])) and torch.allclose(t_t2i.sum(1), torch.ones(4))
