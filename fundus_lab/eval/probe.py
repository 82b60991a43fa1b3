"""Linear probes on frozen image features (logistic regression, C chosen on validation).

The probe is CLIP's: L2-regularised logistic regression on standardised features, the
inverse regularisation C picked from a log grid on a validation set that comes from the
*training* data (or its validation split), never from the set the probe is scored on.
Few-shot learning uses the same :func:`fit_probe` on k samples per class.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.preprocessing import StandardScaler

from fundus_lab.eval.features import dataset_labels, extract_features
from fundus_lab.eval.metrics import compute_metrics, primary_metric

C_GRID = tuple(float(c) for c in np.logspace(-3, 3, 7))


@dataclass
class Probe:
    """A fitted probe: standardiser + logistic regression (one-vs-rest for multilabel)."""

    task: str
    n_classes: int
    scaler: StandardScaler
    clf: object
    C: float

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """[N, D] -> [N, C] class probabilities (per-class sigmoids for multilabel)."""
        x = self.scaler.transform(features)
        if self.task == "multilabel":
            return np.stack([_positive_proba(est, x) for est in self.clf.estimators_], axis=1)
        proba = self.clf.predict_proba(x)
        # classes absent from the training samples get probability 0, in class order
        out = np.zeros((len(x), self.n_classes))
        out[:, self.clf.classes_.astype(int)] = proba
        return out


def _positive_proba(est, x: np.ndarray) -> np.ndarray:
    if hasattr(est, "predict_proba"):
        p = est.predict_proba(x)
        return p[:, -1] if p.shape[1] > 1 else np.full(len(x), float(getattr(est, "classes_", [0])[-1] == 1))
    return np.full(len(x), float(est.predict(x[:1])[0]))  # constant predictor (one class seen)


def fit_logistic(features: np.ndarray, labels: np.ndarray, task: str, n_classes: int, C: float,
                 max_iter: int = 1000) -> Probe:
    """Fit one probe with regularisation ``C`` (bigger = weaker penalty) on standardised features."""
    scaler = StandardScaler().fit(features)
    x = scaler.transform(features)
    base = LogisticRegression(C=C, max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", UserWarning)  # one-vs-rest on a class never seen
        if task == "multilabel":
            clf = OneVsRestClassifier(base).fit(x, labels.astype(int))
        else:
            if len(np.unique(labels)) < 2:
                raise ValueError(f"a probe needs samples of at least 2 classes; got only class {np.unique(labels)}")
            clf = base.fit(x, labels)
    return Probe(task, n_classes, scaler, clf, C)


def _val_score(task: str, labels: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """(primary metric, -log loss): the primary metric decides, log loss breaks ties
    (tiny few-shot validation sets tie often)."""
    metric = compute_metrics(task, labels, probs)[primary_metric(task)]
    eps = 1e-7
    if task == "multilabel":
        p = np.clip(probs, eps, 1 - eps)
        nll = -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    else:
        nll = -np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels.astype(int)], eps, 1)))
    return (metric if np.isfinite(metric) else -np.inf, -nll)


def fit_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    task: str,
    n_classes: int,
    C_grid=C_GRID,
) -> tuple[Probe, dict]:
    """Choose C on (val_x, val_y), then return the probe fitted on the training samples.

    Returns (probe, {"C": chosen, "val": {C: (metric, -logloss)}}).
    """
    scores = {}
    for C in C_grid:
        probe = fit_logistic(train_x, train_y, task, n_classes, C)
        scores[C] = _val_score(task, val_y, probe.predict_proba(val_x))
    best = max(C_grid, key=lambda c: scores[c])
    return fit_logistic(train_x, train_y, task, n_classes, best), {"C": best, "val": {str(c): list(s) for c, s in scores.items()}}


def holdout_indices(ds, fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split a training set into (fit, validation) indices by patient, so one patient's two
    eyes never sit on both sides of the C choice; stratified by label where possible."""
    n = len(ds)
    rng = np.random.default_rng(seed)
    records = getattr(ds, "records", None)
    groups = [r.patient_id if r.patient_id is not None else f"#{i}" for i, r in enumerate(records)] if records else [
        f"#{i}" for i in range(n)]
    uniq = np.array(sorted(set(groups)))
    rng.shuffle(uniq)
    n_val = max(1, int(round(fraction * len(uniq))))
    val_groups = set(uniq[:n_val])
    val = np.array([i for i, g in enumerate(groups) if g in val_groups], dtype=np.int64)
    fit = np.array([i for i, g in enumerate(groups) if g not in val_groups], dtype=np.int64)
    return fit, val


def linear_probe(
    model,
    train_ds,
    test_ds,
    val_ds=None,
    C_grid=C_GRID,
    features: str = "cls",
    batch_size: int = 64,
    bootstrap: int = 0,
    seed: int = 0,
    cache_dir=None,
    progress: bool = True,
) -> dict:
    """Logistic regression on frozen features of the whole training split
    (``progress``: the feature-extraction bars).

    C is chosen on ``val_ds`` if given, else on a patient-grouped 20 % holdout of
    ``train_ds``; the final probe is refitted on all of ``train_ds``. ``test_ds`` is only
    scored.

    Returns {"metrics", "probs", "labels", "C", "val_scores"}.
    """
    from fundus_lab.eval.honesty import assert_disjoint

    assert_disjoint(train_ds, test_ds, "linear probe train", "test")
    task, n_classes = test_ds.task, len(test_ds.classes)
    kw = dict(kind=features, batch_size=batch_size, cache_dir=cache_dir, progress=progress)
    tx, ty = extract_features(model, train_ds, **kw)
    if val_ds is not None:
        assert_disjoint(val_ds, test_ds, "linear probe validation", "test")
        vx, vy = extract_features(model, val_ds, **kw)
        _, info = fit_probe(tx, ty, vx, vy, task, n_classes, C_grid)
    else:
        fit, val = holdout_indices(train_ds, seed=seed)
        _, info = fit_probe(tx[fit], ty[fit], tx[val], ty[val], task, n_classes, C_grid)
    probe = fit_logistic(tx, ty, task, n_classes, info["C"])
    x, y = extract_features(model, test_ds, **kw)
    probs = probe.predict_proba(x)
    return {
        "metrics": compute_metrics(task, y, probs, bootstrap=bootstrap, seed=seed),
        "probs": probs, "labels": y, "C": info["C"], "val_scores": info["val"],
    }


__all__ = ["C_GRID", "Probe", "fit_logistic", "fit_probe", "holdout_indices", "linear_probe", "dataset_labels"]
