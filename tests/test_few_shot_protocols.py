"""Table 1's few-shot is the paper's protocol (fine-tuning with k images per class); the
linear probe on frozen features is its own protocol in Table 2; both tables are written from
one set of evaluation records (fast: toy models, no pretraining)."""

from __future__ import annotations

import csv
import importlib

import numpy as np
import pytest
import torch

from fundus_lab import config as C
from fundus_lab import experiment as ex
from fundus_lab.experiment import shot_curve_rows, write_results
from doubles import PlantedModel, ToyDataset, ToyViT

CLASSES = ["red", "green", "blue"]
OVERRIDES = ["eval.shots=[1,2]", "eval.seeds=2", "eval.few_shot_epochs=3", "eval.few_shot_patience=3",
             "eval.fine_tune_batch_size=4", "eval.fine_tune_lr=0.05", "eval.batch_size=16", "eval.progress=false"]

pytestmark = pytest.mark.filterwarnings("ignore:fewer than k")


class SplittableToy(ToyDataset):
    """ToyDataset with ``subset`` (as FundusDataset has), which k-shot fine-tuning draws from."""

    def subset(self, indices):
        idx = np.asarray(list(indices), dtype=np.int64)
        out = SplittableToy(self.labels[idx], self.classes, task=self.task, size=self.image_size, split=self.split,
                            patients=[self.records[i].patient_id for i in idx], root=self.root)
        out.images, out.records = self.images[idx], [self.records[i] for i in idx]
        return out


def _sets():
    rng = np.random.default_rng(0)
    make = lambda n, split, seed: SplittableToy(rng.integers(0, 3, n), CLASSES, noise=0.1, seed=seed, split=split)  # noqa: E731
    train, val = make(30, "train", 1), make(24, "val", 2)
    tests = {"in_domain": make(18, "test", 3), "held_out_camera": make(18, "test_camera", 4)}
    return {"train": train, "val": val, "tests": tests, "task": "multiclass", "classes": CLASSES}


def test_table1_few_shot_fine_tunes_the_encoder_on_k_images_per_class(monkeypatch):
    """The weights of the image encoder move (a copy: the pretrained model stays as it was),
    on k x classes training images per (k, seed), with the fine-tune recipe's layer-wise decay."""
    ft = importlib.import_module("fundus_lab.eval.few_shot")  # the protocol calls fine_tune by this name
    real, seen = ft.fine_tune, []

    def spy(model, train_ds, val_ds, test_ds, **kw):
        out = real(model, train_ds, val_ds, test_ds, **{**kw, "return_model": True})
        seen.append((len(train_ds), kw["layer_decay"], out.get("model")))
        return out

    monkeypatch.setattr(ft, "fine_tune", spy)
    model = ToyViT(width=8, depth=2)
    before = {k: v.clone() for k, v in model.image_encoder.state_dict().items()}
    cfg = C.load_config(overrides=OVERRIDES)
    fit = ex.PROTOCOLS.get("few_shot").run(model, _sets(), cfg, None)

    assert fit.available and sorted(fit.result["shots"]) == [1, 2] and fit.result["k"] == 2
    assert [n for n, _, _ in seen] == [3, 3, 6, 6]  # k=1, 2 x two seeds, 3 classes
    assert {d for _, d, _ in seen} == {cfg.eval.fine_tune_layer_decay}
    for _, _, classifier in seen:
        tuned = classifier.backbone.image_encoder.state_dict()
        moved = [k for k in before if not torch.allclose(tuned[k], before[k])]
        assert any(k.startswith("blocks.") for k in moved) and "patch_embed.weight" in moved, moved
    for k, v in model.image_encoder.state_dict().items():
        torch.testing.assert_close(v, before[k])  # fine-tuning worked on a copy
    # the table's k is scored on every column, one prediction per seed
    assert {c: len(p) for c, p in fit.predictions.items()} == {"in_domain": 2, "held_out_camera": 2}
    runs = fit.result["shots"][2]["fine_tune"]["runs"]
    assert [r["seed"] for r in runs] == [0, 1] and all(len(r["shots"]) == 6 for r in runs)


def test_few_shot_fine_tuning_is_na_without_transformer_blocks():
    fit = ex.PROTOCOLS.get("few_shot").run(PlantedModel(np.eye(3), {}), _sets(), C.load_config(overrides=OVERRIDES), None)
    assert not fit.available and "no transformer blocks" in fit.result["reason"]


def test_linear_probe_is_the_frozen_k_shot_probe_with_its_curves():
    """Table 2's linear probe: the k-shot logistic regression (and prompt head) on frozen features."""
    model = ToyViT(width=8, depth=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit = ex.PROTOCOLS.get("linear_probe").run(model, _sets(), C.load_config(overrides=OVERRIDES), None)
    assert sorted(fit.result["shots"]) == [1, 2] and fit.result["shots"][2]["probe"]["n_seeds"] == 2
    assert {c: len(p) for c, p in fit.predictions.items()} == {"in_domain": 2, "held_out_camera": 2}
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_protocols_are_split_between_the_paper_table_and_the_second_table():
    table_of = {name: p.table for name, p in ex.PROTOCOLS.items()}
    assert [p for p in ex.DEFAULT_PROTOCOLS if table_of[p] == "table1"] == ["zero_shot", "few_shot", "fine_tune"]
    assert [p for p in ex.DEFAULT_PROTOCOLS if table_of[p] == "table2"] == [
        "linear_probe", "zero_shot_disjoint", "zero_shot_unseen"]
    assert ex.PROTOCOLS.get("few_shot").header.startswith("Few-shot fine-tune")
    assert "few_shot_epochs" in ex.PROTOCOLS.get("few_shot").settings and "fine_tune_lr" in ex.PROTOCOLS.get("few_shot").settings
    assert "few_shot" not in ex.REFERENCES.get("pixels").protocols  # pixels have nothing to fine-tune


def _record(protocol, value, head_runs=None):
    """An evaluation record as ``evaluate_model`` writes it: 4 test images, one run."""
    labels = np.array([0, 1, 2, 0])
    probs = np.eye(3)[[0, 1, 2, 1]] if value < 1 else np.eye(3)[labels]
    cell = {"values": [value], "summary": {"mean": value}, "n_test": 4, "labels": labels.tolist(),
            "probs": [probs.tolist()]}
    return {"available": True, "protocol": protocol, "dataset": "synth-x", "task": "multiclass", "metric": "accuracy",
            "classes": CLASSES, "columns": {"in_domain": cell, "held_out_camera": cell},
            "result": {"shots": head_runs or {}}, "json": f"/run/eval/m/seed0/{protocol}.json", "run_dir": "/run/m"}


def test_write_results_writes_table1_and_table2_with_their_own_columns(tmp_path):
    cfg = C.load_config(overrides=["eval.shots=[1,2]", "eval.bootstrap=10"])
    protocols = list(ex.DEFAULT_PROTOCOLS)
    results = {"m": {p: [_record(p, 0.75)] for p in protocols}}
    paths = write_results(results, cfg, tmp_path, protocols)
    one = next(csv.DictReader(open(paths["csv"])))
    two = next(csv.DictReader(open(paths["table2_csv"])))
    assert {k.rsplit("_in_domain", 1)[0] for k in one if k.endswith("_in_domain_mean")} == {
        "zero_shot", "few_shot", "fine_tune"}
    assert {k.rsplit("_in_domain", 1)[0] for k in two if k.endswith("_in_domain_mean")} == {
        "linear_probe", "zero_shot_disjoint", "zero_shot_unseen"}
    assert float(two["zero_shot_unseen_held_out_camera_mean"]) == 0.75
    md1, md2 = paths["md"].read_text(), paths["table2_md"].read_text()
    assert md1.startswith("Table 1, the paper's protocols") and "Few-shot fine-tune k=2" in md1
    assert "Linear probe k=2" not in md1 and "Linear probe k=2" in md2 and "unseen diseases" in md2
    assert "beyond the paper" in md2 and r"\begin{tabular}" in paths["table2_tex"].read_text()
    # only Table 2's protocols: no Table 1 written
    only = write_results({"m": {"linear_probe": [_record("linear_probe", 0.5)]}}, cfg, tmp_path / "b", ["linear_probe"])
    assert "table2_md" in only and "md" not in only


def test_shot_curves_hold_fine_tuning_probe_and_prompt_head_per_k():
    runs = lambda *v: {"runs": [{"metrics": {"accuracy": x}} for x in v]}  # noqa: E731
    records = {"few_shot": [_record("few_shot", 0.5, {"1": {"fine_tune": runs(0.4, 0.6)}, "2": {"fine_tune": runs(0.8)}})],
               "linear_probe": [_record("linear_probe", 0.5, {"1": {"probe": runs(0.3), "prompt_head": None},
                                                              "2": {"probe": runs(0.5), "prompt_head": None}})]}
    rows = shot_curve_rows("clip", records)
    got = {(r["method"], r["k"]): (round(r["mean"], 6), r["n"]) for r in rows}
    assert got == {("clip (fine-tune)", 1): (0.5, 2), ("clip (fine-tune)", 2): (0.8, 1),
                   ("clip (probe)", 1): (0.3, 1), ("clip (probe)", 2): (0.5, 1)}
    assert {r["model"] for r in rows} == {"clip"} and {r["metric"] for r in rows} == {"accuracy"}
