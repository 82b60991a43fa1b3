"""End to end: a `Run` pretrains clip, eva (with a clip teacher) and mae on a tiny
synthetic benchmark, builds the reference rows (random-init, supervised, pixels), evaluates
them on both test columns, writes Tables 1 and 2; reruns come from the cache; every row leads back
to its run folder, config and split files; no patient crosses splits."""

import csv
import dataclasses
import json
from pathlib import Path

import pytest

try:  # the parts written by TRAIN / MODEL / DATA / SYNTH
    import fundus_lab.data.dataset  # noqa: F401
    import fundus_lab.data.synth  # noqa: F401
    import fundus_lab.models  # noqa: F401
    import fundus_lab.train  # noqa: F401
    from fundus_lab.data.synth import generate_benchmark  # noqa: F401
    from fundus_lab.models import load_model  # noqa: F401

    MISSING = None
except ImportError as err:  # pragma: no cover - only while those parts are being written
    MISSING = str(err)

from doubles import COMPARE_TINY as TINY
from fundus_lab import config as C

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:fewer than k"),  # tiny data: validation draws fall short
    pytest.mark.skipif(MISSING is not None, reason=f"pretraining/data code not importable yet: {MISSING}"),
]

METHODS = ["clip", "eva", "mae"]


def _config(extra=()):
    if not (C.CONFIG_DIR / "presets" / "smoke.yaml").is_file():
        pytest.skip("configs/presets/smoke.yaml (TRAIN) not written yet")
    return C.load_config(preset="smoke", overrides=TINY + list(extra))


def _run(out, extra=()):
    from fundus_lab.experiment import Run

    _config()
    return Run("smoke", out, out / "data", TINY + list(extra))


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    from fundus_lab.experiment import compare

    out = tmp_path_factory.mktemp("compare")
    paths = compare(_run(out), METHODS)
    return out, paths


def test_table_has_every_method_and_na_for_mae(table):
    out, paths = table
    assert {"csv", "md", "tex", "json"} <= set(paths)
    rows = {r["method"]: r for r in csv.DictReader(open(paths["csv"]))}
    assert list(rows) == METHODS + ["random-init", "supervised", "pixels"]
    assert rows["mae"]["zero_shot_in_domain_mean"] == "n/a"
    for m in ("clip", "eva", "random-init"):
        assert 0.0 <= float(rows[m]["zero_shot_in_domain_mean"]) <= 1.0
        lo, hi = float(rows[m]["zero_shot_in_domain_ci_low"]), float(rows[m]["zero_shot_in_domain_ci_high"])
        assert lo <= float(rows[m]["zero_shot_in_domain_mean"]) <= hi
    for m in METHODS + ["random-init", "supervised"]:
        assert int(rows[m]["few_shot_in_domain_n"]) == 2  # 1 pretraining seed x 2 k-shot fine-tuning draws
        assert int(rows[m]["fine_tune_in_domain_n"]) == 1
    # reference rows: no zero-shot without a trained text tower, no fine-tuning of pixels
    assert rows["supervised"]["zero_shot_in_domain_mean"] == "n/a"
    assert rows["pixels"]["zero_shot_in_domain_mean"] == "n/a" and rows["pixels"]["fine_tune_in_domain_mean"] == "n/a"
    assert rows["pixels"]["few_shot_in_domain_mean"] == "n/a"  # nothing to fine-tune
    assert not any(k.startswith("linear_probe") for k in rows["clip"])  # Table 2's column
    md = paths["md"].read_text()
    assert "| mae | n/a | n/a |" in md
    assert "in-domain" in md and "held-out camera" in md and "Chance level" in md
    assert "Few-shot fine-tune k=2" in md
    table2 = {r["method"]: r for r in csv.DictReader(open(paths["table2_csv"]))}
    assert list(table2) == list(rows)
    for m in METHODS + ["random-init", "supervised", "pixels"]:
        assert int(table2[m]["linear_probe_in_domain_n"]) == 2  # 1 pretraining seed x 2 few-shot seeds
    for m in ("clip", "eva", "random-init"):  # text towers: both transfer columns, both test columns
        for column in ("zero_shot_disjoint_in_domain_mean", "zero_shot_unseen_in_domain_mean",
                       "zero_shot_unseen_held_out_camera_mean"):
            assert 0.0 <= float(table2[m][column]) <= 1.0, (m, column)
    for m in ("mae", "supervised", "pixels"):
        assert table2[m]["zero_shot_unseen_in_domain_mean"] == "n/a"
    assert "Zero-shot, unseen diseases (synth-unseen, acc.)" in paths["table2_md"].read_text()
    curves = paths["few_shot_md"].read_text()
    assert "| Method | k=1 | k=2 |" in curves
    assert "| clip (fine-tune) |" in curves and "| clip (prompt head) |" in curves and "| mae (probe) |" in curves
    assert "mae (prompt head)" not in curves  # no text encoder, no prompt head
    assert "pixels (fine-tune)" not in curves and "| pixels (probe) |" in curves
    assert r"\begin{tabular}" in paths["tex"].read_text() and r"\begin{tabular}" in paths["table2_tex"].read_text()


def test_rows_trace_back_to_runs_configs_and_splits(table):
    out, paths = table
    for row in csv.DictReader(open(paths["csv"])):
        if row["method"] in ("random-init", "supervised", "pixels"):
            continue
        for protocol in ("zero_shot", "few_shot", "fine_tune"):
            result = json.loads((out / row[f"{protocol}_json"]).read_text())
            assert Path(result["run_dir"]) == out / "pretrain" / row["method"] / "seed0"
            assert Path(result["config"]).is_file() and Path(result["pretrain_split"]).is_file()
            assert result["pretrain_seed"] == 0 and len(result["key"]) == 64
            for split in result["splits"].values():
                assert Path(split["file"]).is_file()
    eva = C.read_yaml(out / "pretrain" / "eva" / "seed0" / "config.yaml")
    assert Path(eva["method"]["teacher_checkpoint"]) == out / "pretrain" / "clip" / "seed0" / "checkpoint-last"
    # the same budget for every method
    steps = {C.read_yaml(out / "pretrain" / m / "seed0" / "config.yaml")["train"]["steps"] for m in METHODS}
    assert steps == {2}


def test_no_patient_in_both_training_and_test_splits(table):
    out, _ = table
    for protocol in ("few_shot", "fine_tune"):
        result = json.loads((out / "eval" / "clip" / "seed0" / f"{protocol}.json").read_text())
        patients = {}
        for split, info in result["splits"].items():
            with open(info["file"]) as f:
                patients[split] = {r["patient_id"] or r["image"] for r in csv.DictReader(f)}
        assert patients["train"] and patients["test-in_domain"]
        for test in [s for s in patients if s.startswith("test-")]:
            assert not patients["train"] & patients[test]
            assert not patients["val"] & patients[test]


def test_rerun_is_cached_and_a_changed_setting_reruns_only_its_part(table, monkeypatch):
    import fundus_lab.experiment as ex
    import fundus_lab.train
    from fundus_lab.experiment import compare

    out, paths = table
    before = paths["csv"].read_text()

    def refuse(*args, **kwargs):
        raise AssertionError("cached work was redone")

    monkeypatch.setattr(fundus_lab.train, "pretrain", refuse)
    for name in ("random-init", "supervised"):
        monkeypatch.setitem(ex.REFERENCES._entries, name, dataclasses.replace(ex.REFERENCES.get(name), build=refuse))
    protocols = dict(ex.PROTOCOLS.items())
    before2 = paths["table2_csv"].read_text()
    for name in ex.DEFAULT_PROTOCOLS:
        monkeypatch.setitem(ex.PROTOCOLS._entries, name, dataclasses.replace(protocols[name], run=refuse))
    again = compare(_run(out), METHODS)
    assert again["csv"].read_text() == before and again["table2_csv"].read_text() == before2

    calls = []
    for name in ("few_shot", "linear_probe"):
        real = protocols[name].run
        monkeypatch.setitem(ex.PROTOCOLS._entries, name, dataclasses.replace(
            protocols[name], run=lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k)))
    compare(_run(out, ["eval.seeds=3"]), ["clip"], references=())
    assert calls == ["few_shot", "linear_probe"]  # both k-shot protocols redone with the new seed count
    calls.clear()
    compare(_run(out, ["eval.seeds=3", "eval.few_shot_epochs=1"]), ["clip"], references=())
    assert calls == ["few_shot"]  # fine-tuning's own setting: the probe stays cached; pretraining and the rest too


def test_eval_command_on_a_checkpoint(table, capsys):
    from fundus_lab.cli import evaluate_main

    out, _ = table
    if not (C.CONFIG_DIR / "presets" / "smoke.yaml").is_file():
        pytest.skip("configs/presets/smoke.yaml (TRAIN) not written yet")
    rc = evaluate_main([
        "--checkpoint", str(out / "pretrain" / "clip" / "seed0"), "--protocol", "zero_shot",
        "--dataset", "synth-odir", "--data-root", str(out / "data"), "--preset", "smoke",
        "--out", str(out / "cli"), *TINY,
    ])
    assert rc == 0
    result = json.loads((out / "cli" / "zero_shot.json").read_text())
    assert result["metric"] == "single_label_accuracy" and result["available"]
    assert "zero_shot on synth-odir (in_domain)" in capsys.readouterr().out


def test_an_override_reaches_table1_like_every_notebook(table):
    """`method.*` overrides used to be dropped by Table 1's own config layering."""
    from fundus_lab.experiment import Run

    out, _ = table
    over = TINY + ["method.mask_ratio=0.5"]
    ctx = Run(notebook="07_results_table", preset="smoke", run_dir=out, data_root=out / "data", overrides=over)
    run = _run(out, ["method.mask_ratio=0.5"])
    for method in ("clip", "eva", "mae"):
        assert ctx.config(method) == run.config(method)
        assert run.config(method).method.mask_ratio == 0.5
    # the config Table 1 pretrains with is the one saved in the run folder
    saved = C.read_yaml(out / "pretrain" / "clip" / "seed0" / "config.yaml")
    assert saved["method"]["mask_ratio"] == C.resolve_config("smoke", "clip", TINY).method.mask_ratio


def test_a_protocol_on_another_dataset_is_cached_beside_table1s(table):
    """`Run.evaluate(..., dataset=)`: a full-split linear probe on the zero-shot task (synth-odir)
    for a row without a text tower, scored as the ODIR-like single-label accuracy, next to its
    probe on the dataset the config names."""
    out, _ = table
    run = _run(out)
    default = run.evaluate("supervised", "linear_probe_full")
    other = run.evaluate("supervised", "linear_probe_full", dataset="synth-odir")
    assert default["dataset"] == "synth-fives" and other["dataset"] == "synth-odir"
    assert other["metric"] == "single_label_accuracy" and default["metric"] == "accuracy"
    folder = out / "eval" / "supervised" / "seed0"
    assert (folder / "linear_probe_full.json").is_file() and (folder / "linear_probe_full@synth-odir.json").is_file()
    assert 0.0 <= other["columns"]["in_domain"]["summary"]["mean"] <= 1.0
    assert run.evaluate("supervised", "linear_probe_full")["key"] == default["key"]  # the default's probe untouched
