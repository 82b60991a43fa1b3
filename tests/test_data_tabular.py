"""A labelled CSV or a folder per class opens as a dataset without a hand-written manifest,
and `manifest init` writes a manifest that loads."""

import numpy as np
import pytest
import yaml
from PIL import Image

from fundus_lab.cli import manifest_init_main
from fundus_lab.data import open_dataset
from fundus_lab.data.manifest import load_manifest, parse_manifest
from fundus_lab.data.tabular import (
    TabularError, manifest_from_csv, manifest_from_folder, table_manifest,
)


def _png(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((24, 24, 3)) * 200 + 30).astype(np.uint8)).save(path)


@pytest.fixture
def csv_dataset(tmp_path):
    rows = ["file,diagnosis,patient,split"]
    labels = ["Glaucoma", "normal", "Cataract"]
    for i in range(12):
        _png(tmp_path / "imgs" / f"im{i}.png", i)
        rows.append(f"imgs/im{i}{'.png' if i % 2 else ''},{labels[i % 3]},p{i // 2},{'test' if i >= 8 else 'train'}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_csv_manifest_classes_prompts_and_dataset(csv_dataset):
    m = manifest_from_csv(csv_dataset / "labels.csv", "file", "diagnosis", patient_column="patient",
                          split_column="split")
    assert m["task"] == "multiclass"
    assert [c["name"] for c in m["classes"]] == ["Cataract", "Glaucoma", "normal"]
    assert all(c["prompts"] == [c["name"]] for c in m["classes"])
    assert m["classes"][1]["key"] == "glaucoma"  # matched to the knowledge base, case-insensitively
    ds = open_dataset(parse_manifest(m, csv_dataset / "labels.csv"), root=csv_dataset, split="train", image_size=32)
    assert len(ds) == 8 and ds.classes == ["Cataract", "Glaucoma", "normal"]
    by_path = {r.path.split("/")[-1].split(".")[0]: r.label for r in ds.records}
    assert by_path["im0"] == 1 and by_path["im1"] == 2 and by_path["im2"] == 0
    assert ds[0]["image"].shape == (3, 32, 32)
    test = open_dataset(table_manifest(csv_dataset / "labels.csv", "file", "diagnosis", split_column="split"),
                        split="test", image_size=32)  # root defaults to the CSV's folder
    assert len(test) == 4


def test_numeric_grades_keep_numeric_order_and_ordinal(tmp_path):
    rows = ["img,grade"] + [f"a{i}.png,{g}" for i, g in enumerate([10, 2, 1, 2, 10, 1])]
    for i in range(6):
        _png(tmp_path / f"a{i}.png", i)
    (tmp_path / "g.csv").write_text("\n".join(rows))
    m = manifest_from_csv(tmp_path / "g.csv", "img", "grade", task="ordinal")
    assert [c["name"] for c in m["classes"]] == ["1", "2", "10"]
    ds = open_dataset(parse_manifest(m, tmp_path / "g.csv"), root=tmp_path, split=None, image_size=16)
    assert {r.path.rsplit("/", 1)[-1]: r.label for r in ds.records}["a0.png"] == 2
    assert "quadratic_weighted_kappa" in m["metric"]


def test_multilabel_cells(tmp_path):
    rows = ["img,labels", "a.png,glaucoma|cataract", "b.png,cataract", "c.png,normal"]
    for n in "abc":
        _png(tmp_path / f"{n}.png", ord(n))
    (tmp_path / "m.csv").write_text("\n".join(rows))
    m = manifest_from_csv(tmp_path / "m.csv", "img", "labels", label_separator="|")
    assert m["task"] == "multilabel"
    ds = open_dataset(parse_manifest(m, tmp_path / "m.csv"), root=tmp_path, split=None, image_size=16)
    labels = {r.path.rsplit("/", 1)[-1]: list(r.label) for r in ds.records}
    assert labels["a.png"] == [1, 1, 0]  # classes: cataract, glaucoma, normal


def test_csv_errors_name_the_column(csv_dataset):
    with pytest.raises(TabularError, match=r"label_column='grade' is not a column; the columns are \['file'"):
        manifest_from_csv(csv_dataset / "labels.csv", "file", "grade")
    with pytest.raises(TabularError, match="no such CSV"):
        manifest_from_csv(csv_dataset / "nope.csv", "file", "diagnosis")
    with pytest.raises(TabularError, match="needs image_column= and label_column="):
        table_manifest(csv_dataset / "labels.csv")
    assert table_manifest("aptos2019") is None


def test_folder_per_class_and_split_folders(tmp_path):
    for i in range(8):
        _png(tmp_path / "flat" / ("Glaucoma" if i % 2 else "Non-Glaucoma") / f"x{i}.{'png' if i < 6 else 'jpg'}", i)
    (tmp_path / "flat" / "README.txt").write_text("not an image")
    m = manifest_from_folder(tmp_path / "flat")
    assert m["task"] == "binary" and [c["name"] for c in m["classes"]] == ["Glaucoma", "Non-Glaucoma"]
    ds = open_dataset(table_manifest(tmp_path / "flat"), split=None, image_size=16)  # root: the folder
    assert len(ds) == 8 and sum(r.label for r in ds.records) == 4

    for split, n in (("train", 6), ("test", 3)):
        for i in range(n):
            _png(tmp_path / "nested" / split / ("a" if i % 2 else "b") / f"{split}{i}.png", i)
    test = open_dataset(table_manifest(tmp_path / "nested"), root=tmp_path / "nested", split="test", image_size=16)
    assert len(test) == 3 and {r.split for r in test.records} == {"test"}
    with pytest.raises(TabularError, match="no images"):
        (tmp_path / "empty").mkdir()
        manifest_from_folder(tmp_path / "empty")


def test_manifest_init_writes_a_manifest_that_loads(csv_dataset, capsys):
    out = csv_dataset / "my.yaml"
    rc = manifest_init_main([str(csv_dataset / "labels.csv"), "--image-column", "file",
                             "--label-column", "diagnosis", "--patient-column", "patient", "-o", str(out)])
    assert rc == 0 and "3 classes" in capsys.readouterr().out
    assert out.read_text().startswith("# Written by `fundus-lab manifest init`")
    m = load_manifest(out)
    assert m.class_names == ["Cataract", "Glaucoma", "normal"]
    assert yaml.safe_load(out.read_text())["sources"][0]["patient"] == {"column": "patient"}
    assert manifest_init_main([str(csv_dataset / "labels.csv"), "--image-column", "file", "--label-column",
                               "diagnosis", "-o", str(out)]) == 2  # exists: no silent overwrite
    assert "exists" in capsys.readouterr().out
    assert manifest_init_main([str(csv_dataset / "labels.csv"), "--image-column", "nope", "--label-column",
                               "diagnosis", "-o", str(csv_dataset / "x.yaml")]) == 2
    assert "image_column='nope' is not a column" in capsys.readouterr().out


def test_open_dataset_reads_a_plain_csv_and_a_class_folder(csv_dataset, tmp_path):
    """fl.data.open_dataset("labels.csv", image_column=..., label_column=...) without a manifest."""
    ds = open_dataset(csv_dataset / "labels.csv", image_column="file", label_column="diagnosis", split="test",
                      image_size=32, table_options={"split_column": "split"})
    assert len(ds) == 4 and ds.classes == ["Cataract", "Glaucoma", "normal"]
    with pytest.raises(Exception, match="image_column"):
        open_dataset(csv_dataset / "labels.csv", split="all")
    for i, cls in enumerate(["normal", "normal", "cataract", "cataract"]):
        _png(tmp_path / "folder" / cls / f"{i}.png", i)
    folder = open_dataset(tmp_path / "folder", split="all", image_size=32)
    assert sorted(folder.classes) == ["cataract", "normal"] and len(folder) == 4
