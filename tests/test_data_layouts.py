"""Every shipped manifest against a tiny copy of its dataset's real layout.

Each builder writes, under tmp_path, the file and folder names, sheet names, headers and
label codes a user has after downloading (shared/datasets.md), with small generated
images. The tests then check what a reader must get right: classes, labels, raw labels,
patient ids, eyes, official and generated splits, and that no patient crosses splits.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from doubles import build_aptos, fundus, write
from fundus_lab.data import collate, load_manifest, open_dataset
from fundus_lab.data.images import DataError
from fundus_lab.data.manifest import available_manifests
from fundus_lab.data.splits import check_patient_disjoint

SIZE = 16  # image_size of every dataset opened here: fast


# ---------------------------------------------------------------------------------------
# layout builders (one per dataset of shared/datasets.md)


def build_eyepacs(root: Path, with_test: bool = True) -> None:
    rows = []
    for p in (10, 13, 15, 16, 17, 19, 20, 21, 22, 23):
        for eye in ("left", "right"):
            rows.append(f"{p}_{eye},{(p + (eye == 'right')) % 5}")
            fundus(root / "train" / f"{p}_{eye}.jpeg", seed=p)
    write(root / "trainLabels.csv", "image,level\n" + "\n".join(rows) + "\n")
    if with_test:
        write(root / "retinopathy_solution.csv", "image,level,Usage\n1_left,0,Public\n1_right,2,Private\n2_left,4,Public\n2_right,4,Public\n")
        for n in ("1_left", "1_right", "2_left", "2_right"):
            fundus(root / "test" / f"{n}.jpeg")


def build_idrid(root: Path) -> None:
    base = root / "B. Disease Grading"
    gt = base / "2. Groundtruths"
    train = "".join(f"IDRiD_{i:03d},{i % 5},{i % 3},,\n" for i in range(1, 13))
    write(gt / "a. IDRiD_Disease Grading_Training Labels.csv", "Image name,Retinopathy grade,Risk of macular edema ,,\n" + train)
    write(gt / "b. IDRiD_Disease Grading_Testing Labels.csv", "Image name,Retinopathy grade,Risk of macular edema \nIDRiD_001,4,2\nIDRiD_002,0,0\n")
    for i in range(1, 13):
        fundus(base / "1. Original Images" / "a. Training Set" / f"IDRiD_{i:03d}.jpg", seed=i)
    for i in (1, 2):
        fundus(base / "1. Original Images" / "b. Testing Set" / f"IDRiD_{i:03d}.jpg", seed=i)


def build_messidor2(root: Path) -> dict:
    exts = [".png", ".jpg", ".JPG", ".tif"]
    pairs, grades, names = [], [], {}
    for e in range(8):
        left, right = f"2005_{e:03d}_L{exts[e % 4]}", f"2005_{e:03d}_R{exts[(e + 1) % 4]}"
        fundus(root / "IMAGES" / left, seed=e)
        fundus(root / "IMAGES" / right, seed=e + 50)
        pairs.append(f"exam{e};{left};{right}")
        names[left], names[right] = (f"exam{e}", "left"), (f"exam{e}", "right")
        g = e % 5
        # one ungradable image (empty grades); one listed with a lower-case extension
        lg = "" if e == 3 else str(g)
        listed_left = left.replace(".JPG", ".jpg")
        grades.append(f"{listed_left},{lg},{'' if e == 3 else 0},{0 if e == 3 else 1}")
        grades.append(f"{right},{(g + 1) % 5},1,1")
    write(root / "messidor-2.csv", "Exam;Left;Right\n" + "\n".join(pairs) + "\n")
    write(root / "messidor_data.csv", "image_id,adjudicated_dr_grade,adjudicated_dme,adjudicated_gradable\n" + "\n".join(grades) + "\n")
    return names


def build_messidor(root: Path) -> None:
    xlwt = pytest.importorskip("xlwt")
    for b, base in enumerate(("Base11", "Base12", "Base34")):
        book = xlwt.Workbook()
        sh = book.add_sheet("Feuil1")
        for c, h in enumerate(["Image name", "Ophthalmologic department", "Retinopathy grade", "Risk of macular edema "]):
            sh.write(0, c, h)
        for r in range(4):
            name = f"20051019_{b}{r:04d}_0100_PP.tif"
            fundus(root / base / name, seed=b * 10 + r)
            for c, v in enumerate([name, "Service Ophtalmologie Lariboisière", float(r % 4), float(r % 3)]):
                sh.write(r + 1, c, v)
        book.save(str(root / base / f"Annotation_{base}.xls"))


ODIR_ROWS = [
    # ID, age, sex, left keywords, right keywords
    (0, 69, "Female", "cataract", "normal fundus"),
    (1, 57, "Male", "normal fundus", "normal fundus"),
    (2, 42, "Male", "laser spot，moderate non proliferative retinopathy", "moderate non proliferative retinopathy，lens dust"),
    (3, 53, "Male", "pathological myopia", "pathological myopia"),
    (4, 63, "Female", "glaucoma", "suspected glaucoma"),
    (5, 66, "Male", "dry age-related macular degeneration", "lens dust,normal fundus"),
    (6, 60, "Female", "hypertensive retinopathy", "normal fundus"),
    (7, 48, "Female", "low image quality", "mild nonproliferative retinopathy"),
    (8, 70, "Male", "wet age-related macular degeneration，epiretinal membrane", "normal fundus"),
    (9, 55, "Male", "normal fundus", "optic disk photographically invisible，glaucoma"),
    (10, 61, "Female", "proliferative diabetic retinopathy", "normal fundus"),
    (11, 50, "Male", "normal fundus", "cataract"),
]
ODIR_EXPECT = {  # (ID, eye) -> categories
    (0, "left"): "C", (0, "right"): "N", (1, "left"): "N", (1, "right"): "N", (2, "left"): "DO",
    (2, "right"): "D", (3, "left"): "M", (3, "right"): "M", (4, "left"): "G", (4, "right"): "G",
    (5, "left"): "A", (5, "right"): "N", (6, "left"): "H", (6, "right"): "N", (7, "right"): "D",
    (8, "left"): "AO", (8, "right"): "N", (9, "left"): "N", (9, "right"): "G", (10, "left"): "D",
    (10, "right"): "N", (11, "left"): "N", (11, "right"): "C",
}
CATS = "NDGCAHMO"


def build_odir(root: Path, variant: str) -> None:
    records = []
    for pid, age, sex, lk, rk in ODIR_ROWS:
        cats = set(ODIR_EXPECT.get((pid, "left"), "")) | set(ODIR_EXPECT.get((pid, "right"), ""))
        row = {"ID": pid, "Patient Age": age, "Patient Sex": sex, "Left-Fundus": f"{pid}_left.jpg",
               "Right-Fundus": f"{pid}_right.jpg", "Left-Diagnostic Keywords": lk, "Right-Diagnostic Keywords": rk}
        row.update({c: int(c in cats) for c in CATS})
        records.append(row)
    df = pd.DataFrame(records)
    if variant == "full_df":
        rows = []
        for r in records:
            for eye in ("left", "right"):
                name = r[f"{eye.title()}-Fundus"]
                rows.append({**r, "filepath": f"../input/ocular-disease-recognition-odir5k/ODIR-5K/Training Images/{name}",
                             "labels": "['N']", "target": "[1, 0, 0, 0, 0, 0, 0, 0]", "filename": name})
        pd.DataFrame(rows).to_csv(root / "full_df.csv", index=False)
        img_dir = root / "ODIR-5K" / "ODIR-5K" / "Training Images"
    else:
        name = "data.xlsx" if variant == "data" else "ODIR-5K_Training_Annotations(Updated)_V2.xlsx"
        (root / "ODIR-5K").mkdir(parents=True, exist_ok=True)
        df.to_excel(root / "ODIR-5K" / name, sheet_name="Sheet1", index=False)
        img_dir = root / "ODIR-5K" / "Training Images"
    for pid, *_ in ODIR_ROWS:
        for eye in ("left", "right"):
            fundus(img_dir / f"{pid}_{eye}.jpg", seed=pid)


def build_fives(root: Path) -> None:
    n = 0
    for part, per in (("train", 4), ("test", 1)):
        for c in "ADGN":
            for _ in range(per):
                n += 1
                fundus(root / part / "Original" / f"{n}_{c}.png", seed=n)
                fundus(root / part / "Ground truth" / f"{n}_{c}.png", seed=n)


def build_refuge(root: Path, val_variant: str = "excel") -> None:
    for i in range(1, 4):
        fundus(root / "Training400" / "Glaucoma" / f"g{i:04d}.jpg", seed=i)
    for i in range(1, 7):
        fundus(root / "Training400" / "Non-Glaucoma" / f"n{i:04d}.jpg", seed=10 + i)
    val = pd.DataFrame({"ID": [1, 2, 3, 4], "ImgName": [f"V{i:04d}.jpg" for i in range(1, 5)],
                        "Fovea_X": [1000.5] * 4, "Fovea_Y": [1000.5] * 4, "Glaucoma Label": [1, 0, 0, 1]})
    for name in val["ImgName"]:
        fundus(root / "REFUGE-Validation400" / name)
    if val_variant == "excel":
        (root / "REFUGE-Validation400-GT").mkdir()
        val.to_excel(root / "REFUGE-Validation400-GT" / "Fovea_locations.xlsx", index=False)
    else:
        write(root / "refuge_val_labels.csv", "image,label\n" + "".join(f"{n},{g}\n" for n, g in zip(val["ImgName"], val["Glaucoma Label"])))
    # the test labels as a user CSV
    for i in (1, 2):
        fundus(root / "REFUGE-Test400" / f"T{i:04d}.jpg")
    write(root / "refuge_test_labels.csv", "image,label\nT0001.jpg,1\nT0002.jpg,0\n")


RFMID_COLS = ("DR,ARMD,MH,DN,MYA,BRVO,TSLN,ERM,LS,MS,CSR,ODC,CRVO,TV,AH,ODP,ODE,ST,AION,PT,RT,RS,CRS,EDN,RPEC,"
              "MHL,RP,CWS,CB,ODPM,PRH,MNF,HR,CRAO,TD,CME,PTCR,CF,VH,MCA,VS,BRAO,PLQ,HPED,CL").split(",")


def build_rfmid(root: Path) -> dict:
    parts = [("Training_Set", "Training", "RFMiD_Training_Labels.csv", range(1, 7)),
             ("Evaluation_Set", "Validation", "RFMiD_Validation_Labels.csv", range(1, 3)),
             ("Test_Set", "Test", "RFMiD_Testing_Labels.csv", range(1, 3))]
    truth = {}
    for folder, sub, csv, ids in parts:
        lines = ["ID,Disease_Risk," + ",".join(RFMID_COLS)]
        for i in ids:
            on = {(i * 7) % 45, (i * 11) % 45} if i % 3 else set()
            vec = [int(k in on) for k in range(45)]
            truth[(folder, i)] = vec
            lines.append(f"{i},{int(any(vec))}," + ",".join(map(str, vec)))
            fundus(root / folder / sub / f"{i}.png", seed=i)
        write(root / folder / csv, "\n".join(lines) + "\n")
    return truth


def build_retinamnist(root: Path) -> dict:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 10), ("val", 3), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 5).reshape(n, 1)
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "retinamnist.npz", **arrays)
    return arrays


def build_synfundus(root: Path) -> None:
    rows = [("images/000001.jpg", "normal", "眼底未见明显异常"),
            ("images/000002.jpg", "diabetic retinopathy;glaucoma", "糖尿病视网膜病变，视盘杯盘比增大"),
            ("images/000003.jpg", "cataract", "屈光介质混浊"),
            ("images/000004.jpg", "age-related macular degeneration", "黄斑区可见玻璃膜疣")] * 3
    lines = ["image,labels,text"]
    for k, (img, lab, txt) in enumerate(rows):
        name = img.replace("00000", f"{k:02d}")
        fundus(root / "SynFundus-1M" / name, seed=k)
        lines.append(f"{name},{lab},{txt}")
    write(root / "SynFundus-1M" / "labels.csv", "\n".join(lines) + "\n")


SYNTH_HEADER = ("image_id,image,mask,patient_id,eye,age,camera,split,N,D,G,C,A,H,M,O,dr_grade,dme,cdr,"
                "fives_class,text,short_text,definition_text,unseen_class")


def build_synth(root: Path, task: str, n_patients: int = 6) -> list[dict]:
    """labels.csv as fundus_lab.data.synth writes it (the contract), tiny."""
    rows = []
    for p in range(n_patients):
        split = "test" if p == n_patients - 1 else ("val" if p == n_patients - 2 else "train")
        if task == "pretrain" and split == "test":
            split = "train"
        for eye in ("left", "right"):
            k = len(rows)
            cats = {c: 0 for c in CATS}
            cats["NDGAO"[k % 5]] = 1
            fives = {"N": "N", "D": "D", "G": "G", "A": "A"}.get("NDGAO"[k % 5], "")
            if task == "fives" and not fives:
                fives = "N"
            image_id = f"img{k:05d}"
            rows.append({"image_id": image_id, "image": f"images/{image_id}.png", "mask": f"masks/{image_id}.npz",
                         "patient_id": f"p{p:04d}", "eye": eye, "age": 50 + p, "camera": "cam_b" if split == "test" else "cam_a",
                         "split": split, **cats, "dr_grade": k % 5, "dme": k % 3, "cdr": round(0.3 + 0.01 * k, 2),
                         "fives_class": fives, "text": f"Colour fundus photograph of the {eye} eye, report {k}.",
                         "short_text": "normal", "definition_text": "a fundus without pathology",
                         "unseen_class": "PI"[p % 2] if task == "unseen" else ""})
            fundus(root / "images" / f"{image_id}.png", seed=k)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=SYNTH_HEADER.split(",")).to_csv(root / "labels.csv", index=False)
    return rows


# ---------------------------------------------------------------------------------------
# tests


def open_all(name, root, **kw):
    return open_dataset(name, root=root, split=None, image_size=SIZE, **kw)


def test_aptos(tmp_path):
    truth = build_aptos(tmp_path)
    ds = open_all("aptos2019", tmp_path)
    assert ds.classes == ["no DR", "mild NPDR", "moderate NPDR", "severe NPDR", "proliferative DR"]
    assert ds.task == "ordinal" and ds.metric == "quadratic_weighted_kappa"
    assert ds.class_keys == [f"dr_grade_{g}" for g in range(5)]
    assert len(ds) == 20  # test.csv (no labels) is not read
    for r in ds.records:
        assert truth[Path(r.path).stem] == r.label and r.raw_label == str(r.label)
        assert r.patient_id is None and r.eye is None
    assert {r.split for r in ds.records} == {"train", "val", "test"}
    item = ds[0]
    assert item["image"].shape == (3, SIZE, SIZE) and item["image"].dtype == torch.float32
    assert item["label"].dtype == torch.long and item["label"].ndim == 0
    # the split is stratified: each grade (4 images) has 2-3 in train of the 0.7 fraction
    train = open_dataset("aptos2019", root=tmp_path, split="train", image_size=SIZE)
    per_grade = np.bincount(train.labels, minlength=5)
    assert per_grade.min() >= 2 and per_grade.max() <= 3
    assert list(train.class_counts().values()) == per_grade.tolist()


def test_eyepacs(tmp_path):
    build_eyepacs(tmp_path)
    ds = open_all("eyepacs", tmp_path)
    r = next(r for r in ds.records if Path(r.path).name == "13_right.jpeg")
    assert (r.patient_id, r.eye, r.label, r.raw_label) == ("13", "right", 4, "4")
    test = [r for r in ds.records if r.split == "test"]
    assert sorted(Path(r.path).stem for r in test) == ["1_left", "1_right", "2_left", "2_right"]
    assert {r.meta["usage"] for r in test} == {"Public", "Private"}
    assert {r.split for r in ds.records} == {"train", "val", "test"}
    check_patient_disjoint(ds.records)
    # the test labels are optional (released later)
    (tmp_path / "retinopathy_solution.csv").unlink()
    assert {r.split for r in open_all("eyepacs", tmp_path).records} == {"train", "val"}


def test_idrid_trailing_space_header_and_empty_columns(tmp_path):
    build_idrid(tmp_path)
    ds = open_all("idrid", tmp_path)
    assert len(ds) == 14
    r = next(r for r in ds.records if r.split == "test" and Path(r.path).stem == "IDRiD_001")
    assert r.label == 4 and r.meta["dme"] == 2
    r = next(r for r in ds.records if r.split != "test" and Path(r.path).stem == "IDRiD_007")
    assert r.label == 2 and r.meta["dme"] == 1
    assert set(r.meta) == {"dme"}  # the empty trailing columns are gone
    assert {r.split for r in ds.records} == {"train", "val", "test"}


def test_messidor2_mixed_extensions_pairs_and_ungradable(tmp_path):
    names = build_messidor2(tmp_path)
    with pytest.warns(UserWarning, match="excluded 1 row"):
        ds = open_all("messidor2", tmp_path)
    assert len(ds) == 15 and len(ds.excluded) == 1 and "2005_003_L" in ds.excluded[0]
    exts = set()
    for r in ds.records:
        name = Path(r.path).name
        exts.add(Path(name).suffix)
        assert (r.patient_id, r.eye) == names[name]
    assert exts == {".png", ".jpg", ".JPG", ".tif"}  # listed as .jpg, found as .JPG
    assert {r.meta["gradable"] for r in ds.records} == {1}
    check_patient_disjoint(ds.records)
    splits = {}
    for r in ds.records:
        splits.setdefault(r.patient_id, set()).add(r.split)
    assert all(len(s) == 1 for s in splits.values())


def test_messidor_xls_per_base_folder(tmp_path):
    build_messidor(tmp_path)
    ds = open_all("messidor", tmp_path)
    assert len(ds) == 12 and ds.classes[0] == "no retinopathy" and ds.class_keys[1] is None
    r = next(r for r in ds.records if Path(r.path).name == "20051019_20003_0100_PP.tif")
    assert Path(r.path).parent.name == "Base34" and r.label == 3 and r.meta["dme"] == 0
    assert r.meta["department"] == "Service Ophtalmologie Lariboisière"
    prompts = ds.class_prompts()
    assert "mild diabetic retinopathy" in prompts[1] and len(prompts[0]) > 3  # knowledge + inline


@pytest.mark.filterwarnings("ignore:odir5k. excluded")
@pytest.mark.parametrize("variant", ["data", "v2", "full_df"])
def test_odir_keywords_per_eye(tmp_path, variant):
    build_odir(tmp_path, variant)
    with pytest.warns(UserWarning, match="excluded 1 row"):
        ds = open_all("odir5k", tmp_path)
    assert ds.task == "multilabel" and ds.classes[4] == "age-related macular degeneration"
    assert ds.class_keys == ["normal", "diabetic_retinopathy", "glaucoma", "cataract", "amd",
                             "hypertensive_retinopathy", "pathological_myopia", "other"]
    got = {}
    for r in ds.records:
        pid, eye = Path(r.path).stem.split("_")
        assert (r.patient_id, r.eye) == (pid, eye)
        got[(int(pid), eye)] = "".join(c for c, v in zip(CATS, r.label) if v)
    assert got == ODIR_EXPECT  # 7_left ("low image quality" only) excluded
    assert len(ds.excluded) == 1 and "low image quality" in ds.excluded[0]
    r = next(r for r in ds.records if Path(r.path).name == "2_right.jpg")
    assert r.raw_label == "moderate non proliferative retinopathy，lens dust"
    assert r.meta["notes"] == ["lens dust"] and r.meta["age"] == 42 and r.meta["sex"] == "Male"
    item = ds[0]
    assert item["label"].dtype == torch.float32 and item["label"].shape == (8,)
    check_patient_disjoint(ds.records)
    # the single-label subset zero-shot papers report on
    assert ds.class_counts()["normal"] == sum("N" in v for v in ODIR_EXPECT.values())
    single = ds.single_label()
    assert single.task == "multiclass" and len(single) == len(ds) - 2  # 2_left DO, 8_left AO
    assert all(isinstance(r.label, int) for r in single.records)
    assert open_dataset("odir5k", root=tmp_path, split=None, image_size=SIZE, subset="single_label").labels.tolist() == single.labels.tolist()


@pytest.mark.filterwarnings("ignore:odir5k. excluded")
def test_odir_unknown_keyword_falls_into_other_with_a_warning(tmp_path):
    build_odir(tmp_path, "data")
    xlsx = tmp_path / "ODIR-5K" / "data.xlsx"
    df = pd.read_excel(xlsx)
    df.loc[0, "Left-Diagnostic Keywords"] = "cataract，some never seen finding"
    df.to_excel(xlsx, index=False)
    with pytest.warns(UserWarning, match="some never seen finding"):
        ds = open_all("odir5k", tmp_path)
    r = next(r for r in ds.records if Path(r.path).name == "0_left.jpg")
    assert "".join(c for c, v in zip(CATS, r.label) if v) == "CO"


def test_fives_class_from_file_name(tmp_path):
    build_fives(tmp_path)
    ds = open_all("fives", tmp_path)
    assert ds.classes == ["age-related macular degeneration", "diabetic retinopathy", "glaucoma", "normal"]
    for r in ds.records:
        assert "ADGN"[r.label] == r.raw_label == Path(r.path).stem.split("_")[1]
        assert (tmp_path / r.meta["mask"]).is_file() and "Ground truth" in r.meta["mask"]
    assert sum(r.split == "test" for r in ds.records) == 4
    assert {r.split for r in ds.records} == {"train", "val", "test"}
    # a stray file that does not follow <n>_<C>.png is named, or skipped and counted
    fundus(tmp_path / "train" / "Original" / "notes.png")
    with pytest.raises(DataError, match=r"Original/notes.png: file name does not match .*pattern"):
        open_all("fives", tmp_path)
    with pytest.warns(UserWarning, match="skipped 1"):
        assert len(open_all("fives", tmp_path, skip_bad=True)) == len(ds)


@pytest.mark.parametrize("val_variant", ["excel", "csv"])
def test_refuge_folders_excel_and_user_csv(tmp_path, val_variant):
    build_refuge(tmp_path, val_variant)
    ds = open_all("refuge", tmp_path)
    assert ds.task == "binary" and ds.classes == ["non-glaucoma", "glaucoma"]
    by = {Path(r.path).name: r for r in ds.records}
    assert by["g0002.jpg"].label == 1 and by["g0002.jpg"].split == "train" and by["g0002.jpg"].raw_label == "Glaucoma"
    assert by["n0005.jpg"].label == 0
    assert [by[f"V{i:04d}.jpg"].label for i in range(1, 5)] == [1, 0, 0, 1]
    assert by["V0001.jpg"].split == "val" and by["T0001.jpg"].split == "test" and by["T0001.jpg"].label == 1
    assert len(ds) == 9 + 4 + 2


def test_rfmid_multi_hot(tmp_path):
    truth = build_rfmid(tmp_path)
    ds = open_all("rfmid", tmp_path)
    assert len(ds.classes) == 45 and ds.classes[0] == "diabetic retinopathy"
    assert [c.column for c in ds.manifest.classes] == RFMID_COLS
    for r in ds.records:
        folder = Path(r.path).parent.parent.name
        assert r.label == truth[(folder, int(Path(r.path).stem))]
        assert r.meta["disease_risk"] == int(any(r.label))
        assert r.raw_label["DR"] == str(r.label[0])
    assert {r.split for r in ds.records} == {"train", "val", "test"}
    prompts = ds.class_prompts()
    assert len(prompts) == 45 and all(prompts)
    assert "a fundus photograph of asteroid hyalosis" in prompts[RFMID_COLS.index("AH")]


def test_retinamnist_images_from_npz(tmp_path):
    arrays = build_retinamnist(tmp_path)
    ds = open_dataset("retinamnist", root=tmp_path, split="val", image_size=28)
    assert len(ds) == 3 and [r.label for r in ds.records] == [0, 1, 2]
    item = ds[1]
    expected = torch.from_numpy(arrays["val_images"][1]).permute(2, 0, 1).float() / 255
    assert torch.allclose(item["image"], expected)  # no FOV crop, same size: exact pixels
    assert ds.records[1].key(ds.root) == "retinamnist.npz#val_images[1]"
    assert len(open_dataset("retinamnist", root=tmp_path, split="train", image_size=8)) == 10


def test_synfundus_chinese_text(tmp_path):
    build_synfundus(tmp_path)
    ds = open_all("synfundus", tmp_path)
    r = next(r for r in ds.records if r.raw_label == "diabetic retinopathy;glaucoma")
    assert r.label == [0, 1, 1, 0, 0, 0, 0, 0] and r.text.startswith("糖尿病")
    assert ds[0]["text"] is not None


@pytest.mark.parametrize("task", ["pretrain", "odir", "fives", "aptos"])
def test_synth_manifests_read_the_generator_layout(tmp_path, task):
    rows = build_synth(tmp_path, task)
    name = f"synth-{task}"
    ds = open_all(name, tmp_path)
    assert len(ds) == len(rows)
    by = {Path(r.path).stem: r for r in ds.records}
    for row in rows:
        r = by[row["image_id"]]
        assert (r.patient_id, r.eye, r.split, r.text) == (row["patient_id"], row["eye"], row["split"], row["text"])
        assert r.meta["camera"] == row["camera"] and r.meta["mask"] == row["mask"] and r.meta["age"] == row["age"]
        assert r.meta["cdr"] == pytest.approx(row["cdr"]) and r.meta["dme"] == row["dme"]
        if task in ("pretrain", "odir"):
            assert r.label == [row[c] for c in CATS]
        elif task == "fives":
            assert "ADGN"[r.label] == row["fives_class"]
        else:
            assert r.label == row["dr_grade"]
    check_patient_disjoint(ds.records)
    short = open_all(name, tmp_path, text_field="short_text")
    assert short[0]["text"] == "normal"
    batch = collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, SIZE, SIZE) and isinstance(batch["text"], list)


def test_synth_root_defaults_to_data_synth(tmp_path, monkeypatch):
    build_synth(tmp_path / "data" / "synth" / "synth-aptos", "aptos")
    monkeypatch.chdir(tmp_path)
    ds = open_dataset("synth-aptos", split="train", image_size=SIZE)
    assert ds.root == (tmp_path / "data" / "synth" / "synth-aptos").resolve()
    # a manifest inside a dataset folder (as the generator writes it) is its own root
    man = tmp_path / "data" / "synth" / "synth-aptos" / "manifest.yaml"
    man.write_text((Path(load_manifest("synth-aptos").path)).read_text())
    ds2 = open_dataset(man, split="train", image_size=SIZE)
    assert ds2.root == ds.root and len(ds2) == len(ds)
    with pytest.raises(DataError, match="needs root="):
        open_dataset("aptos2019")


BUILDERS = {
    "aptos2019": build_aptos, "eyepacs": build_eyepacs, "idrid": build_idrid, "messidor2": build_messidor2,
    "messidor": build_messidor, "odir5k": lambda r: build_odir(r, "data"), "fives": build_fives,
    "refuge": build_refuge, "rfmid": build_rfmid, "retinamnist": build_retinamnist, "synfundus": build_synfundus,
    "synth-pretrain": lambda r: build_synth(r, "pretrain"), "synth-odir": lambda r: build_synth(r, "odir"),
    "synth-fives": lambda r: build_synth(r, "fives"), "synth-aptos": lambda r: build_synth(r, "aptos"),
    "synth-unseen": lambda r: build_synth(r, "unseen"),
}


def test_every_shipped_manifest_has_a_layout_test():
    assert sorted(BUILDERS) == available_manifests()


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_splits_never_share_a_patient_and_are_reusable(tmp_path, name):
    root = tmp_path / "ds"
    BUILDERS[name](root)
    split_file = tmp_path / "split.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = open_all(name, root, split_file=split_file)
        assert all(r.split in ("train", "val", "test") for r in ds.records)
        groups = {}
        for r in ds.records:
            groups.setdefault(r.patient_id or r.key(ds.root), set()).add(r.split)
        assert all(len(s) == 1 for s in groups.values()), name
        saved = json.loads(split_file.read_text())
        assert saved["dataset"] == name and len(saved["splits"]) == len(ds)
        # reopening with the file gives the same split, and the union of splits is everything
        again = open_all(name, root, split_file=split_file)
        assert [(r.path, r.split) for r in again.records] == [(r.path, r.split) for r in ds.records]
        per_split = sum(
            len(open_dataset(name, root=root, split=s, image_size=SIZE, split_file=split_file))
            for s in sorted({r.split for r in ds.records})
        )
    assert per_split == len(ds)
