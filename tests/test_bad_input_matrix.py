"""The bad-input matrix (issue 10): every kind of bad data input tried, and what must happen.

Each row of ``MATRIX`` is one kind: how to break a small good dataset, and the expected
outcome, one of

    error   the named exception, its message matching a pattern that names the file (or
            manifest) and the field or row, raised when the dataset is opened (or, for
            image contents, when the item is read)
    warn    accepted, with a warning saying what was done (nothing silent)
    read    read correctly (an input that used to be misread)

A kind counts as handled when its row passes; ``test_matrix_counts`` states the totals.
``DERIVED`` lists the damaged derived files and run folders of issue 16 (caches, run files,
dataset folders), each handled by the test it names; ``test_derived_counts`` counts them.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
import yaml
from PIL import Image

from doubles import BAD_INPUT_HEADER as HEADER, BAD_INPUT_ROWS as ROWS, Case
from fundus_lab.data import open_dataset
from fundus_lab.data.images import DataError, ImageError
from fundus_lab.data.manifest import ManifestError


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _npz(c: Case, **arrays) -> None:
    base = {"train_images": np.zeros((4, 8, 8, 3), np.uint8), "train_labels": np.array([0, 1, 0, 1])}
    base.update(arrays)
    np.savez(c.root / "data.npz", **{k: v for k, v in base.items() if v is not None})
    c.m["sources"] = [{"annotations": "data.npz", "format": "npz", "npz_splits": ["train"]}]


def _set_rows(rows):
    def f(c: Case):
        c.rows = rows

    return f


@dataclass
class Kind:
    name: str
    breaks: Callable[[Case], Optional[Path]]  # returns the manifest path if it wrote the files itself
    outcome: str  # error | warn | read
    match: str
    exc: type = DataError
    when: str = "open"  # open | item
    split_file: bool = False  # opened with split_file=<root>/split.json (written by ``breaks``)


def _outside(c: Case):
    (c.root.parent / "outside.png").write_bytes((c.root / "img" / "a0.png").read_bytes())
    c.rows[3] = "../../outside.png,1,p1,left"


def _symlink(c: Case):
    (c.root.parent / "elsewhere.png").write_bytes((c.root / "img" / "a0.png").read_bytes())
    (c.root / "img" / "a3.png").unlink()
    (c.root / "img" / "a3.png").symlink_to(c.root.parent / "elsewhere.png")


def _ann_outside(c: Case):
    (c.root.parent / "other.csv").write_text("image,label,patient,eye\nSECRET,0,p,left\n")
    c.src["annotations"] = "../other.csv"


def _ann_absolute(c: Case):
    (c.root.parent / "other.csv").write_text("image,label,patient,eye\nSECRET,0,p,left\n")
    c.src["annotations"] = str(c.root.parent / "other.csv")


def _manifest_text(text: str):
    def f(c: Case):
        c.manifest_text = text

    return f


def _bomb_image(c: Case):
    ihdr = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 50_000, 50_000, 8, 2, 0, 0, 0))
    (c.root / "img" / "a1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + ihdr + _png_chunk(b"IDAT", zlib.compress(b"\0")) + _png_chunk(b"IEND", b""))


def _truncated_image(c: Case):
    data = (c.root / "img" / "a1.png").read_bytes()
    (c.root / "img" / "a1.png").write_bytes(data[: len(data) // 2])


def _official_split_leak(c: Case):
    c.src["split_column"] = "split"
    c.header += ",split"
    c.rows = [r + (",test" if i == 1 else ",train") for i, r in enumerate(c.rows)]


def _bad_split_value(c: Case):
    c.src["split_column"] = "split"
    c.header += ",split"
    c.rows = [r + (",holdout" if i == 2 else ",train") for i, r in enumerate(c.rows)]


def _keyword_no_rule(c: Case):
    c.src["label"] = {"column": "label", "keyword": {"rules": [{"match": "normal", "label": "normal"}]}}
    c.rows = [f"a{i}.png,{'normal' if i != 4 else 'mystery'},p{i // 2},left" for i in range(8)]


def _yaml(key, value):
    def f(c: Case):
        c.m[key] = value

    return f


def _src(key, value):
    def f(c: Case):
        c.src[key] = value

    return f


def _not_utf8(c: Case) -> Path:
    path = c.write()  # written here, then a latin-1 byte put into the manifest
    path.write_bytes(path.read_bytes().replace(b"name: tiny", "name: tinyé".encode("latin-1")))
    return path


def _nan_npz(c: Case):
    images = np.full((4, 8, 8, 3), 0.5, np.float32)
    images[1, 2, 2, 0] = np.nan
    _npz(c, train_images=images)


def _inf_float_tiff(c: Case):
    arr = np.full((12, 12), 0.5, np.float32)
    arr[4, 4] = np.inf
    Image.fromarray(arr, mode="F").save(c.root / "img" / "a1.png", format="TIFF")  # content decides, not the name


def _palette_8000(c: Case):
    arr = np.zeros((8000, 8000), np.uint8)
    arr[4000, 4000] = 1
    im = Image.fromarray(arr, "P")
    im.putpalette([0, 0, 0, 200, 80, 40] + [0] * 762)
    im.save(c.root / "img" / "a1.png", optimize=True)


def _split_file_list_value(c: Case) -> Path:
    path = c.write()
    split_file = c.root / "split.json"
    open_dataset(path, split=None, image_size=8, split_file=split_file)
    payload = json.loads(split_file.read_text())
    payload["splits"]["img/a2.png"] = ["train", "test"]
    split_file.write_text(json.dumps(payload))
    return path


ALIAS_BOMB = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x]"] + [
    f"{k}: &{k} [{', '.join(['*' + p] * 9)}]" for p, k in zip("abcdefg", "bcdefgh")
]) + "\nname: tiny\n"

MATRIX = [
    # annotation files
    Kind("missing annotation file", _src("annotations", "nope.csv"), "error", r"sources\[0\].annotations: no file found .*'nope.csv'"),
    Kind("empty annotation file", lambda c: setattr(c, "csv_bytes", b""), "error", r"labels.csv is empty"),
    Kind("header-only annotation file", _set_rows([]), "error", r"labels.csv has a header but no data rows"),
    Kind("missing label column", lambda c: setattr(c, "header", "image,grade,patient,eye"), "error", r"labels.csv: missing column for label.column: expected 'label'"),
    Kind("unknown label code", _set_rows(ROWS[:4] + ["a8.png,7,p9,left"]), "error", r"labels.csv row 6 .*unknown label code '7'"),
    Kind("empty label cell", _set_rows(ROWS[:4] + ["a8.png,,p9,left"]), "error", r"labels.csv row 6 .*'label' \(label\) is empty"),
    Kind("non-integer label without codes", lambda c: (c.src["label"].pop("codes"), _set_rows(ROWS[:4] + ["a8.png,1.7,p9,left"])(c)), "error", r"labels.csv row 6 .*'1.7', which is not a class"),
    Kind("eye value not left/right", _set_rows(ROWS[:4] + ["a8.png,0,p9,both"]), "error", r"labels.csv row 6 .*eye 'both' is not left or right"),
    Kind("bad official split value", _bad_split_value, "error", r"labels.csv row 4 .*'split' \(split\) has 'holdout'"),
    Kind("patient in two official splits", _official_split_leak, "error", r"tiny.yaml\).*1 patient\(s\) appear in more than one split"),
    Kind("keyword that matches no rule", _keyword_no_rule, "error", r"labels.csv row 6 .*keyword 'mystery' matches no rule"),
    # encodings
    Kind("cp1253 CSV without encoding", lambda c: setattr(c, "csv_bytes", ("\n".join([HEADER, *ROWS]) + "\nα.png,0,Ωp,left\n").encode("cp1253")), "error", r"labels.csv: not UTF-8 .*encoding"),
    Kind("UTF-16 CSV with BOM", lambda c: setattr(c, "csv_bytes", ("\n".join([HEADER, *ROWS]) + "\n").encode("utf-16")), "read", ""),
    Kind("UTF-16 CSV without BOM", lambda c: setattr(c, "csv_bytes", ("\n".join([HEADER, *ROWS]) + "\n").encode("utf-16-le")), "error", r"labels.csv: looks like UTF-16/32 without a byte-order mark"),
    Kind("unknown encoding name", _src("encoding", "klingon-8"), "error", r"tiny.yaml: sources\[0\].encoding: unknown codec", ManifestError),
    # images
    Kind("missing image file", lambda c: (c.root / "img" / "a5.png").unlink(), "error", r"labels.csv row 7 .*image file not found .*a5.png"),
    Kind("corrupt image", lambda c: (c.root / "img" / "a1.png").write_bytes(b"\x89PNG broken"), "error", r"a1.png cannot be read", ImageError, "item"),
    Kind("truncated image", _truncated_image, "error", r"a1.png (is corrupt or truncated|cannot be read)", ImageError, "item"),
    Kind("empty image file", lambda c: (c.root / "img" / "a1.png").write_bytes(b""), "error", r"a1.png cannot be read", ImageError, "item"),
    Kind("decompression-bomb image header", _bomb_image, "error", r"a1.png", ImageError, "item"),
    # paths
    Kind("image path with ../", _outside, "error", r"labels.csv row 5 .*outside the dataset root"),
    Kind("absolute image path", lambda c: c.src["image"].update(template=str(c.root.parent / "outside.png")) or _outside(c), "error", r"outside the dataset root"),
    Kind("image symlink out of the root", _symlink, "error", r"a3.png.*outside the dataset root"),
    Kind("annotations path with ../", _ann_outside, "error", r"sources\[0\].annotations: .*outside the dataset root"),
    Kind("absolute annotations path", _ann_absolute, "error", r"sources\[0\].annotations: .* is an absolute path"),
    # manifests
    Kind("manifest alias bomb", _manifest_text(ALIAS_BOMB), "error", r"(?s)tiny.yaml: not valid YAML.*not allowed in a manifest", ManifestError),
    Kind("duplicate key in manifest", lambda c: setattr(c, "manifest_text", yaml.safe_dump(c.m, sort_keys=False) + "task: binary\n"), "error", r"(?s)tiny.yaml: not valid YAML.*key 'task' is given twice", ManifestError),
    Kind("invalid YAML syntax", _manifest_text("name: [unclosed\n"), "error", r"tiny.yaml: not valid YAML", ManifestError),
    Kind("manifest not a mapping", _manifest_text("- just\n- a list\n"), "error", r"tiny.yaml: expected a mapping at the top level, got list", ManifestError),
    Kind("manifest not UTF-8", _not_utf8, "error", r"tiny.yaml: not UTF-8 text", ManifestError),
    Kind("unknown manifest field (typo)", _yaml("metrik", "accuracy"), "error", r"tiny.yaml: metrik: unknown field; did you mean 'metric'", ManifestError),
    Kind("wrong type in a manifest field", _yaml("classes", "normal, glaucoma"), "error", r"tiny.yaml: classes: expected a list", ManifestError),
    Kind("unknown metric", _yaml("metric", "acuracy"), "error", r"tiny.yaml: metric: unknown metric 'acuracy'; did you mean accuracy", ManifestError),
    Kind("binary task with three classes", lambda c: (c.m.update(task="binary"), c.m["classes"].append({"name": "amd", "key": "amd"})), "error", r"tiny.yaml: task: binary needs exactly 2 classes", ManifestError),
    Kind("duplicate class names", lambda c: c.m["classes"].append({"name": "normal", "key": "normal"}), "error", r"tiny.yaml: classes: duplicate class names", ManifestError),
    Kind("bad regular expression", lambda c: c.src.update(patient={"column": "patient", "pattern": "p(\\d+"}), "error", r"tiny.yaml: sources\[0\].patient.pattern: bad regular expression", ManifestError),
    Kind("class without prompts or key", lambda c: c.m["classes"].append({"name": "odd"}), "error", r"tiny.yaml: classes\[2\] \('odd'\): needs a knowledge 'key' or inline 'prompts'", ManifestError),
    # records
    Kind("same image with conflicting labels", _set_rows(ROWS + ["a2.png,1,p1,right"]), "error", r"img/a2.png is listed twice with a different label: .*row 4 .*row 10"),
    Kind("same image twice, same label", _set_rows(ROWS + ["a2.png,0,p1,right"]), "warn", r"1 image\(s\) listed more than once with the same label were kept once"),
    Kind("patient ids differing in case/space", _set_rows(ROWS + ["a8.png,0,P0 ,right"]), "warn", r"differ only in case and were merged \('P0' -> 'p0'\)"),
    Kind("record without a patient id", _set_rows(ROWS + ["a8.png,0,,right"]), "warn", r"1 record\(s\) have no patient id.*a8.png"),
    # npz
    Kind("npz missing array", lambda c: _npz(c, train_labels=None), "error", r"data.npz: missing array 'train_labels'"),
    Kind("npz object array", lambda c: _npz(c, train_labels=np.array([0, 1, "x", None], dtype=object)), "error", r"data.npz: array 'train_labels' is an object array"),
    Kind("npz label/image count mismatch", lambda c: _npz(c, train_labels=np.arange(6) % 2), "error", r"data.npz: array 'train_labels' has 6 label\(s\) but 'train_images' has 4"),
    Kind("npz non-integer labels", lambda c: _npz(c, train_labels=np.array([0.0, 1.7, 1.0, 0.0])), "error", r"data.npz train_labels\[1\]: unknown label code 1.7"),
    Kind("npz not an npz file", lambda c: (_npz(c), (c.root / "data.npz").write_bytes(b"not a zip")), "error", r"data.npz: cannot be read as npz"),
    Kind("npz labels out of range", lambda c: _npz(c, train_labels=np.array([0, 1, 5, 0])), "error", r"data.npz train_labels\[2\]: unknown label code 5"),
    # issue 16: pixels that blank an image, decode memory, a damaged split file
    Kind("NaN pixel in a float npz image", _nan_npz, "error", r"data.npz\[train_images\]\[1\]: 1 of 192 pixel value\(s\) are NaN or Inf", ImageError, "item"),
    Kind("Inf pixel in a float (mode F) image", _inf_float_tiff, "error", r"a1.png: 1 of 144 pixel value\(s\) are NaN or Inf", ImageError, "item"),
    Kind("8000x8000 palette PNG (decode memory)", _palette_8000, "error", r"a1.png: 8000 x 8000 P would take about \d+ MiB .*MAX_DECODE_BYTES", ImageError, "item"),
    Kind("split file with a list value", _split_file_list_value, "error", r"split.json: field 'splits' has 1 value\(s\) that are not a split name \(e.g. 'img/a2.png': \['train', 'test'\]\)", split_file=True),
]

# Derived files and run folders (issue 16, items 3, 6, 9): each kind is a test elsewhere, named
# here as "file::test" (a parametrised test counts once per kind it covers) with its outcome:
#   rebuilt   a cache recomputed with a warning        error   a named error saying what to do
#   refused   nothing written, the reason named
DERIVED = [
    ("synth folder generated with other settings (README sequence)", "refused", "test_synth_settings.py::test_readme_sequence_refuses_to_overwrite_the_users_benchmark"),
    ("synth folder that is not a synthetic dataset", "refused", "test_synth_settings.py::test_a_folder_that_is_not_a_synthetic_dataset_is_refused"),
    ("full disk while building the image cache", "error", "test_data_cache_safety.py::test_real_full_disk_never_sigbus_and_leaves_no_temp_file"),
    ("full disk while saving a checkpoint", "error", "test_data_cache_safety.py::test_checkpoint_on_a_real_full_disk_is_a_checkpoint_error_old_one_intact"),
    ("image cache .npy truncated", "rebuilt", "test_data_cache_safety.py::test_damaged_image_cache_is_rebuilt_with_a_warning"),
    ("image cache .npy overwritten at the same size", "rebuilt", "test_data_cache_safety.py::test_damaged_image_cache_is_rebuilt_with_a_warning"),
    ("image cache metadata shortened", "rebuilt", "test_data_cache_safety.py::test_damaged_image_cache_is_rebuilt_with_a_warning"),
    ("image cache metadata cut mid-JSON", "rebuilt", "test_data_cache_safety.py::test_damaged_image_cache_is_rebuilt_with_a_warning"),
    ("image cache metadata deleted", "rebuilt", "test_data_cache_safety.py::test_damaged_image_cache_is_rebuilt_with_a_warning"),
    ("feature cache .npz truncated", "rebuilt", "test_derived_files.py::test_truncated_feature_cache_is_recomputed_with_a_warning"),
    ("metrics.csv row with a non-integer step", "error", "test_derived_files.py::test_metrics_csv_with_a_non_integer_step_is_a_named_error"),
    ("run config.yaml that is a YAML list", "error", "test_derived_files.py::test_run_config_that_is_a_yaml_list_is_a_named_error"),
    ("truncated tokenizer.json", "error", "test_derived_files.py::test_truncated_tokenizer_json_is_a_named_error"),
    ("corrupt status.json on reproduce --name reuse", "error", "test_derived_files.py::test_corrupt_status_json_on_a_reused_run_name_is_a_named_error"),
    ("classifier.json image_size 0, -5, '32', 48000 or true", "error", "test_derived_files.py::test_tampered_classifier_json_is_a_named_error"),
    ("classifier.json unknown task", "error", "test_derived_files.py::test_tampered_classifier_json_is_a_named_error"),
]


@pytest.mark.parametrize("kind", MATRIX, ids=[k.name for k in MATRIX])
def test_bad_input(kind: Kind, tmp_path):
    c = Case(tmp_path / "ds")
    written = kind.breaks(c)
    path = written if isinstance(written, Path) else c.write()
    kw = {"split_file": c.root / "split.json"} if kind.split_file else {}
    if kind.outcome == "error" and kind.when == "open":
        with pytest.raises(kind.exc, match=kind.match):
            open_dataset(path, split=None, image_size=8, **kw)
    elif kind.outcome == "error":
        ds = open_dataset(path, split=None, image_size=8)
        with pytest.raises(kind.exc, match=kind.match):
            for i in range(len(ds)):
                ds[i]
    elif kind.outcome == "warn":
        with pytest.warns(UserWarning, match=kind.match):
            ds = open_dataset(path, split=None, image_size=8)
        assert len(ds) >= 8
    else:
        ds = open_dataset(path, split=None, image_size=8)
        assert len(ds) == 8 and {r.patient_id for r in ds.records} == {"p0", "p1", "p2", "p3"}


def test_matrix_counts():
    """Kinds tried and their outcomes; every kind is handled (an error naming the file and
    field, a warning, or a correct read) when the parametrised test above passes."""
    names = [k.name for k in MATRIX]
    assert len(names) == len(set(names))
    outcomes = {o: sum(k.outcome == o for k in MATRIX) for o in ("error", "warn", "read")}
    assert len(MATRIX) == 51 and outcomes == {"error": 47, "warn": 3, "read": 1}


def test_derived_counts():
    """The derived-file kinds (caches, run files, dataset folders) and their outcomes; each names
    a test that exists (a kind is handled when that test passes)."""
    import importlib

    names = [name for name, _, _ in DERIVED]
    assert len(names) == len(set(names))
    for name, outcome, where in DERIVED:
        module, test = where.split("::")
        assert callable(getattr(importlib.import_module(module[:-3]), test, None)), f"{name}: {where} is missing"
    outcomes = {o: sum(k[1] == o for k in DERIVED) for o in ("rebuilt", "error", "refused")}
    assert len(DERIVED) == 16 and outcomes == {"rebuilt": 6, "error": 8, "refused": 2}


# ---------------------------------------------------------------------------------------
# issue 16 (items 1, 2, 5, 8, 10): checkpoints, configs, overrides and names, the inputs
# that are not datasets. Each row builds the bad input under tmp_path and calls the real
# entry point; it counts as handled when the named error is raised (or, for ``kept``, when
# the entry point runs and what must survive survives).


@dataclass
class Refusal:
    name: str
    attempt: Callable[[Path], None]
    exc: Optional[type]  # None: the attempt must succeed and make its own checks ("kept")
    match: str = ""


def _evil(tmp_path: Path, **text_cfg) -> Path:
    pytest.importorskip("open_clip")
    from doubles import evil_open_clip

    return evil_open_clip(tmp_path / "evil", tmp_path / "MARKER", **text_cfg)


def _load(**text_cfg):
    def attempt(tmp_path: Path) -> None:
        import fundus_lab as fl

        try:
            fl.load_model(_evil(tmp_path, **text_cfg))
        finally:
            assert not (tmp_path / "MARKER").exists(), "checkpoint code ran"

    return attempt


def _timm_hub(tmp_path: Path) -> None:
    import json

    import fundus_lab as fl

    folder = _evil(tmp_path, hf_tokenizer_name=None, tokenizer_kwargs=None)
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["model_cfg"]["vision_cfg"]["timm_model_name"] = "hf-hub:org/model"
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    fl.load_model(folder)


def _resume_from_outside_model(tmp_path: Path) -> None:
    import json

    from fundus_lab import config as C
    from fundus_lab.train import pretrain

    cfg = C.load_config(preset="smoke", method="clip", overrides=[f"train.output_dir={tmp_path / 'run'}",
                                                                  f"data.synth_root={tmp_path / 'data'}"])
    (tmp_path / "run").mkdir()
    C.save_config(cfg, tmp_path / "run" / "config.yaml")
    pytest.importorskip("open_clip")
    from doubles import evil_open_clip

    last = evil_open_clip(tmp_path / "run" / "checkpoint-1", tmp_path / "MARKER")
    (last / "trainer_state.json").write_text(json.dumps({"format_version": 1, "step": 1, "trainer": {}}))
    pretrain(cfg)


def _override(*overrides: str):
    def attempt(tmp_path: Path) -> None:
        from fundus_lab import config as C

        C.load_config(preset="smoke", overrides=list(overrides))

    return attempt


def _yaml_config(text: str):
    def attempt(tmp_path: Path) -> None:
        from fundus_lab import config as C

        (tmp_path / "user.yaml").write_text(text)
        C.load_config(tmp_path / "user.yaml", preset="smoke")

    return attempt


def _start_over_in_another_run(tmp_path: Path) -> None:
    from fundus_lab import config as C
    from fundus_lab.run_folder import check_may_start_over

    (tmp_path / "run").mkdir()
    C.save_config(C.load_config(preset="smoke", method="ours"), tmp_path / "run" / "config.yaml")
    (tmp_path / "run" / "metrics.csv").write_text("step,loss\n1,0.5\n")
    check_may_start_over(tmp_path / "run", C.load_config(preset="smoke", method="clip"))


def _manifest_name_path(tmp_path: Path) -> None:
    c = Case(tmp_path / "ds")
    c.m["name"] = "../../x/victim/rel"
    open_dataset(c.write(), split=None, image_size=8, image_cache=True, image_cache_dir=tmp_path / "cache" / "a")


def _cache_cleanup_keeps_other_files(tmp_path: Path) -> None:
    from fundus_lab.data.cache import SUFFIX

    (tmp_path / "cache").mkdir()
    other = tmp_path / "cache" / f"tiny-all-8-backup{SUFFIX}"
    other.write_bytes(b"keep me")
    open_dataset(Case(tmp_path / "ds").write(), split=None, image_size=8, image_cache=True,
                 image_cache_dir=tmp_path / "cache")
    assert other.read_bytes() == b"keep me"


def _reproduce_name(tmp_path: Path) -> None:
    from fundus_lab.reproduce import reproduce

    reproduce("smoke", run_name="../escaped", runs_dir=tmp_path / "runs")


def _method_name(tmp_path: Path) -> None:
    from fundus_lab import config as C

    C.load_config(preset="smoke", method="../../x")


def _external_name(tmp_path: Path) -> None:
    from fundus_lab.experiment import Run

    Run("smoke", tmp_path / "run", tmp_path / "data").add_external("..", tmp_path)


def _eval_saved_data(tmp_path: Path) -> None:
    from fundus_lab.experiment import checkpoint_eval_config

    (tmp_path / "config.yaml").write_text("preset: smoke\ndata:\n  synth_n: .inf\n")
    checkpoint_eval_config(tmp_path / "config.yaml", None, [])


def _config_error():
    from fundus_lab.config import ConfigError

    return ConfigError


def _checkpoint_error():
    from fundus_lab.checkpoint import CheckpointError

    return CheckpointError


REFUSALS = [
    # item 1: code and hubs named by a checkpoint
    Refusal("open_clip tokenizer_kwargs trust_remote_code", _load(), _checkpoint_error(), r"tokenizer_kwargs \['trust_remote_code'\] refused"),
    Refusal("open_clip tokenizer folder with auto_map", _load(tokenizer_kwargs=None), _checkpoint_error(), r"tok/tokenizer_config.json: has an 'auto_map'"),
    Refusal("open_clip tokenizer from a hub name", _load(hf_tokenizer_name="bert-base-uncased", tokenizer_kwargs=None), _checkpoint_error(), r"is not a folder inside the checkpoint"),
    Refusal("open_clip tokenizer path with ../", _load(hf_tokenizer_name="../..", tokenizer_kwargs=None), _checkpoint_error(), r"lies outside the checkpoint folder"),
    Refusal("open_clip text tower from a hub name", _load(hf_tokenizer_name=None, tokenizer_kwargs=None, hf_model_name="roberta-base"), _checkpoint_error(), r"hf_model_name='roberta-base' is not a folder inside"),
    Refusal("open_clip timm tower from hf-hub", _timm_hub, _checkpoint_error(), r"vision_cfg.timm_model_name='hf-hub:org/model'"),
    Refusal("outside model as checkpoint-N on resume", _resume_from_outside_model, _checkpoint_error(), r"checkpoint-1: holds an outside model"),
    # item 2: overrides typed by the schema; another run's folder
    Refusal("override int with trailing comment", _override("train.steps=12 #2"), _config_error(), r"train.steps = '12 #2' is not a valid int"),
    Refusal("override bool that is not one", _override("data.augment=maybe"), _config_error(), r"data.augment = 'maybe' is not a valid bool"),
    Refusal("start over in another run's folder", _start_over_in_another_run, _config_error(), r"holds another run \(method.name: folder has 'ours', this run 'clip'\)"),
    # item 10: finite floats
    Refusal("override float inf", _override("train.lr=inf"), _config_error(), r"train.lr = inf; expected a finite number"),
    Refusal("override float nan", _override("method.contrastive_weight=nan"), _config_error(), r"method.contrastive_weight = nan; expected a finite number"),
    Refusal("YAML float .nan", _yaml_config("train:\n  weight_decay: .nan\n"), _config_error(), r"user.yaml: train.weight_decay = nan; expected a finite"),
    # item 8: names used as paths
    Refusal("manifest name that is a path", _manifest_name_path, ManifestError, r"tiny.yaml: name: '../../x/victim/rel' is not a usable name"),
    Refusal("cache cleanup near other files", _cache_cleanup_keeps_other_files, None),
    Refusal("reproduce run name with ../", _reproduce_name, _config_error(), r"run name '../escaped' is not a usable name"),
    Refusal("method name with ../", _method_name, _config_error(), r"method name '../../x' is not a usable name"),
    Refusal("outside-model name '..'", _external_name, _config_error(), r"external model name '..' is not a usable name"),
    # item 5: the run config eval reads
    Refusal("eval: non-finite value in the run's config.yaml", _eval_saved_data, _config_error(), r"config.yaml: data.synth_n = inf is not a valid int"),
]


@pytest.mark.parametrize("refusal", REFUSALS, ids=[r.name for r in REFUSALS])
def test_refused(refusal: Refusal, tmp_path):
    if refusal.exc is None:
        refusal.attempt(tmp_path)
    else:
        with pytest.raises(refusal.exc, match=refusal.match):
            refusal.attempt(tmp_path)


def test_refusal_counts():
    """Issue 16's kinds (items 1, 2, 5, 8, 10): 18 refused with a named error, 1 kept."""
    names = [r.name for r in REFUSALS]
    assert len(names) == len(set(names)) and not set(names) & {k.name for k in MATRIX}
    assert len(REFUSALS) == 19 and sum(r.exc is None for r in REFUSALS) == 1
