"""Few-shot learning: k labelled images per class, several seeds.

The paper's protocol, :func:`few_shot_fine_tune` (Table 1's few-shot column), fine-tunes the
image encoder on the k-shot set with the fine-tune column's recipe (layer-wise lr decay,
early stopping on a validation subset of max(k, 4) images per class). The field's
convention, :func:`few_shot` (Table 2's linear probe), keeps the encoder frozen; two heads
are trained on the same k-shot samples:

- ``probe``: logistic regression on frozen image features (:mod:`fundus_lab.eval.probe`),
  its regularisation C chosen on a validation subset drawn from the *training* data
  (or ``val_ds``), disjoint from the shots, of max(k, 4) images per class: a realistic
  k-shot learner has few labels for validation too, and the test set is never consulted.
- ``prompt_head``: a linear head on the joint image-text space initialised from the
  class-prompt embeddings (so at step 0 it *is* the zero-shot classifier), then trained
  briefly on the shots with a pull back towards that start (CLAP-style):
      loss = CE(s * z W^T + b, y) + lambda * ||W - W_0||^2,   W_0 = t (class embeddings)
  lambda is chosen on the same validation subset. Image-only models have no prompts, so
  this head is absent (None) for them.

Shapes: features [N, D]; labels [N] int or [N, C] multi-hot; shots sampled per class.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from fundus_lab.eval.features import dataset_labels, extract_features, is_main_process
from fundus_lab.eval.fine_tune import fine_tune, predict
from fundus_lab.eval.honesty import assert_disjoint
from fundus_lab.eval.metrics import compute_metrics, primary_metric
from fundus_lab.eval.probe import C_GRID, fit_probe
from fundus_lab.eval.zero_shot import class_embeddings, has_text_encoder, logit_scale, negative_prompts, resolve_prompts

LAMBDA_GRID = (0.0, 0.1, 1.0, 10.0)


def sample_few_shot(labels: np.ndarray, k: int, seed: int, exclude: Sequence[int] = (), purpose: str = "") -> np.ndarray:
    """Indices of k samples per class, drawn reproducibly (same labels, k, seed -> same set).

    ``labels`` is [N] class indices, or [N, C] multi-hot (then each class gets k positives;
    a sample positive for several classes counts for all of them). Classes with fewer
    than k candidates give all they have (with a warning); a class with none is an error.
    ``purpose`` names a validation draw in that warning (its k is not the run's k).
    Returns sorted int64 indices.
    """
    if k < 1:
        raise ValueError(f"k={k}; need at least one shot per class")
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, k])
    excluded = np.zeros(len(labels), dtype=bool)
    excluded[np.asarray(list(exclude), dtype=np.int64)] = True
    onehot = labels.astype(bool) if labels.ndim == 2 else labels[:, None] == np.arange(int(labels.max()) + 1)[None]
    chosen = np.zeros(len(labels), dtype=bool)
    short = []
    for c in rng.permutation(onehot.shape[1]):
        positives = np.flatnonzero(onehot[:, c] & ~excluded)
        if positives.size == 0 and labels.ndim == 1 and not onehot[:, c].any():
            continue  # class index never used by this label set
        have = int((onehot[:, c] & chosen).sum())  # multilabel: already covered by other picks
        candidates = np.flatnonzero(onehot[:, c] & ~excluded & ~chosen)
        need = max(0, k - have)
        if candidates.size < need:
            short.append((int(c), candidates.size + have))
            if candidates.size + have == 0:
                raise ValueError(f"class {int(c)} has no samples to draw shots from")
        chosen[rng.permutation(candidates)[:need]] = True
    if short:
        if purpose:  # a validation draw: its size is not the k the run is at, so say which run it serves
            warnings.warn(f"fewer than k_val={k} samples for classes (class, available): {sorted(short)} in {purpose}")
        else:
            warnings.warn(f"fewer than k={k} samples for classes (class, available): {sorted(short)}")
    return np.flatnonzero(chosen).astype(np.int64)


def _aggregate(runs: list[dict]) -> dict:
    """Mean and std (over seeds) of every scalar metric of the runs."""
    names = [k for k, v in runs[0]["metrics"].items() if isinstance(v, float)]
    stack = {k: np.array([r["metrics"][k] for r in runs], dtype=np.float64) for k in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return {
            "mean": {k: float(np.nanmean(v)) for k, v in stack.items()},
            "std": {k: float(np.nanstd(v)) for k, v in stack.items()},
            "n_seeds": len(runs),
            "runs": runs,
        }


class PromptHead(torch.nn.Module):
    """logits = s * z W^T + b, W initialised at the class-prompt embeddings.

    Multilabel: logits_c = s * (<z, w_c> - <z, n_c>) + b_c with n_c the "no <class>"
    embeddings, matching the zero-shot scoring so that step 0 reproduces it.
    """

    def __init__(self, text: torch.Tensor, scale: float, negative: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("w0", text.clone())
        self.weight = torch.nn.Parameter(text.clone())
        self.bias = torch.nn.Parameter(torch.zeros(text.shape[0]))
        self.negative = None if negative is None else torch.nn.Parameter(negative.clone())
        self.scale = scale

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        logits = self.scale * z @ self.weight.T
        if self.negative is not None:
            logits = logits - self.scale * z @ self.negative.T
        return logits + self.bias

    def probs(self, z: torch.Tensor) -> torch.Tensor:
        logits = self(z)
        return torch.sigmoid(logits) if self.negative is not None else torch.softmax(logits, -1)


def train_prompt_head(
    z: np.ndarray, y: np.ndarray, text: torch.Tensor, scale: float, task: str,
    negative: torch.Tensor | None = None, lam: float = 1.0, steps: int = 100, lr: float = 5e-3, seed: int = 0,
) -> PromptHead:
    """Full-batch Adam on the shots; the penalty lam * ||W - W_0||^2 keeps it near zero-shot."""
    torch.manual_seed(seed)
    head = PromptHead(text.float(), scale, negative.float() if task == "multilabel" and negative is not None else None)
    x = torch.nn.functional.normalize(torch.as_tensor(z, dtype=torch.float32), dim=-1)
    target = torch.as_tensor(y, dtype=torch.float32 if task == "multilabel" else torch.long)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(steps):
        logits = head(x)
        if task == "multilabel":
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
        else:
            loss = torch.nn.functional.cross_entropy(logits, target)
        loss = loss + lam * (head.weight - head.w0).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head


def _head_probs(head: PromptHead, z: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        x = torch.nn.functional.normalize(torch.as_tensor(z, dtype=torch.float32), dim=-1)
        return head.probs(x).numpy()


def few_shot(
    model,
    train_ds,
    test_ds,
    shots: Sequence[int] = (1, 2, 4, 8, 16),
    seeds: int | Sequence[int] = 5,
    val_ds=None,
    C_grid=C_GRID,
    features: str = "cls",
    prompts=None,
    prompt_head: bool = True,
    head_steps: int = 100,
    batch_size: int = 64,
    cache_dir=None,
    progress: bool = True,
) -> dict:
    """k-shot probes (and prompt-initialised heads) for each k in ``shots`` over seeds.

    Args:
        seeds: a count (seeds 0..n-1) or explicit seeds; each draws its own shots.
        val_ds: where the validation subset comes from (default: ``train_ds`` minus shots).
        features: ``cls`` (ViT class token, every method has one) or ``embed`` for the probe;
            the prompt head always uses ``embed`` (the space the prompts live in).
        progress: bars for feature extraction and one over the (k, seed) runs, on the main process.
    Returns:
        {"shots": {k: {"probe": {"mean", "std", "n_seeds", "runs"}, "prompt_head": same | None}},
         "task", "classes", "features"}; each run records its seed, shot and validation
        indices into the training/validation set, and the chosen C or lambda.
    """
    assert_disjoint(train_ds, test_ds, "few-shot train", "test")
    if val_ds is not None:
        assert_disjoint(val_ds, test_ds, "few-shot validation", "test")
    task, n_classes = test_ds.task, len(test_ds.classes)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    kw = dict(batch_size=batch_size, cache_dir=cache_dir, progress=progress)
    tx, ty = extract_features(model, train_ds, kind=features, **kw)
    sx, sy = extract_features(model, test_ds, kind=features, **kw)
    vx, vy = (None, None)
    if val_ds is not None:
        vx, vy = extract_features(model, val_ds, kind=features, **kw)

    use_head = prompt_head and has_text_encoder(model)
    if use_head:
        class_prompts = resolve_prompts(test_ds, prompts)
        text = class_embeddings(model, class_prompts).cpu()
        negative = class_embeddings(model, negative_prompts(test_ds, class_prompts)).cpu() if task == "multilabel" else None
        scale = logit_scale(model)
        tz, _ = extract_features(model, train_ds, kind="embed", **kw)
        sz, _ = extract_features(model, test_ds, kind="embed", **kw)
        vz = extract_features(model, val_ds, kind="embed", **kw)[0] if val_ds is not None else None

    results = {}
    bar = tqdm(total=len(shots) * len(seed_list), desc="few-shot seeds", unit="seed",
               disable=not (progress and is_main_process()), leave=False)
    for k in shots:
        probe_runs, head_runs = [], []
        for seed in seed_list:
            bar.set_postfix(k=k, seed=seed)
            idx = sample_few_shot(ty, k, seed)
            k_val = max(k, 4)
            val_purpose = f"the validation draw of the k={k} run"  # so a k=1 run never reads "fewer than k=4"
            if val_ds is None:
                val_idx = sample_few_shot(ty, k_val, seed + 10_000, exclude=idx, purpose=val_purpose)
                px, py = tx[val_idx], ty[val_idx]
            else:
                val_idx = sample_few_shot(vy, k_val, seed + 10_000, purpose=val_purpose)
                px, py = vx[val_idx], vy[val_idx]
            probe, info = fit_probe(tx[idx], ty[idx], px, py, task, n_classes, C_grid)
            probe_runs.append({
                "seed": seed, "shots": idx.tolist(), "val": val_idx.tolist(), "C": info["C"],
                "metrics": compute_metrics(task, sy, probe.predict_proba(sx)),
            })
            if use_head:
                pz = tz[val_idx] if val_ds is None else vz[val_idx]
                best, best_score = None, None
                for lam in LAMBDA_GRID:
                    head = train_prompt_head(tz[idx], ty[idx], text, scale, task, negative, lam, head_steps, seed=seed)
                    m = compute_metrics(task, py, _head_probs(head, pz))[primary_metric(task)]
                    m = m if np.isfinite(m) else -np.inf
                    if best_score is None or m > best_score:
                        best, best_score, best_lam = head, m, lam
                head_runs.append({
                    "seed": seed, "shots": idx.tolist(), "val": val_idx.tolist(), "lambda": best_lam,
                    "metrics": compute_metrics(task, sy, _head_probs(best, sz)),
                })
            bar.update()
        results[int(k)] = {"probe": _aggregate(probe_runs), "prompt_head": _aggregate(head_runs) if use_head else None}
    bar.close()
    return {"shots": results, "task": task, "classes": list(test_ds.classes), "features": features}


def few_shot_fine_tune(
    model,
    train_ds,
    val_ds,
    test_ds,
    shots: Sequence[int] = (1, 2, 4, 8, 16),
    seeds: int | Sequence[int] = 5,
    score_at: int | None = None,
    other_tests: Mapping[str, Any] | None = None,
    epochs: int = 30,
    patience: int = 10,
    progress: bool = True,
    **fine_tune_kwargs,
) -> dict:
    """The paper's few-shot protocol: fine-tune a copy of ``model`` on k labelled images per
    class, for each k in ``shots`` and each seed, with :func:`fundus_lab.eval.fine_tune.fine_tune`.

    The shots are drawn from ``train_ds`` and the validation subset (max(k, 4) per class,
    which picks the epoch and stops training) from ``val_ds``, with the same draws as
    :func:`few_shot`'s probe (``sample_few_shot(labels, k, seed)`` and
    ``(..., max(k, 4), seed + 10_000)``), so both protocols see the same images.
    ``test_ds`` is scored for every k (the curve); at ``k == score_at`` the fine-tuned
    classifier also scores ``other_tests`` ({name: dataset}) and the test predictions of
    every seed are returned. ``fine_tune_kwargs``: lr, layer_decay, weight_decay,
    batch_size, class_balanced, warmup_epochs (:func:`~fundus_lab.eval.fine_tune.fine_tune`).

    Returns:
        {"shots": {k: {"fine_tune": {"mean", "std", "n_seeds", "runs"}}}, "task", "classes",
         "predictions": {"test" | name: [probs per seed]}, "labels": {"test" | name: labels}}
        (predictions and labels empty unless ``score_at`` is one of ``shots``); each run
        records its seed, shot and validation indices, best epoch and validation score.
    """
    task = test_ds.task
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    train_y, val_y = dataset_labels(train_ds), dataset_labels(val_ds)
    batch_size = int(fine_tune_kwargs.get("batch_size", 32))
    results, predictions, labels = {}, {}, {}
    bar = tqdm(total=len(shots) * len(seed_list), desc="few-shot fine-tunes", unit="run",
               disable=not (progress and is_main_process()), leave=False)
    for k in shots:
        runs = []
        for seed in seed_list:
            bar.set_postfix(k=k, seed=seed)
            idx = sample_few_shot(train_y, k, seed)
            val_idx = sample_few_shot(val_y, max(k, 4), seed + 10_000)
            scored = k == score_at
            r = fine_tune(model, train_ds.subset(idx), val_ds.subset(val_idx), test_ds, epochs=epochs,
                          patience=patience, seed=seed, return_model=scored and bool(other_tests), progress=False,
                          **fine_tune_kwargs)
            classifier = r.pop("model", None)
            if scored:
                predictions.setdefault("test", []).append(r["probs"])
                labels["test"] = r["labels"]
                for name, ds in (other_tests or {}).items():
                    probs, y = predict(classifier, ds, task, batch_size)
                    predictions.setdefault(name, []).append(probs)
                    labels[name] = y
            del classifier
            runs.append({"seed": seed, "shots": idx.tolist(), "val": val_idx.tolist(), "best_epoch": r["best_epoch"],
                         "best_val": r["best_val"], "selection_metric": r["selection_metric"],
                         "epochs_run": len(r["history"]), "metrics": r["metrics"]})
            bar.update()
        results[int(k)] = {"fine_tune": _aggregate(runs)}
    bar.close()
    return {"shots": results, "task": task, "classes": list(test_ds.classes), "predictions": predictions,
            "labels": labels}


__all__ = ["LAMBDA_GRID", "PromptHead", "few_shot", "few_shot_fine_tune", "sample_few_shot", "train_prompt_head"]
