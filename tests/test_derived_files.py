"""Issue 16, item 9: every damaged derived file is rebuilt with a warning (caches) or is a
named error that says what to do (run files); never a raw traceback naming no file.

One test per bullet of the issue; each failed on the code before the fix (a BadZipFile,
a ValueError from int(), an AttributeError on a list, the tokenizers library's bare
Exception, a TypeError on an unhashable list, a JSONDecodeError, or a tampered value
accepted). The image-cache bullet is in tests/test_data_cache_safety.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fundus_lab import checkpoint as ckpt
from fundus_lab import reproduce as rp
from fundus_lab import train as T
from fundus_lab.cli import predict_main
from fundus_lab.config import ConfigError
from fundus_lab.data import open_dataset, synth
from fundus_lab.data.images import DataError
from fundus_lab.data.tokenizer import load_tokenizer, train_tokenizer
from fundus_lab.eval import features
from fundus_lab.eval.features import extract_features
from fundus_lab.predict import ClassifierError, load_classifier
from doubles import ToyDataset, ToyViT
from doubles import reproduce_notebook as _notebook
from doubles import make_cfg


def stop_at(step_to_stop):
    def cb(step, logs):
        if step == step_to_stop:
            raise KeyboardInterrupt("killed")

    return cb


@pytest.fixture()
def killed_run(doubles, tmp_path):  # noqa: F811
    """A run killed at step 3 (checkpoint-2 is last) and a function that resumes it."""
    cfg = make_cfg(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        T.pretrain(cfg, callbacks=[stop_at(3)])
    return tmp_path / "run", lambda: T.pretrain(cfg)


def test_truncated_feature_cache_is_recomputed_with_a_warning(tmp_path):
    features.clear_cache()
    ds = ToyDataset(np.random.default_rng(0).integers(0, 3, 6), ["a", "b", "c"], seed=1)
    want, labels = extract_features(ToyViT(), ds, kind="cls", batch_size=4, cache_dir=tmp_path)
    [npz] = tmp_path.glob("features-*.npz")
    npz.write_bytes(npz.read_bytes()[:100])
    features.clear_cache()  # the in-memory copy gone: the next call reads the file
    with pytest.warns(UserWarning, match=rf"feature cache {npz} is damaged \(BadZipFile.*recomputing it"):
        got, got_labels = extract_features(ToyViT(), ds, kind="cls", batch_size=4, cache_dir=tmp_path)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_labels, labels)
    features.clear_cache()
    with np.load(npz) as z:  # rewritten whole
        np.testing.assert_array_equal(z["features"], want)
    features.clear_cache()


def test_metrics_csv_with_a_non_integer_step_is_a_named_error(killed_run):
    run, resume = killed_run
    path = run / "metrics.csv"
    lines = path.read_text().splitlines()
    lines[1] = "two," + lines[1].split(",", 1)[1]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ckpt.CheckpointError, match=rf"{path} line 2: step 'two' is not an integer.*fix or delete that "
                       r"line and resume, or start over with resume=False"):
        resume()


def test_run_config_that_is_a_yaml_list_is_a_named_error(killed_run):
    run, resume = killed_run
    (run / "config.yaml").write_text("- model\n- train\n")
    with pytest.raises(ConfigError, match=r"config.yaml: expected a mapping of config sections, got a YAML list.*"
                       r"resume=False \(--no-resume\)"):
        resume()


def test_truncated_tokenizer_json_is_a_named_error(tmp_path):
    train_tokenizer(["hard exudates near the macula", "a thin neuroretinal rim"], vocab_size=120, out_dir=tmp_path / "tok")
    path = tmp_path / "tok" / "tokenizer.json"
    path.write_text(path.read_text()[:200])
    with pytest.raises(ckpt.CheckpointError, match=rf"{path}: not valid JSON .*truncated or damaged: restore it"):
        load_tokenizer(tmp_path / "tok")


def test_split_file_with_a_list_value_is_a_named_error(tmp_path):
    manifest = synth.generate(tmp_path / "synth-fives", "fives", n=4, seed=0, image_size=32, workers=1)
    split_file = tmp_path / "split.json"
    open_dataset(manifest, split=None, image_size=32, split_file=split_file)
    payload = json.loads(split_file.read_text())
    key = sorted(payload["splits"])[1]
    payload["splits"][key] = ["train", "test"]
    split_file.write_text(json.dumps(payload))
    with pytest.raises(DataError, match=rf"split file {split_file}: field 'splits' has 1 value\(s\) that are not a split "
                       rf"name \(e.g. '{key}': \['train', 'test'\]\).*delete the file to split again"):
        open_dataset(manifest, split="train", image_size=32, split_file=split_file)


@pytest.mark.parametrize("text", ["{\"00_data_tour\": {\"state\": \"ok\"", "[1, 2]", "{\"00_data_tour\": 3}"])
def test_corrupt_status_json_on_a_reused_run_name_is_a_named_error(tmp_path, text):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _notebook(nbs / "00_mark.ipynb", "from pathlib import Path\n(Path(run_dir) / 'ran.txt').write_text('x')")
    run = tmp_path / "runs" / "again"
    run.mkdir(parents=True)
    (run / "status.json").write_text(text)
    ran = []
    with pytest.raises(ValueError, match=r"again/status.json: .*delete it .*or reproduce into a new --name"):
        rp.reproduce("smoke", run_name="again", runs_dir=tmp_path / "runs", notebook_dir=nbs, log=ran.append,
                     progress=False)
    assert ran == [] and not (run / "ran.txt").exists()  # refused before any notebook ran


@pytest.mark.parametrize("field, value, why", [
    ("image_size", 0, r"'preprocessing.image_size' is 0; expected an integer from 16 to 1024"),
    ("image_size", -5, r"'preprocessing.image_size' is -5; expected an integer"),
    ("image_size", "32", r"'preprocessing.image_size' is '32'; expected an integer"),
    ("image_size", 48000, r"'preprocessing.image_size' is 48000; expected an integer from 16 to 1024"),
    ("image_size", True, r"'preprocessing.image_size' is True; expected an integer"),
    ("task", "regression", r"'task' is 'regression'; expected one of \('multiclass'"),
])
def test_tampered_classifier_json_is_a_named_error(saved, capsys, field, value, why):  # noqa: F811
    _, images, folder = saved
    meta = folder / "classifier.json"
    info = json.loads(meta.read_text())
    (info["preprocessing"] if field == "image_size" else info)[field] = value
    meta.write_text(json.dumps(info))
    with pytest.raises(ClassifierError, match=rf"{meta}: field {why}"):
        load_classifier(folder)
    assert predict_main([str(folder), str(images[0])]) == 2
    printed = capsys.readouterr()
    assert "classifier.json: field" in printed.out + printed.err
