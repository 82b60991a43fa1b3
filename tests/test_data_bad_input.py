"""Bad input: every failure names the file, the field and what was expected; skip_bad
skips, counts and reports instead of raising, never silently."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from doubles import TWO_CLASS_MANIFEST as MANIFEST
from fundus_lab.data import collate, open_dataset
from fundus_lab.data.images import DataError, ImageError


def make(tmp_path: Path, rows: list[str], header: str = "image,label,patient", manifest: dict | None = None,
         images: bool = True) -> Path:
    (tmp_path / "img").mkdir(exist_ok=True)
    (tmp_path / "labels.csv").write_text("\n".join([header, *rows]) + "\n")
    if images:
        for row in rows:
            name = row.split(",")[0]
            arr = np.zeros((12, 12, 3), np.uint8)
            arr[2:10, 2:10] = (150, 70, 30)
            Image.fromarray(arr).save(tmp_path / "img" / name)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(manifest or MANIFEST, sort_keys=False))
    return path


GOOD = [f"a{i}.png,{i % 2},p{i // 2}" for i in range(8)]


def test_good_dataset_items_and_collate(tmp_path):
    ds = open_dataset(make(tmp_path, GOOD), split=None, image_size=8)
    assert len(ds) == 8 and ds.root == tmp_path.resolve()  # a manifest in the folder is its root
    item = ds[3]
    assert set(item) == {"image", "label", "text", "patient_id", "eye", "path", "index"}
    assert item["label"].item() == 1 and item["patient_id"] == "p1" and item["index"] == 3
    batch = collate([ds[0], ds[1], ds[2]])
    assert batch["image"].shape == (3, 3, 8, 8) and batch["label"].tolist() == [0, 1, 0]
    assert batch["text"] == [None, None, None] and batch["patient_id"] == ["p0", "p0", "p1"]
    assert batch["index"].tolist() == [0, 1, 2]
    with pytest.raises(IndexError):
        ds[8]


def test_missing_image_is_named_or_skipped_and_counted(tmp_path):
    path = make(tmp_path, GOOD)
    (tmp_path / "img" / "a5.png").unlink()
    with pytest.raises(DataError, match=r"labels.csv row 7 \(image 'a5.png'\): image file not found .*img/a5.png"):
        open_dataset(path, split=None)
    with pytest.warns(UserWarning, match="skipped 1 bad row"):
        ds = open_dataset(path, split=None, skip_bad=True)
    assert len(ds) == 7 and len(ds.skipped) == 1 and "a5.png" in ds.skipped[0]


def test_unknown_label_code(tmp_path):
    path = make(tmp_path, GOOD[:4] + ["x.png,7,p9"])
    with pytest.raises(DataError, match=r"labels.csv row 6 .*column 'label' has unknown label code '7'; expected one of \['0', '1'\]"):
        open_dataset(path, split=None)
    with pytest.warns(UserWarning, match="skipped 1"):
        assert len(open_dataset(path, split=None, skip_bad=True)) == 4


def test_missing_column_lists_what_the_file_has(tmp_path):
    path = make(tmp_path, [r.replace(",p", ",") for r in GOOD], header="image,label,subject")
    with pytest.raises(DataError, match=r"labels.csv: missing column for patient.column: expected 'patient'; the file has \['image', 'label', 'subject'\]"):
        open_dataset(path, split=None, skip_bad=True)  # structural: never skipped


def test_empty_and_header_only_annotation_files(tmp_path):
    path = make(tmp_path, GOOD)
    (tmp_path / "labels.csv").write_text("")
    with pytest.raises(DataError, match="annotation file .*labels.csv is empty"):
        open_dataset(path, split=None)
    (tmp_path / "labels.csv").write_text("image,label,patient\n")
    with pytest.raises(DataError, match="labels.csv has a header but no data rows"):
        open_dataset(path, split=None)


def test_missing_annotation_file(tmp_path):
    path = make(tmp_path, GOOD)
    (tmp_path / "labels.csv").unlink()
    with pytest.raises(DataError, match=r"sources\[0\].annotations: no file found under .* matching 'labels.csv'"):
        open_dataset(path, split=None)
    with pytest.raises(DataError, match="dataset root .* is not a directory"):
        open_dataset(path, root=tmp_path / "nowhere", split=None)


def test_empty_label_cell(tmp_path):
    path = make(tmp_path, GOOD[:4] + ["e.png,,p7"])
    with pytest.raises(DataError, match=r"row 6 \(image 'e.png'\): column 'label' \(label\) is empty"):
        open_dataset(path, split=None)


def test_corrupt_image_at_read_time(tmp_path):
    path = make(tmp_path, GOOD)
    (tmp_path / "img" / "a2.png").write_bytes(b"\x89PNG broken")
    ds = open_dataset(path, split=None, image_size=8)
    with pytest.raises(ImageError, match="a2.png cannot be read"):
        ds[2]
    ds = open_dataset(path, split=None, image_size=8, skip_bad=True)
    with pytest.warns(UserWarning, match="skipped unreadable image"):
        item = ds[2]
    assert item["index"] == 3 and len(ds.skipped) == 1  # the next good one, and counted
    ds = open_dataset(path, split=None, image_size=8, skip_bad=True)
    with pytest.warns(UserWarning, match="1 unreadable image"):
        bad = ds.verify()
    assert len(bad) == 1 and len(ds) == 7 and "a2.png" in ds.skipped[0]


def test_decompression_bomb_in_a_dataset(tmp_path):
    path = make(tmp_path, GOOD)
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 50_000, 50_000, 8, 2, 0, 0, 0))
    (tmp_path / "img" / "a1.png").write_bytes(bomb + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))
    ds = open_dataset(path, split=None, image_size=8)
    with pytest.raises(ImageError, match="a1.png"):
        ds[1]


def test_patient_in_two_official_splits_is_an_error(tmp_path):
    m = yaml.safe_load(yaml.safe_dump(MANIFEST))
    m["sources"][0]["split_column"] = "split"
    rows = [r + (",train" if i != 1 else ",test") for i, r in enumerate(GOOD)]
    path = make(tmp_path, rows, header="image,label,patient,split", manifest=m)
    with pytest.raises(DataError, match=r"1 patient\(s\) appear in more than one split \(p0: \['test', 'train'\]\)"):
        open_dataset(path, split=None)


def test_split_file_must_match_the_records(tmp_path):
    path = make(tmp_path, GOOD)
    split_file = tmp_path / "run" / "split.json"
    ds = open_dataset(path, split=None, split_file=split_file)
    assert split_file.is_file()
    (tmp_path / "labels.csv").write_text("\n".join(["image,label,patient", *GOOD[:6]]) + "\n")
    with pytest.raises(DataError, match=r"split file .*split.json does not match .* 2 file entr"):
        open_dataset(path, split=None, split_file=split_file)
    assert {r.split for r in ds.records} <= {"train", "val", "test"}


def test_bad_arguments(tmp_path):
    path = make(tmp_path, GOOD)
    with pytest.raises(ValueError, match="split='training'"):
        open_dataset(path, split="training")
    with pytest.raises(ValueError, match="subset="):
        open_dataset(path, subset="single")


def test_keyword_with_no_rule_is_an_error_by_default(tmp_path):
    m = yaml.safe_load(yaml.safe_dump(MANIFEST))
    m["task"] = "multilabel"
    m["sources"][0]["label"] = {"column": "label", "keyword": {"rules": [{"match": "normal", "label": "normal"},
                                                                          {"match": "glaucoma", "label": "glaucoma"},
                                                                          {"match": "lens dust", "label": None}]}}
    rows = ['a0.png,"normal fundus, lens dust",p0', 'a1.png,"glaucoma，macular hole",p1']
    path = make(tmp_path, rows, manifest=m)
    with pytest.raises(DataError, match=r"row 3 .*keyword 'macular hole' matches no rule"):
        open_dataset(path, split=None)


def test_text_field_must_be_a_meta_column(tmp_path):
    path = make(tmp_path, GOOD)
    with pytest.raises(ValueError, match="text_field='short_text': not a meta column of 'tiny'"):
        open_dataset(path, text_field="short_text")


def test_subset_keeps_the_dataset_description(tmp_path):
    ds = open_dataset(make(tmp_path, GOOD), split=None, image_size=8)
    sub = ds.subset([5, 2])
    assert [r.path for r in sub.records] == [ds.records[5].path, ds.records[2].path]
    assert sub.classes == ds.classes and sub.task == ds.task and len(ds) == 8
    assert sub[0]["label"].item() == ds.records[5].label
