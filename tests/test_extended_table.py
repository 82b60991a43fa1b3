"""The extended Table 1 (issue 21): every method config (clip, coca, eva, ours, ours-flip, mae,
flair, vilref, visionclip, the three ablations) and the reference rows through one
``compare`` at a tiny budget with two pretraining seeds, so every row is scored and every
pair of rows gets a paired verdict or a stated reason for none."""

import csv
import math

import pytest

from fundus_lab import config as C

from test_eval_compare import TINY

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:fewer than k")]

EXTENDED = ["clip", "coca", "eva", "ours", "ours-flip", "mae", "flair", "vilref", "visionclip",
            "ours-no-mim", "ours-no-caption", "ours-no-xattn"]
TEXT_FREE = {"mae"}  # no text tower: zero-shot is n/a


def test_the_extended_list_is_every_method_config():
    assert sorted(EXTENDED) == C.available_methods()


def test_every_method_and_reference_row_runs_through_compare(tmp_path):
    from fundus_lab.eval.compare import compare
    from fundus_lab.experiment import REFERENCES, Run

    run = Run("smoke", tmp_path / "run", tmp_path / "data", TINY + ["eval.pretrain_seeds=[0,1]"])
    paths = compare(run, EXTENDED)
    rows = {r["method"]: r for r in csv.DictReader(open(paths["csv"]))}
    assert list(rows) == EXTENDED + list(REFERENCES)
    for method in EXTENDED:
        for key in ("zero_shot_in_domain", "few_shot_in_domain", "fine_tune_in_domain"):
            value = rows[method][f"{key}_mean"]
            if key.startswith("zero_shot") and method in TEXT_FREE:
                assert value == "n/a"
                continue
            assert 0.0 <= float(value) <= 1.0, (method, key, value)
            assert rows[method][f"{key}_seed_std"] != "n/a", (method, key)  # two seeds: a spread
    pairs = list(csv.DictReader(open(paths["pairs_csv"])))
    n_rows = len(rows)
    assert len(pairs) == n_rows * (n_rows - 1) // 2 * 6  # every pair x every column
    for p in pairs:
        if p["diff"] != "n/a":
            assert p["verdict"] in ("A > B", "B > A", "not separated")
            assert float(p["ci_low"]) <= float(p["ci_high"])
            assert math.isfinite(float(p["diff"]))
    legend = paths["md"].read_text()
    assert "equal steps (train.budget=steps)" in legend
    for method in EXTENDED:
        assert f"{method}: 2 steps" in legend
