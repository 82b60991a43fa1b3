"""The pre-decoded image cache: same tensors as decoding, invalidated by any change of key."""

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from fundus_lab.data import open_dataset, synth
from fundus_lab.data.cache import SUFFIX


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth-fives")
    return synth.generate(out / "synth-fives", "fives", n=24, seed=3, image_size=64, workers=1)


def _files(folder):
    return sorted(p.name for p in folder.glob(f"*{SUFFIX}"))


def test_cached_and_uncached_give_identical_tensors(manifest, tmp_path):
    plain = open_dataset(manifest, split="train", image_size=48)
    cached = open_dataset(manifest, split="train", image_size=48, image_cache=True, image_cache_dir=tmp_path)
    assert cached.image_cache is not None and len(_files(tmp_path)) == 1
    for i in range(len(plain)):
        assert torch.equal(plain[i]["image"], cached[i]["image"])
    # derived datasets (single-label view, subsets) share the cache by record
    sub = cached.subset([2, 0])
    assert torch.equal(sub[0]["image"], plain[2]["image"])
    # augmentation still runs, on the cached pixels: the same RNG state gives the same tensor
    plain.augment = cached.augment = True
    torch.manual_seed(7)
    a = plain[1]["image"]
    torch.manual_seed(7)
    b = cached[1]["image"]
    assert torch.equal(a, b) and not torch.equal(a, plain.load_image(1, augment=False))


def test_reopening_reuses_and_a_changed_key_rebuilds(manifest, tmp_path):
    ds = open_dataset(manifest, split="train", image_size=32, image_cache=True, image_cache_dir=tmp_path)
    first = _files(tmp_path)
    mtime = (tmp_path / first[0]).stat().st_mtime_ns
    again = open_dataset(manifest, split="train", image_size=32, image_cache=True, image_cache_dir=tmp_path)
    assert _files(tmp_path) == first and (tmp_path / first[0]).stat().st_mtime_ns == mtime
    # another size or split: another cache beside it
    open_dataset(manifest, split="train", image_size=40, image_cache=True, image_cache_dir=tmp_path)
    open_dataset(manifest, split="val", image_size=32, image_cache=True, image_cache_dir=tmp_path)
    assert len(_files(tmp_path)) == 3
    # an image rewritten on disk changes the key: rebuilt, the stale file removed, new pixels served
    rec = ds.records[0]
    rgb = np.asarray(Image.open(rec.path)).copy()
    rgb[:] = 200
    Image.fromarray(rgb).save(rec.path)
    os.utime(rec.path, ns=(mtime + 10**9, mtime + 10**9))
    rebuilt = open_dataset(manifest, split="train", image_size=32, image_cache=True, image_cache_dir=tmp_path)
    now = [f for f in _files(tmp_path) if f.startswith("synth-fives-train-32-")]
    assert len(now) == 1 and now != [f for f in first if f.startswith("synth-fives-train-32-")]
    assert torch.equal(rebuilt[0]["image"], open_dataset(manifest, split="train", image_size=32)[0]["image"])
    assert rebuilt[0]["image"].mean() > 0.5 and again.image_cache.path != rebuilt.image_cache.path


def test_cache_pickles_without_its_array_and_reports_unreadable_images(manifest, tmp_path):
    ds = open_dataset(manifest, split="val", image_size=32, image_cache=True, image_cache_dir=tmp_path)
    ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.image_cache._array is None and torch.equal(clone[0]["image"], ds[0]["image"])
    # an unreadable file is not cached: the item raises the usual ImageError naming the file
    bad = open_dataset(manifest, split="test", image_size=32)
    with open(bad.records[0].path, "wb") as f:
        f.write(b"not a png")
    from fundus_lab.data.images import ImageError
    cached = open_dataset(manifest, split="test", image_size=32, image_cache=True, image_cache_dir=tmp_path)
    assert cached.image_cache.row(cached.records[0]) is None
    with pytest.raises(ImageError, match=os.path.basename(bad.records[0].path)):
        cached[0]


def test_dataloader_batches_run_per_image_work_on_one_thread(manifest, tmp_path):
    from torch.utils.data import DataLoader
    from fundus_lab.data import collate
    ds = open_dataset(manifest, split="train", image_size=32, image_cache=True, image_cache_dir=tmp_path)
    before = torch.get_num_threads()
    batch = next(iter(DataLoader(ds, batch_size=4, shuffle=False, collate_fn=collate)))
    assert torch.get_num_threads() == before
    assert torch.equal(batch["image"], torch.stack([ds[i]["image"] for i in range(4)]))
