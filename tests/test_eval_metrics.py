"""Metrics against scikit-learn on random inputs, plus hand-computed cases and the bootstrap."""

import warnings

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score, balanced_accuracy_score, cohen_kappa_score, f1_score, roc_auc_score,
)

from fundus_lab.eval import metrics as M


def _random_multiclass(seed, n=60, c=5):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    y[:c] = np.arange(c)  # every class present
    logits = rng.standard_normal((n, c)) + 1.5 * np.eye(c)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, probs


@pytest.mark.parametrize("seed", range(5))
def test_multiclass_metrics_match_sklearn(seed):
    y, probs = _random_multiclass(seed)
    pred = probs.argmax(1)
    assert M.accuracy(y, pred) == pytest.approx(accuracy_score(y, pred))
    assert M.balanced_accuracy(y, pred) == pytest.approx(balanced_accuracy_score(y, pred))
    assert M.macro_f1(y, pred) == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
    assert M.auc(y, probs) == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"))


@pytest.mark.parametrize("seed", range(5))
def test_quadratic_kappa_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 5, 80)
    pred = np.clip(y + rng.integers(-2, 3, 80), 0, 4)
    expected = cohen_kappa_score(y, pred, weights="quadratic", labels=list(range(5)))
    assert M.quadratic_weighted_kappa(y, pred, n_classes=5) == pytest.approx(expected)
    assert M.cohen_kappa(y, pred) == pytest.approx(cohen_kappa_score(y, pred))
    assert M.cohen_kappa(y, pred, "linear", 5) == pytest.approx(
        cohen_kappa_score(y, pred, weights="linear", labels=list(range(5))))


def test_quadratic_kappa_by_hand():
    # O = [[1,0],[1,2]] (true 0: one right; true 1: one called 0, two right)
    y, p = [0, 1, 1, 1], [0, 0, 1, 1]
    # E = outer([1,3],[2,2])/4 = [[.5,.5],[1.5,1.5]]; W = [[0,1],[1,0]]
    # kappa = 1 - 1 / (0.5 + 1.5) = 0.5
    assert M.quadratic_weighted_kappa(y, p) == pytest.approx(0.5)
    assert M.quadratic_weighted_kappa([0, 1, 2], [0, 1, 2]) == pytest.approx(1.0)
    assert np.isnan(M.quadratic_weighted_kappa([2, 2], [2, 2]))


@pytest.mark.parametrize("seed", range(3))
def test_binary_and_multilabel_auc_f1_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, (50, 4))
    y[0], y[1] = 1, 0
    scores = np.round(rng.random((50, 4)) + 0.4 * y, 1)  # rounding makes ties
    for c in range(4):
        assert M.binary_auc(y[:, c], scores[:, c]) == pytest.approx(roc_auc_score(y[:, c], scores[:, c]))
    assert M.auc(y, scores) == pytest.approx(roc_auc_score(y, scores, average="macro"))
    pred = (scores > 0.5).astype(int)
    assert M.macro_f1(y, pred) == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
    # binary task with [N, 2] probabilities: AUC of column 1
    probs = np.c_[1 - scores[:, 0], scores[:, 0]]
    assert M.auc(y[:, 0], probs) == pytest.approx(roc_auc_score(y[:, 0], scores[:, 0]))


def test_auc_by_hand_and_undefined():
    assert M.binary_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert M.binary_auc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    assert np.isnan(M.binary_auc([1, 1], [0.2, 0.3]))


def test_odir_score_matches_official_definition():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, (40, 8))
    probs = np.clip(0.6 * y + 0.5 * rng.random((40, 8)), 0, 1)
    t, s = y.ravel(), probs.ravel()
    kappa = cohen_kappa_score(t, s > 0.5)
    f1 = f1_score(t, s > 0.5, average="micro")
    area = roc_auc_score(t, s)
    out = M.odir_score(y, probs)
    assert out["kappa"] == pytest.approx(kappa)
    assert out["f1"] == pytest.approx(f1)
    assert out["auc"] == pytest.approx(area)
    assert out["final"] == pytest.approx((kappa + f1 + area) / 3)


def test_bootstrap_ci_is_seeded_and_contains_estimate():
    y, probs = _random_multiclass(0, n=200, c=3)
    fn = lambda t, p: M.accuracy(t, p.argmax(1))  # noqa: E731
    lo, hi = M.bootstrap_ci(fn, y, probs, n=300, seed=1)
    assert (lo, hi) == M.bootstrap_ci(fn, y, probs, n=300, seed=1)
    assert (lo, hi) != M.bootstrap_ci(fn, y, probs, n=300, seed=2)
    assert lo <= fn(y, probs) <= hi
    assert 0.02 < hi - lo < 0.3  # about 2 * 1.96 * sqrt(p(1-p)/200) ~ 0.13


def test_compute_metrics_per_task():
    y, probs = _random_multiclass(1, c=5)
    out = M.compute_metrics("ordinal", y, probs, bootstrap=50, seed=0)
    assert out["kappa"] == pytest.approx(cohen_kappa_score(y, probs.argmax(1), weights="quadratic", labels=list(range(5))))
    assert out["kappa_ci"][0] <= out["kappa"] <= out["kappa_ci"][1]
    assert out["n"] == len(y)
    assert "kappa" not in M.compute_metrics("multiclass", y, probs)
    yb = (y > 2).astype(int)
    pb = probs[:, 3:].sum(1)
    ob = M.compute_metrics("binary", yb, np.c_[1 - pb, pb])
    assert ob["auc"] == pytest.approx(roc_auc_score(yb, pb))
    assert ob["f1"] == pytest.approx(f1_score(yb, pb > 0.5))
    ym = np.eye(5)[y].astype(int)
    om = M.compute_metrics("multilabel", ym, probs)
    assert om["auc"] == pytest.approx(roc_auc_score(ym, probs))
    assert len(om["auc_per_class"]) == 5
    with pytest.raises(ValueError, match="multilabel needs"):
        M.compute_metrics("multilabel", y, probs)
    with pytest.raises(ValueError, match="task="):
        M.compute_metrics("regression", y, probs)


def test_no_warnings_on_degenerate_input():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = M.compute_metrics("multiclass", np.array([1, 1, 1]), np.array([[0.2, 0.8], [0.3, 0.7], [0.9, 0.1]]))
    assert out["accuracy"] == pytest.approx(2 / 3)
    assert np.isnan(out["auc"])
