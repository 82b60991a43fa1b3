"""Seeded, stratified, patient-grouped splits, checked against exact expected counts."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from fundus_lab.data.images import DataError
from fundus_lab.data.records import Record
from fundus_lab.data.splits import (
    assign_splits,
    check_patient_disjoint,
    load_split_file,
    make_splits,
    save_split_file,
)


def two_eyed(n_patients: int, n_classes: int = 5) -> list[Record]:
    recs = []
    for p in range(n_patients):
        for eye in ("left", "right"):
            label = p % n_classes if eye == "left" else max(0, p % n_classes - 1)
            recs.append(Record(path=f"/d/{p}_{eye}.png", label=label, patient_id=str(p), eye=eye))
    return recs


def test_same_seed_same_split_other_seed_other_split():
    a = assign_splits(two_eyed(60), {"train": 0.7, "val": 0.1, "test": 0.2}, seed=3)
    b = assign_splits(two_eyed(60), {"train": 0.7, "val": 0.1, "test": 0.2}, seed=3)
    c = assign_splits(two_eyed(60), {"train": 0.7, "val": 0.1, "test": 0.2}, seed=4)
    assert a == b and a != c


def test_stratified_by_patient_exact_proportions():
    recs = two_eyed(100)  # 20 patients per worst grade
    out = assign_splits(recs, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=0)
    per_patient = {}
    for r in recs:
        per_patient.setdefault(r.patient_id, set()).add(out[r.key()])
    assert all(len(s) == 1 for s in per_patient.values())  # both eyes together
    for grade in range(5):  # the stratum of a patient is the worse eye's grade = p % 5
        counts = Counter(next(iter(per_patient[str(p)])) for p in range(100) if p % 5 == grade)
        # u_j = (j + r) / n evenly spaced: each split gets n * fraction groups, +-1
        assert abs(counts["train"] - 12) <= 1 and abs(counts["val"] - 4) <= 1 and abs(counts["test"] - 4) <= 1


def test_multilabel_strata_spread_a_rare_class():
    recs = []
    for p in range(50):
        vec = [1, 0, 0] if p >= 6 else [0, 0, 1]  # class 2 rare: 6 patients
        if p % 7 == 0:
            vec = [0, 1, 0]
        recs.append(Record(path=f"/d/{p}.png", label=vec, patient_id=str(p)))
    out = assign_splits(recs, {"train": 0.5, "val": 0.25, "test": 0.25}, seed=0)
    rare = Counter(out[r.key()] for r in recs if r.label[2])
    assert rare["train"] >= 1 and rare["val"] >= 1 and rare["test"] >= 1


def test_no_requested_split_left_empty_when_groups_allow():
    recs = [Record(path=f"/d/{i}.png", label=0) for i in range(3)]
    out = assign_splits(recs, {"train": 0.9, "val": 0.05, "test": 0.05}, seed=0)
    assert sorted(out.values()) == ["test", "train", "val"]


def test_official_splits_are_kept_and_extend_to_the_patients_other_records():
    recs = two_eyed(10)
    recs[0].split = "test"  # patient 0 left eye officially in test
    for r in recs[10:]:
        r.split = "train"
    make_splits(recs, {"train": 0.5, "val": 0.5}, seed=0, stratify=True, root="/d")
    assert recs[1].split == "test"  # the other eye of patient 0 follows
    assert all(r.split == "train" for r in recs[10:])
    check_patient_disjoint(recs)


def test_disjointness_check_names_the_patients():
    recs = [Record(path="/d/a.png", label=0, patient_id="p1", split="train"),
            Record(path="/d/b.png", label=0, patient_id="p1", split="val")]
    with pytest.raises(DataError, match=r"p1: \['train', 'val'\]"):
        check_patient_disjoint(recs, "ds")


def test_split_file_round_trip(tmp_path):
    recs = two_eyed(20)
    make_splits(recs, {"train": 0.8, "test": 0.2}, seed=0, stratify=True, root="/d",
                split_file=tmp_path / "s.json", info={"dataset": "x"})
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["dataset"] == "x" and saved["splits"]["0_left.png"] == recs[0].split
    assert saved["patients"]["0_left.png"] == "0" and sum(saved["counts"].values()) == 40
    fresh = two_eyed(20)
    load_split_file(tmp_path / "s.json", fresh, "/d")
    assert [r.split for r in fresh] == [r.split for r in recs]
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json cannot be read as JSON"):
        load_split_file(tmp_path / "bad.json", fresh, "/d")
    save_split_file(tmp_path / "v.json", recs, "/d", {})
    data = json.loads((tmp_path / "v.json").read_text())
    data["splits"]["0_left.png"] = "holdout"
    (tmp_path / "v.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="expected train, val or test"):
        load_split_file(tmp_path / "v.json", two_eyed(20), "/d")
