"""Synthetic dataset folders: contract layout, determinism, splits, tasks and reports."""

import csv
import filecmp
import re

import numpy as np
import pandas as pd
import pytest

from fundus_lab import knowledge
from fundus_lab.data import synth

HEADER = ("image_id,image,mask,patient_id,eye,age,camera,split,N,D,G,C,A,H,M,O,dr_grade,dme,cdr,"
          "fives_class,text,short_text,definition_text,unseen_class")
SIZE = 64


@pytest.fixture(scope="module")
def odir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth-odir")
    synth.write_dataset(out, "odir", n=40, seed=1, image_size=SIZE, workers=1)
    return out, pd.read_csv(out / "labels.csv", keep_default_na=False)


def _write(tmp_path_factory, task, n, seed=0):
    out = tmp_path_factory.mktemp(f"synth-{task}")
    synth.write_dataset(out, task, n=n, seed=seed, image_size=SIZE, workers=1)
    return pd.read_csv(out / "labels.csv", keep_default_na=False)


def test_header_and_files_follow_the_contract(odir):
    out, df = odir
    with open(out / "labels.csv", newline="") as f:
        assert next(csv.reader(f)) == HEADER.split(",")
    assert len(df) == 40 and df.image_id.is_unique
    lesion_keys = set(knowledge.lesion_keys())
    for row in df.itertuples():
        from PIL import Image
        im = Image.open(out / row.image)
        assert im.mode == "RGB" and im.size == (SIZE, SIZE)
        with np.load(out / row.mask) as z:
            assert set(z.files) <= lesion_keys
            for k in z.files:
                assert z[k].dtype == bool and z[k].shape == (SIZE, SIZE) and z[k].any()
            if row.N == 1:
                assert z.files == []                     # a normal eye has no lesion
    assert set(df.eye) == {"left", "right"}
    assert set(df.split) == {"train", "val", "test", "test_camera"}    # every split at n=40


def test_odir_labels_are_consistent(odir):
    _, df = odir
    codes = df[list("NDGCAHMO")].to_numpy()
    assert ((codes[:, 0] == 1) == (codes[:, 1:].sum(1) == 0)).all()   # N iff nothing else
    assert (codes.sum(1) == 1).mean() > 0.6                          # mostly single-label
    assert codes[:, 1:].sum(0).astype(bool).sum() >= 5               # most categories present
    assert ((df.D == 1) == ((df.dr_grade > 0) | (df.dme > 0))).all()
    assert (df.cdr[df.G == 1] >= 0.6).all() and (df.cdr[df.G == 0] <= 0.45).all()
    single = codes.sum(1) == 1
    for row, one in zip(df.itertuples(), single):
        letters = [c for c in "NDGCAHMO" if getattr(row, c)]
        assert row.fives_class == (letters[0] if one and letters[0] in "ADGN" else "")


def test_patients_never_cross_splits_and_test_camera_is_the_held_out_camera(odir):
    _, df = odir
    per_patient = df.groupby("patient_id").agg(splits=("split", "nunique"), cams=("camera", "nunique"),
                                               eyes=("eye", "nunique"), ages=("age", "nunique"))
    assert (per_patient.splits == 1).all() and (per_patient.cams == 1).all()
    assert (per_patient.eyes == 2).all() and (per_patient.ages == 1).all()
    assert ((df.split == "test_camera") == (df.camera == synth.HELD_OUT)).all()
    # the in-domain test split: training cameras, patients seen nowhere else
    assert (df.split == "test").any() and set(df.camera[df.split == "test"]) <= set(synth.TRAIN_CAMERAS)


def test_split_fractions_and_classes_reach_every_split():
    """Slots are a fixed function of the patient index: 6/11 train, 1/11 val, 2/11 test,
    2/11 test_camera; the class schedules (index % 4, % 5) reach every split."""
    from collections import Counter
    from fundus_lab.data.synth.labels import patient_split
    counts = Counter(patient_split(i, True) for i in range(1100))
    assert counts == {"train": 600, "val": 100, "test": 200, "test_camera": 200}
    assert {patient_split(i, True) for i in range(9)} == {"train", "val", "test", "test_camera"}
    assert {patient_split(i, False) for i in range(1100)} == {"train", "val", "test"}
    for k in (4, 5):
        for split in ("train", "val", "test", "test_camera"):
            assert {i % k for i in range(1100) if patient_split(i, True) == split} == set(range(k))


def test_open_dataset_reads_every_split(tmp_path):
    from fundus_lab.data import open_dataset
    manifest = synth.generate(tmp_path / "synth-aptos", "aptos", n=30, seed=0, image_size=SIZE, workers=1)
    seen = {}
    for split in ("train", "val", "test", "test_camera"):
        ds = open_dataset(manifest, split=split, image_size=32)
        seen[split] = {r.patient_id for r in ds.records}
        assert len(ds) > 0 and ds[0]["image"].shape == (3, 32, 32)
    assert all(not (seen[a] & seen[b]) for a in seen for b in seen if a < b)


def test_pretrain_uses_training_cameras_only(tmp_path_factory):
    df = _write(tmp_path_factory, "pretrain", 24)
    assert set(df.camera) <= set(synth.TRAIN_CAMERAS) and set(df.split) == {"train", "val"}


def test_fives_is_balanced_single_label(tmp_path_factory):
    df = _write(tmp_path_factory, "fives", 16)
    assert sorted(df.fives_class.value_counts().to_dict().items()) == [("A", 4), ("D", 4), ("G", 4), ("N", 4)]
    assert (df[list("NDGCAHMO")].sum(axis=1) == 1).all()


def test_aptos_covers_every_grade(tmp_path_factory):
    df = _write(tmp_path_factory, "aptos", 20)
    assert set(df.dr_grade) == {0, 1, 2, 3, 4}
    assert (df[list("GCAHMO")].to_numpy() == 0).all()
    assert (df.short_text[df.dr_grade == 0] == knowledge.name("dr_grade_0")).all()


def test_reports_name_the_diagnosis_and_negations(odir):
    _, df = odir
    extra = {"G": [], "C": ["cataract"], "A": ["AMD", "macular degeneration"], "H": ["hypertensive"],
             "M": ["myopi"], "O": ["vein occlusion", "BRVO", "CRVO", "laser", "photocoagulation"]}
    patterns = {}
    for code, more in extra.items():
        e = knowledge.entry(knowledge.ODIR_KEYS[code])
        names = [e["name"], *e["synonyms"], *e["abbreviations"]] if code != "O" else []
        patterns[code] = "|".join(rf"\b{re.escape(x)}" for x in names + more)
    grades = {}
    for g in range(1, 5):
        e = knowledge.entry(f"dr_grade_{g}")
        grades[g] = "|".join(re.escape(x) for x in [e["name"], *e["synonyms"], *e["abbreviations"]] if "ICDR" not in x)
    for row in df.itertuples():
        impression = re.split(r"(?:Impression|Conclusion|Diagnosis|Assessment): ", row.text)[1].split("Findings:")[0]
        for code, pat in patterns.items():
            assert bool(getattr(row, code)) == bool(re.search(pat, impression, re.I)), (code, row.text)
        if row.dr_grade:
            assert re.search(grades[row.dr_grade], impression), row.text
        if row.N:
            assert re.search(r"\bNo\b", row.text) and re.search(r"normal|healthy|unremarkable|no abnormality", impression, re.I)
        assert f"{row.cdr:.1f}" in row.text
        assert ("left" in row.text or "OS" in row.text) == (row.eye == "left")
        for key in ("short_text", "definition_text"):
            assert getattr(row, key)
    assert df.text.nunique() == len(df)                               # varied wording


def test_reports_count_what_was_drawn():
    out = synth.render_eye(np.random.default_rng(0), synth.EyeLabels(dr_grade=1), "topcon", 96, "right")
    n = len(out.findings["microaneurysm"])
    words = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    texts = [synth.write_report(np.random.default_rng(s), synth.EyeLabels(dr_grade=1), out.findings, out.anatomy, "right")
             for s in range(12)]
    counted = [t for t in texts if re.search(rf"\b({n}|{words[n]})\b (microaneurysms|MAs|capillary)|: {n} ", t, re.I)]
    assert counted, texts
    for t in texts:          # grade 1: any sentence about haemorrhages is a negation
        for sentence in re.split(r"(?<=\.) ", t):
            if "haemorrhage" in sentence:
                assert sentence.startswith("No "), t


def test_output_is_identical_for_any_number_of_workers(tmp_path):
    a, b = tmp_path / "w1", tmp_path / "w2"
    synth.write_dataset(a, "aptos", n=6, seed=5, image_size=SIZE, workers=1)
    synth.write_dataset(b, "aptos", n=6, seed=5, image_size=SIZE, workers=2)
    assert filecmp.cmp(a / "labels.csv", b / "labels.csv", shallow=False)
    for sub in ("images", "masks"):
        names = sorted(p.name for p in (a / sub).iterdir())
        assert names == sorted(p.name for p in (b / sub).iterdir()) and len(names) == 6
        for name in names:
            assert filecmp.cmp(a / sub / name, b / sub / name, shallow=False), name


def test_image_i_does_not_depend_on_n():
    row5, img5, _ = synth.sample_one("odir", 3, 9, list(synth.CAMERAS), SIZE)
    row9, img9, _ = synth.sample_one("odir", 3, 9, list(synth.CAMERAS), SIZE)
    other, img_o, _ = synth.sample_one("odir", 3, 10, list(synth.CAMERAS), SIZE)
    assert np.array_equal(img5, img9) and row5 == row9
    assert not np.array_equal(img5, img_o)


def test_generate_copies_the_manifest(tmp_path):
    template = synth.manifest_template("fives")
    if not template.is_file():
        pytest.skip(f"{template} not written yet (DATA)")
    path = synth.generate(tmp_path / "f", "fives", n=4, seed=0, image_size=SIZE, workers=1)
    assert path == tmp_path / "f" / "manifest.yaml"
    assert path.read_bytes() == template.read_bytes()
    stamp = (tmp_path / "f" / "labels.csv").stat().st_mtime_ns
    synth.generate(tmp_path / "f", "fives", n=4, seed=0, image_size=SIZE, workers=1)     # reused, not redone
    assert (tmp_path / "f" / "labels.csv").stat().st_mtime_ns == stamp


def test_bad_arguments_raise_clearly(tmp_path):
    with pytest.raises(ValueError, match="task must be one of"):
        synth.write_dataset(tmp_path, "kaggle", n=2)
    with pytest.raises(ValueError, match="cameras must be"):
        synth.write_dataset(tmp_path, "odir", n=2, cameras=["nikon"])
    with pytest.raises(ValueError, match="n must be"):
        synth.write_dataset(tmp_path, "odir", n=0)


def test_camera_profiles():
    assert len(synth.CAMERAS) >= 5 and len(synth.TRAIN_CAMERAS) >= 4
    assert [k for k, c in synth.CAMERAS.items() if c.held_out] == [synth.HELD_OUT]


def test_generate_benchmark_writes_every_task(tmp_path):
    if not all(synth.manifest_template(t).is_file() for t in synth.TASKS):
        pytest.skip("data_manifests/synth-*.yaml not written yet (DATA)")
    out = synth.generate_benchmark(tmp_path, n_pretrain=4, n_eval=4, seed=0, image_size=48, workers=1)
    assert set(out) == set(synth.TASKS)
    for task, manifest in out.items():
        assert manifest == tmp_path / f"synth-{task}" / "manifest.yaml" and manifest.is_file()
        assert len(pd.read_csv(manifest.parent / "labels.csv")) == (2 if task == "unseen" else 4)  # zero-shot only: half
