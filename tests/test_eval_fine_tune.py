"""Fine-tuning learns a toy task, keeps the pretrained model intact, decays lr by layer."""

import numpy as np
import pytest
import torch

from fundus_lab.eval import fine_tune
from fundus_lab.eval.fine_tune import FineTuneClassifier, class_balanced_weights, param_groups
from doubles import ToyDataset, ToyViT

CLASSES = ["red", "green", "blue"]


def _splits(task="multiclass", n=(48, 24, 30)):
    rng = np.random.default_rng(0)
    out = []
    for size, split, seed in zip(n, ("train", "val", "test"), (1, 2, 3)):
        out.append(ToyDataset(rng.integers(0, 3, size), CLASSES, task=task, noise=0.1, seed=seed, split=split))
    return out


def test_fine_tuning_learns_colour_classes_and_keeps_the_model():
    torch.manual_seed(0)
    train, val, test = _splits()
    model = ToyViT(width=8, depth=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = fine_tune(model, train, val, test, epochs=12, lr=2e-2, batch_size=8, patience=12, seed=0)
    chance = np.bincount(test.labels).max() / len(test)  # the zero-initialised head's accuracy
    assert out["history"][0]["val"]["accuracy"] <= 1.0
    assert out["metrics"]["accuracy"] > 0.9 > chance + 0.2
    assert out["selection_metric"] == "balanced_accuracy"
    best = max(h["val"]["balanced_accuracy"] for h in out["history"])
    assert out["best_val"] == pytest.approx(best)
    assert out["history"][out["best_epoch"]]["val"]["balanced_accuracy"] == pytest.approx(best)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_ordinal_selects_on_kappa_and_early_stops():
    train, val, test = _splits("ordinal")
    out = fine_tune(ToyViT(seed=1), train, val, test, epochs=30, lr=5e-2, batch_size=8, patience=2, seed=0)
    assert out["selection_metric"] == "kappa"
    assert "kappa" in out["metrics"]
    assert len(out["history"]) <= 30
    assert len(out["history"]) - 1 - out["best_epoch"] <= 2  # stopped within `patience` of the best


def test_layer_wise_lr_decay_groups():
    model = ToyViT(width=8, depth=2)
    clf = FineTuneClassifier(model, 3, 8)
    groups = param_groups(clf, lr=1.0, layer_decay=0.5, weight_decay=0.1)
    lr_of = {}
    for g in groups:
        for p in g["params"]:
            lr_of[id(p)] = (g["lr"], g["weight_decay"])
    enc = model.image_encoder
    assert lr_of[id(enc.patch_embed.weight)] == (0.125, 0.1)  # 0.5^(L+1), L = 2
    assert lr_of[id(enc.cls_token)] == (0.125, 0.0)
    assert lr_of[id(enc.blocks[0].fc.weight)] == (0.25, 0.1)
    assert lr_of[id(enc.blocks[1].fc.weight)] == (0.5, 0.1)
    assert lr_of[id(enc.blocks[1].fc.bias)] == (0.5, 0.0)
    assert lr_of[id(enc.norm.weight)] == (1.0, 0.0)
    assert lr_of[id(clf.head.weight)] == (1.0, 0.1)
    assert id(model.text_encoder.weight) not in lr_of  # the text branch stays frozen
    assert not model.text_encoder.weight.requires_grad


def test_class_balanced_weights_by_hand():
    labels = np.array([0] * 8 + [1] * 2)
    w = class_balanced_weights(labels, 3, beta=0.5).numpy()
    # effective numbers (1 - 0.5^n) / 0.5: n=8 -> 1.9921875, n=2 -> 1.5; class 2 absent -> 0
    raw = np.array([1 / 1.9921875, 1 / 1.5])
    np.testing.assert_allclose(w[:2], raw / raw.mean(), rtol=1e-6)
    assert w[2] == 0
    ml = class_balanced_weights(np.array([[1, 0], [1, 1], [0, 0], [1, 0]]), 2).numpy()
    np.testing.assert_allclose(ml, [1 / 3, 3.0])


def test_fine_tune_progress_bar_over_epochs_and_can_be_switched_off(capsys):
    train, val, test = _splits(n=(12, 6, 6))
    fine_tune(ToyViT(), train, val, test, epochs=2, batch_size=6, patience=2, progress=False)
    assert "fine-tune epochs" not in capsys.readouterr().err
    fine_tune(ToyViT(), train, val, test, epochs=2, batch_size=6, patience=2)
    err = capsys.readouterr().err
    assert "fine-tune epochs" in err and "0/2 [" in err
