"""Classification metrics for fundus tasks, with seeded bootstrap confidence intervals.

The metrics are scikit-learn's (``sklearn.metrics``), the definitions reviewers already
trust; this module fixes the conventions fundus tasks need around them: AUC is NaN (not
an exception) where a class has no positives or no negatives, macro AUC averages only
the classes where it is defined, kappa's classes follow grade values, and
scikit-learn's warnings about degenerate resamples are silenced because the bootstrap
draws them on purpose.

Shapes and conventions:
    multiclass / ordinal: y_true [N] int in 0..C-1, probs [N, C] (rows sum to 1)
    binary:               y_true [N] in {0, 1},      probs [N, 2] or [N] (P(class 1))
    multilabel:           y_true [N, C] multi-hot,   probs [N, C] (independent per class)
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Callable, Sequence

import numpy as np
import sklearn
from sklearn import metrics as skm

TASKS = ("multiclass", "multilabel", "ordinal", "binary")


def _labels(y) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"expected a 1-d array of class indices, got shape {y.shape}")
    return y.astype(np.int64)


@contextmanager
def _quiet():
    """Silence scikit-learn's degenerate-input warnings (single class, unseen predictions):
    the results are defined here (NaN or the documented convention) and bootstraps hit them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def accuracy(y_true, y_pred) -> float:
    """Fraction of exact matches (for multi-hot rows: every class right)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape")
    if y_true.ndim == 2:
        return float(skm.accuracy_score(y_true.astype(int), y_pred.astype(int)))
    return float(skm.accuracy_score(y_true, y_pred))


def confusion_matrix(y_true, y_pred, n_classes: int | None = None) -> np.ndarray:
    """O[i, j] = number of samples of true class i predicted as j (classes 0..n_classes-1)."""
    y_true, y_pred = _labels(y_true), _labels(y_pred)
    if n_classes is None:
        n_classes = int(max(y_true.max(initial=0), y_pred.max(initial=0))) + 1
    return skm.confusion_matrix(y_true, y_pred, labels=np.arange(n_classes)).astype(np.int64)


def balanced_accuracy(y_true, y_pred) -> float:
    """Mean per-class recall over the classes present in ``y_true`` (robust to imbalance)."""
    y_true, y_pred = _labels(y_true), _labels(y_pred)
    with _quiet():
        return float(skm.balanced_accuracy_score(y_true, y_pred))


def f1_per_class(y_true, y_pred, labels: Sequence[int] | None = None) -> np.ndarray:
    """Per-class F1 = 2TP / (2TP + FP + FN), 0 where a class never occurs nor is predicted.

    1-d class indices (over ``labels``, default: classes seen in either array) or [N, C]
    multi-hot arrays (per column).
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.ndim == 2:
        return skm.f1_score(y_true.astype(int), y_pred.astype(int), average=None, zero_division=0).astype(np.float64)
    y_true, y_pred = _labels(y_true), _labels(y_pred)
    if labels is None:
        labels = np.union1d(y_true, y_pred)
    return skm.f1_score(y_true, y_pred, labels=np.asarray(labels), average=None, zero_division=0).astype(np.float64)


def macro_f1(y_true, y_pred, labels: Sequence[int] | None = None) -> float:
    """Unweighted mean of per-class F1 (every class counts the same, rare ones included)."""
    return float(np.mean(f1_per_class(y_true, y_pred, labels)))


def binary_auc(y_true, score) -> float:
    """Area under the ROC curve = P(score of a positive > score of a negative), ties 1/2.

    NaN when only one class is present (the AUC is undefined there; scikit-learn raises).
    """
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    if y.all() or not y.any():
        return float("nan")
    return float(skm.roc_auc_score(y, s))


def auc_per_class(y_true, probs) -> np.ndarray:
    """One-vs-rest AUC for each class (column of ``probs``); NaN where a class has no
    positives or no negatives. ``y_true`` is [N] class indices or [N, C] multi-hot."""
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true)
    onehot = (y_true if y_true.ndim == 2 else np.eye(probs.shape[1], dtype=bool)[_labels(y_true)]).astype(bool)
    out = np.full(probs.shape[1], np.nan)
    defined = onehot.any(0) & ~onehot.all(0)
    if defined.any():  # one scikit-learn call for all defined classes (the bootstrap's hot path)
        out[defined] = skm.roc_auc_score(onehot[:, defined].astype(int), probs[:, defined], average=None)
    return out


def auc(y_true, probs) -> float:
    """Macro one-vs-rest AUC over the classes where it is defined.

    Binary: ``probs`` may be [N] or [N, 2]; the AUC of the positive class. (Equals
    ``roc_auc_score(..., multi_class="ovr")`` when every class is present; that call
    raises otherwise, which a bootstrap resample or a small split easily triggers.)
    """
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true)
    if probs.ndim == 1:
        return binary_auc(y_true, probs)
    if probs.shape[1] == 2 and y_true.ndim == 1:
        return binary_auc(y_true, probs[:, 1])
    per_class = auc_per_class(y_true, probs)
    if np.all(np.isnan(per_class)):
        return float("nan")
    return float(np.nanmean(per_class))


def cohen_kappa(y_true, y_pred, weights: str | None = None, n_classes: int | None = None) -> float:
    """Cohen's kappa (``sklearn.metrics.cohen_kappa_score``), 1 - sum(W * O) / sum(W * E).

    ``weights``: None (unweighted), ``"linear"`` |i - j| or ``"quadratic"`` (i - j)^2.
    Classes are the integers ``min..max`` of both arrays, or ``0..n_classes-1``: weights
    follow grade values, so a grade absent from the sample still counts in the distance
    between its neighbours. NaN when chance disagreement is zero (a single class everywhere).
    """
    y_true, y_pred = _labels(y_true), _labels(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape")
    if weights not in (None, "linear", "quadratic"):
        raise ValueError(f"weights={weights!r}; expected None, 'linear' or 'quadratic'")
    lo = 0 if n_classes is not None else int(min(y_true.min(), y_pred.min()))
    k = n_classes if n_classes is not None else int(max(y_true.max(), y_pred.max())) + 1 - lo
    with _quiet():
        return float(skm.cohen_kappa_score(y_true, y_pred, labels=np.arange(lo, lo + k), weights=weights))


def quadratic_weighted_kappa(y_true, y_pred, n_classes: int | None = None) -> float:
    """Quadratic weighted kappa for ordinal grades (the APTOS / EyePACS metric).

    W_ij = (i - j)^2 / (K - 1)^2 (the normalisation cancels in the ratio), so confusing
    grade 0 with 4 costs 16 times more than 0 with 1.
    """
    return cohen_kappa(y_true, y_pred, weights="quadratic", n_classes=n_classes)


def odir_score(y_true, probs, threshold: float = 0.5) -> dict:
    """ODIR-2019 challenge score on multi-label [N, 8] predictions.

    As the official evaluation script computes it: labels and scores are flattened over
    images x classes, then kappa = Cohen's kappa of (score > 0.5), F1 = micro F1 of the
    same, AUC = ROC AUC of the flat scores; final = (kappa + F1 + AUC) / 3.
    """
    t = np.asarray(y_true).astype(np.int64).ravel()
    s = np.asarray(probs, dtype=np.float64).ravel()
    p = (s > threshold).astype(np.int64)
    kappa = cohen_kappa(t, p, n_classes=2)
    f1 = float(skm.f1_score(t, p, labels=[0, 1], average="micro", zero_division=0))
    area = binary_auc(t, s)
    return {"kappa": kappa, "f1": f1, "auc": area, "final": float(np.mean([kappa, f1, area]))}


def bootstrap_ci(
    metric_fn: Callable[[np.ndarray, np.ndarray], float],
    y_true,
    y_score,
    n: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) confidence interval of ``metric_fn(y_true, y_score)``.

    Samples (rows) are drawn with replacement ``n`` times from a generator seeded with
    ``seed``, so the interval is repeatable. Resamples where the metric is undefined
    (NaN, e.g. an AUC with one class drawn) are dropped; (nan, nan) if all are.
    """
    y_true, y_score = np.asarray(y_true), np.asarray(y_score)
    if len(y_true) != len(y_score):
        raise ValueError(f"y_true has {len(y_true)} rows but y_score has {len(y_score)}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha}; expected a value in (0, 1)")
    rng = np.random.default_rng(seed)
    stats = np.empty(n)
    # inputs were checked once above; skipping scikit-learn's finiteness scan per resample
    with warnings.catch_warnings(), sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
        warnings.simplefilter("ignore", RuntimeWarning)
        for b in range(n):
            idx = rng.integers(0, len(y_true), len(y_true))
            stats[b] = metric_fn(y_true[idx], y_score[idx])
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


# ---------------------------------------------------------------------------------------
# the metric set of each task


def _binary_scores(probs: np.ndarray) -> np.ndarray:
    return probs[:, 1] if probs.ndim == 2 else probs


def metric_functions(task: str, n_classes: int, threshold: float = 0.5) -> dict[str, Callable]:
    """name -> fn(y_true, probs) for the scalar metrics of ``task`` (what gets bootstrapped)."""
    if task not in TASKS:
        raise ValueError(f"task={task!r}; expected one of {TASKS}")
    if task == "multilabel":
        return {
            "auc": auc,
            "macro_f1": lambda y, p: macro_f1(y, p > threshold),
            "accuracy": lambda y, p: float(np.mean(y == (p > threshold))),  # per label
            "odir_score": lambda y, p: odir_score(y, p, threshold)["final"],
        }
    if task == "binary":
        return {
            "accuracy": lambda y, p: accuracy(y, (_binary_scores(p) > threshold).astype(int)),
            "balanced_accuracy": lambda y, p: balanced_accuracy(y, (_binary_scores(p) > threshold).astype(int)),
            "f1": lambda y, p: float(f1_per_class(y, (_binary_scores(p) > threshold).astype(int), [1])[0]),
            "auc": lambda y, p: binary_auc(y, _binary_scores(p)),
        }
    fns = {
        "accuracy": lambda y, p: accuracy(y, p.argmax(1)),
        "balanced_accuracy": lambda y, p: balanced_accuracy(y, p.argmax(1)),
        "macro_f1": lambda y, p: macro_f1(y, p.argmax(1)),
        "auc": auc,
    }
    if task == "ordinal":
        fns["kappa"] = lambda y, p: quadratic_weighted_kappa(y, p.argmax(1), n_classes=n_classes)
    return fns


def compute_metrics(
    task: str,
    y_true,
    probs,
    bootstrap: int = 0,
    seed: int = 0,
    alpha: float = 0.05,
    threshold: float = 0.5,
) -> dict:
    """The metric set of ``task`` (see :func:`metric_functions`), as plain floats.

    Ordinal adds ``kappa`` (quadratic weighted); multilabel adds ``auc_per_class`` and the
    ODIR parts. With ``bootstrap > 0`` every scalar metric ``m`` gets ``m_ci = [lo, hi]``.
    """
    y_true, probs = np.asarray(y_true), np.asarray(probs, dtype=np.float64)
    if len(y_true) != len(probs):
        raise ValueError(f"{len(y_true)} labels but {len(probs)} rows of probabilities")
    if len(y_true) == 0:
        raise ValueError("cannot compute metrics on an empty set")
    if task == "multilabel" and (y_true.ndim != 2 or y_true.shape != probs.shape):
        raise ValueError(f"multilabel needs y_true and probs of shape [N, C]; got {y_true.shape}, {probs.shape}")
    if task in ("multiclass", "ordinal") and (y_true.ndim != 1 or probs.ndim != 2):
        raise ValueError(f"{task} needs y_true [N] and probs [N, C]; got {y_true.shape}, {probs.shape}")
    n_classes = probs.shape[1] if probs.ndim == 2 else 2
    fns = metric_functions(task, n_classes, threshold)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out: dict = {name: float(fn(y_true, probs)) for name, fn in fns.items()}
        if task == "multilabel":
            out["auc_per_class"] = [float(v) for v in auc_per_class(y_true, probs)]
            parts = odir_score(y_true, probs, threshold)
            out.update({f"odir_{k}": v for k, v in parts.items() if k != "final"})
        if bootstrap:
            for name, fn in fns.items():
                out[f"{name}_ci"] = list(bootstrap_ci(fn, y_true, probs, n=bootstrap, seed=seed, alpha=alpha))
    out["n"] = int(len(y_true))
    return out


def primary_metric(task: str) -> str:
    """The number a model is selected on for ``task`` (kappa for grades, as APTOS scores)."""
    return {"multiclass": "balanced_accuracy", "ordinal": "kappa", "binary": "auc", "multilabel": "auc"}[task]


# ---------------------------------------------------------------------------------------
# the number a table cell shows, and its interval


SINGLE_LABEL_PROTOCOLS = ("zero_shot", "zero_shot_disjoint", "zero_shot_unseen", "linear_probe", "linear_probe_full")


def table_metric(task: str, protocol: str) -> str:
    """The number a table shows: ODIR zero-shot or linear probe -> single-label accuracy; grades -> kappa."""
    if task == "multilabel":  # the ODIR-like figure: accuracy over the single-label eyes
        return "single_label_accuracy" if protocol in SINGLE_LABEL_PROTOCOLS else "auc"
    return {"ordinal": "kappa", "binary": "auc"}.get(task, "accuracy")


def metric_fn(task: str, metric: str, n_classes: int) -> Callable[[np.ndarray, np.ndarray], float]:
    """fn(y_true, probs) of the table metric (what is bootstrapped for the CI)."""
    if metric == "single_label_accuracy":
        def single(y, p):
            keep = y.sum(1) == 1
            return accuracy(y[keep].argmax(1), p[keep].argmax(1)) if keep.any() else float("nan")
        return single
    fns = metric_functions(task, n_classes)
    if metric not in fns:
        raise ValueError(f"metric {metric!r} is not defined for task {task!r} ({sorted(fns)})")
    return fns[metric]


def chance_level(metric: str, n_classes: int) -> float:
    """What a guess scores: 1/C for (balanced) accuracy, 0 for kappa, 0.5 for AUC."""
    return {"kappa": 0.0, "auc": 0.5}.get(metric, 1.0 / max(1, n_classes))


def majority_rate(labels, metric: str = "accuracy") -> float | None:
    """The score of always answering the test set's most frequent class: the floor of plain
    accuracy on an imbalanced test set, where 1/C (:func:`chance_level`) is too low (a model
    that says "normal" to every image scores the share of normal images). For
    ``single_label_accuracy`` (multi-hot labels) it is counted over the images with exactly
    one positive class, the images that metric scores. None for other metrics."""
    y = np.asarray(labels)
    if metric == "single_label_accuracy" and y.ndim == 2:
        y = y[y.sum(1) == 1].argmax(1)
    elif metric != "accuracy" or y.ndim != 1:
        return None
    if not y.size:
        return None
    return float(np.bincount(y.astype(np.int64)).max() / y.size)


def bootstrap_cell(task: str, metric: str, n_classes: int, labels, probs_per_run: Sequence, n: int,
                   seed: int = 0) -> list[float]:
    """95 % percentile CI of the mean over runs, resampling test images (the same draw for
    every run, so runs that share a test set are not treated as independent samples)."""
    if not probs_per_run or n <= 0:
        return [float("nan"), float("nan")]
    fn = metric_fn(task, metric, n_classes)
    y = np.asarray(labels)
    probs = [np.asarray(p, dtype=np.float64) for p in probs_per_run]
    rng = np.random.default_rng(seed)
    stats = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(n):
            idx = rng.integers(0, len(y), len(y))
            stats.append(float(np.mean([fn(y[idx], p[idx]) for p in probs])))
    stats = np.asarray(stats)
    stats = stats[np.isfinite(stats)]
    if not stats.size:
        return [float("nan"), float("nan")]
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return [float(lo), float(hi)]
