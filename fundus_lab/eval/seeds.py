"""Pretraining seeds as an axis of Table 1: the hierarchical bootstrap and paired verdicts.

A Table 1 cell holds, for every pretraining seed, the test predictions of each evaluation run
(few-shot draws, fine-tuning seeds) on one shared test set. Two sources of noise move its
number: which pretraining run one got (training noise) and which test images one scored
(sampling noise). The hierarchical bootstrap resamples both, in that order:

    for each of B replicates:
        draw S seeds from the S pretraining seeds, with replacement
        for each drawn seed: draw n test images from the n, with replacement
        replicate = mean over drawn seeds of (mean over that seed's runs of metric(resampled images))

The 95 % CI is the 2.5 and 97.5 percentiles of the replicates. With one seed only the images
are resampled (the seed draw is skipped, so the random stream is the image-only bootstrap's:
one-seed tables keep their CIs).

Paired: every row of a column is scored on the same replicates (the same seed draws, the same
image draws per drawn seed; the seeds of two rows are paired by position, the same
``eval.pretrain_seeds`` entry), so the difference of two rows' replicates is the paired
bootstrap of their difference. A pair is separated when that 95 % CI excludes 0. No
correction for the number of pairs is made: each CI is a per-pair 95 % interval.

Written with numpy: ``rliable``'s stratified bootstrap resamples runs within tasks, one level;
this two-level resample (seeds, then images within each seed) and its pairing are not in it.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Sequence

import numpy as np

UNMEASURED = "training noise unmeasured"
ESTIMATOR = ("hierarchical percentile bootstrap (numpy): resample pretraining seeds, then test images within "
             "each drawn seed")


def hierarchical_draws(n_seeds: int, n_test: int, n_boot: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(seed indices ``[B, S]``, image indices ``[B, S, n]``) of ``n_boot`` replicates.

    One seed: the seed index is always 0 and nothing is drawn for it, so the stream of image
    draws is that of a plain image bootstrap seeded with ``seed``."""
    if n_seeds < 1 or n_test < 1:
        raise ValueError(f"hierarchical_draws: needs at least one seed and one test image (got {n_seeds}, {n_test})")
    rng = np.random.default_rng(seed)
    seeds = np.zeros((n_boot, n_seeds), dtype=np.int64)
    images = np.empty((n_boot, n_seeds, n_test), dtype=np.int64)
    for b in range(n_boot):
        if n_seeds > 1:
            seeds[b] = rng.integers(0, n_seeds, n_seeds)
        for j in range(n_seeds):
            images[b, j] = rng.integers(0, n_test, n_test)
    return seeds, images


def replicates(fn: Callable[[np.ndarray, np.ndarray], float], labels, probs_by_seed: Sequence[Sequence],
               draws: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The bootstrap replicates ``[B]`` of one row's cell.

    Args:
        fn: ``fn(y_true, probs) -> float``, the table metric.
        labels: the shared test labels ``[n]`` (or ``[n, C]`` multi-hot).
        probs_by_seed: per pretraining seed, the probabilities of each evaluation run ``[n, C]``.
            A row with one seed (an outside model: one set of weights) stands for every seed.
        draws: :func:`hierarchical_draws` for this column's seed count and test size.
    """
    seeds, images = draws
    n_seeds = seeds.shape[1]
    if len(probs_by_seed) not in (1, n_seeds):
        raise ValueError(f"replicates: the row has {len(probs_by_seed)} pretraining seeds, the column {n_seeds}")
    y = np.asarray(labels)
    probs = [[np.asarray(p, dtype=np.float64) for p in runs] for runs in probs_by_seed]
    out = np.empty(len(seeds))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for b in range(len(seeds)):
            per_seed = []
            for j, s in enumerate(seeds[b]):
                idx = images[b, j]
                runs = probs[s if len(probs) > 1 else 0]
                per_seed.append(np.mean([fn(y[idx], p[idx]) for p in runs]))
            out[b] = np.mean(per_seed)
    return out


def percentile_ci(stats: np.ndarray, alpha: float = 0.05) -> list[float]:
    """``[lo, hi]``: the ``alpha / 2`` and ``1 - alpha / 2`` percentiles of the finite replicates."""
    stats = np.asarray(stats, dtype=np.float64)
    stats = stats[np.isfinite(stats)]
    if not stats.size:
        return [float("nan"), float("nan")]
    lo, hi = np.percentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return [float(lo), float(hi)]


def seed_sd(seed_means: Sequence[float]) -> float | None:
    """Sample standard deviation (ddof = 1) over pretraining seeds; None with one seed."""
    vals = [float(v) for v in seed_means if v is not None and math.isfinite(float(v))]
    return float(np.std(vals, ddof=1)) if len(vals) > 1 else None


def verdict(ci: Sequence[float], seeds: int) -> str:
    """``A > B`` (the CI of A - B is above 0), ``B > A`` (below 0), ``not separated`` (it holds 0),
    or :data:`UNMEASURED` (empty verdict) when fewer than two pretraining seeds ran: one run
    per method cannot show training noise, which can exceed the CI over test images."""
    if seeds < 2:
        return ""
    lo, hi = ci
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return ""
    if lo > 0:
        return "A > B"
    if hi < 0:
        return "B > A"
    return "not separated"


__all__ = ["ESTIMATOR", "UNMEASURED", "hierarchical_draws", "percentile_ci", "replicates", "seed_sd", "verdict"]
