"""A download with only some official splits opens the splits that are there (issue 11):
REFUGE with only Training400/ opens train; asking for val names the files it needs."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fundus_lab.data import open_dataset
from fundus_lab.data.images import DataError


def picture(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def training_only(tmp_path):
    for i in range(3):
        picture(tmp_path / "Training400" / "Glaucoma" / f"g{i:04d}.jpg", i)
        picture(tmp_path / "Training400" / "Non-Glaucoma" / f"n{i:04d}.jpg", 10 + i)
    return tmp_path


def test_refuge_with_only_training400_opens_train(training_only):
    ds = open_dataset("refuge", root=training_only, split="train", image_size=16)
    assert len(ds) == 6 and {r.split for r in ds.records} == {"train"}
    assert sorted(r.label for r in ds.records) == [0, 0, 0, 1, 1, 1]


def test_missing_split_names_the_files_it_needs(training_only):
    with pytest.raises(DataError) as err:
        open_dataset("refuge", root=training_only, split="val", image_size=16)
    msg = str(err.value)
    assert "'val'" in msg and "not downloaded" in msg and "REFUGE-Validation400-GT/*.xlsx" in msg


def test_all_splits_warns_which_are_missing(training_only):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = open_dataset("refuge", root=training_only, split=None, image_size=16)
    assert len(ds) == 6
    assert any("['val']" in str(w.message) for w in caught)


def test_nothing_downloaded_still_fails_listing_each_split(tmp_path):
    with pytest.raises(DataError, match="no records found") as err:
        open_dataset("refuge", root=tmp_path, split="train", image_size=16)
    assert "Training400/*/*.jpg" in str(err.value) and "val:" in str(err.value)
