"""Resumable, seeded data order for the trainer.

Why a module of its own: exact resume rests on two rules kept here, apart from the loop that
uses them: the data order is a function of (seed, epoch) alone (:class:`ResumableBatchSampler`)
and each sample's augmentation a function of (seed, epoch, index) (:class:`SeededSamples`), so
neither depends on worker count, prefetching or where a killed run stopped.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


class ResumableBatchSampler(Sampler):
    """Per-process batches of a seeded permutation, able to start mid-epoch.

    Epoch ``e`` shuffles with ``torch.randperm(n, generator=seed(seed, e))``; process ``r``
    of ``w`` takes every ``w``-th index from ``r`` (equal shares, the tail dropped), cuts
    it into full batches and yields ``[(index, sample_seed), ...]`` from batch ``start``.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def batches_per_epoch(self) -> int:
        return (self.n // self.world_size) // self.batch_size

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        gen = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
        order = torch.randperm(self.n, generator=gen).tolist()
        share = self.n // self.world_size
        mine = order[self.rank::self.world_size][:share]
        for b in range(self.start, self.batches_per_epoch()):
            idx = mine[b * self.batch_size:(b + 1) * self.batch_size]
            yield [(i, sample_seed(self.seed, self.epoch, i)) for i in idx]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for (run seed, epoch, sample index)."""
    return int(np.random.SeedSequence([seed, epoch, index + 1]).generate_state(2, np.uint64)[0] >> np.uint64(1))


@contextmanager
def isolated_rng(seed: int):
    """Seed python/numpy/torch for one block, then put the outer states back.

    Why: augmentation draws from the global RNGs; isolating it makes each sample's
    augmentation independent of worker count, prefetching and resume, and leaves the
    model's own stream (masks, dropout) untouched.
    """
    py, nps, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(nps)
        torch.set_rng_state(th)


class SeededSamples(Dataset):
    """Wraps a dataset so that ``ds[(index, seed)]`` fetches ``index`` under :func:`isolated_rng`."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with isolated_rng(seed):
            return self.dataset[index]


def to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def loader_options(num_workers: int, device: torch.device | str) -> dict:
    """DataLoader worker options: on a GPU, pinned host memory (asynchronous copies) and,
    with workers, persistent ones (not re-forked every epoch). Samples are seeded by
    position (:class:`SeededSamples`), so neither changes a batch."""
    cuda = torch.device(device).type == "cuda"
    return {"num_workers": num_workers, "pin_memory": cuda, "persistent_workers": cuda and num_workers > 0}
