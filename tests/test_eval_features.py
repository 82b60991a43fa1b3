"""Feature extraction: sharded over two processes it gives the one-process array (gathered
in dataset order on every rank, an odd dataset size included); its progress bar is switchable."""

import os
import socket

import numpy as np
import pytest
import torch

from fundus_lab.eval import features
from fundus_lab.eval.features import extract_features, shard_bounds
from doubles import ToyDataset, ToyViT

CLASSES = ["red", "green", "blue"]


@pytest.fixture(autouse=True)
def _fresh_cache():
    features.clear_cache()
    yield
    features.clear_cache()


def _dataset(n: int, multilabel: bool = False) -> ToyDataset:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (n, 3)) if multilabel else rng.integers(0, 3, n)
    return ToyDataset(labels, CLASSES, task="multilabel" if multilabel else "multiclass", seed=1)


def test_shards_are_contiguous_blocks_that_cover_the_dataset_in_order():
    for n in (1, 2, 7, 10):
        for world in (1, 2, 3, 4):
            blocks = [shard_bounds(n, r, world) for r in range(world)]
            assert [i for a, b in blocks for i in range(a, b)] == list(range(n))
    assert shard_bounds(7, 0, 2) == (0, 4) and shard_bounds(7, 1, 2) == (4, 7)
    assert shard_bounds(2, 3, 4) == (2, 2)  # more ranks than samples: an empty block


class CountingViT(ToyViT):
    """ToyViT that counts the images it encodes (each rank must encode only its block)."""

    seen = 0

    def image_features(self, images, mask_ratio=0.0):
        self.seen += len(images)
        return super().image_features(images, mask_ratio)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str):
    """One process first, then the same calls with accelerate's process group (as `accelerate
    launch` sets it up: the environment names the rank and the world size)."""
    torch.set_num_threads(1)
    model = CountingViT(width=8, depth=2, seed=0).eval()
    sets = {"odd": _dataset(7), "multilabel": _dataset(5, multilabel=True), "tiny": _dataset(1)}
    single = {name: extract_features(model, ds, kind="cls", batch_size=2, progress=False)
              for name, ds in sets.items()}
    assert features.process_group() == (0, 1)
    features.clear_cache()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), ACCELERATE_USE_CPU="true")
    assert features.process_group() == (rank, world)
    for name, ds in sets.items():
        model.seen = 0
        x, y = extract_features(model, ds, kind="cls", batch_size=2, progress=False)
        assert model.seen == len(range(*shard_bounds(len(ds), rank, world))), name  # its block only
        x1, y1 = single[name]
        assert x.shape == x1.shape and x.dtype == x1.dtype, name
        np.testing.assert_allclose(x, x1, rtol=1e-6, atol=1e-7, err_msg=name)
        assert y.dtype == y1.dtype and np.array_equal(y, y1), name
    np.save(os.path.join(out_dir, f"odd{rank}.npy"), extract_features(model, sets["odd"], kind="cls")[0])
    import torch.distributed as dist

    dist.destroy_process_group()


def test_two_processes_give_the_one_process_features_in_dataset_order(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = np.load(tmp_path / "odd0.npy"), np.load(tmp_path / "odd1.npy")
    assert rank0.shape[0] == 7 and np.array_equal(rank0, rank1)  # every rank holds all of it


def test_one_process_never_starts_a_process_group(monkeypatch):
    import torch.distributed as dist

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    extract_features(ToyViT(), _dataset(3), kind="cls", progress=False)
    assert not (dist.is_available() and dist.is_initialized())


def test_progress_bar_on_stderr_only_when_asked(capsys):
    ds = _dataset(5)
    extract_features(ToyViT(), ds, kind="cls", batch_size=2, progress=False)
    assert "features train" not in capsys.readouterr().err
    features.clear_cache()
    extract_features(ToyViT(), ds, kind="cls", batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert "features train" in err and "0/3 [" in err  # one step per batch of 2
