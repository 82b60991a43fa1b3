"""Pretraining seeds in Table 1: the hierarchical bootstrap (seeds, then test images), the
paired bootstrap of two rows, and the verdicts of the pairs table, on cases small enough to
compute by hand."""

import csv

import numpy as np
import pytest

from fundus_lab import config as C
from fundus_lab.eval import seeds as S
from fundus_lab.eval.metrics import bootstrap_cell, metric_fn

ACC = metric_fn("multiclass", "accuracy", 2)
LABELS = np.array([0, 1])
RIGHT = {0: [0.9, 0.1], 1: [0.1, 0.9]}  # probabilities that predict class c
WRONG = {0: [0.1, 0.9], 1: [0.9, 0.1]}


def probs(correct):
    """Two-class probabilities, right on the images where ``correct`` is 1 (labels 0, 1)."""
    return np.array([(RIGHT if c else WRONG)[int(y)] for c, y in zip(correct, LABELS)])


# row A: seed 0 right on both images, seed 1 right on image 0 only
ROW_A = [[probs([1, 1])], [probs([1, 0])]]
# row B: seed 0 right on image 0 only, seed 1 wrong on both
ROW_B = [[probs([1, 0])], [probs([0, 0])]]


def test_replicates_follow_the_drawn_seeds_then_the_drawn_images():
    seeds = np.array([[0, 1], [1, 1], [0, 0]])
    images = np.array([[[0, 1], [1, 1]], [[1, 1], [0, 0]], [[0, 0], [1, 0]]])
    # replicate 0: seed 0 on images (0, 1) -> 1; seed 1 on (1, 1) -> 0; mean 0.5
    # replicate 1: seed 1 on (1, 1) -> 0; seed 1 on (0, 0) -> 1; mean 0.5
    # replicate 2: seed 0 on (0, 0) -> 1; seed 0 on (1, 0) -> 1; mean 1.0
    assert S.replicates(ACC, LABELS, ROW_A, (seeds, images)).tolist() == [0.5, 0.5, 1.0]


def test_hierarchical_bootstrap_matches_the_enumerated_distribution():
    """Row A by hand: a drawn seed scores 1 (seed 0) or, for seed 1, 1 / 0.5 / 0 with
    probability 1/4, 1/2, 1/4; so one drawn seed is 1, 0.5, 0 w.p. 5/8, 1/4, 1/8 and the mean
    of two is 1, .75, .5, .25, 0 w.p. 25, 20, 14, 4, 1 (/64): CI [0.25, 1]."""
    reps = S.replicates(ACC, LABELS, ROW_A, S.hierarchical_draws(2, 2, 3000, seed=3))
    expected = {1.0: 25 / 64, 0.75: 20 / 64, 0.5: 14 / 64, 0.25: 4 / 64, 0.0: 1 / 64}
    values, counts = np.unique(reps, return_counts=True)
    assert set(values.tolist()) == set(expected)
    for v, c in zip(values, counts):
        assert c / len(reps) == pytest.approx(expected[v], abs=0.02)
    assert S.percentile_ci(reps) == [0.25, 1.0]
    # resampling test images only (one level) would miss seed noise: its CI is far narrower
    image_only = bootstrap_cell("multiclass", "accuracy", 2, LABELS, [p for runs in ROW_A for p in runs], 1000)
    assert image_only[0] > 0.25


def test_paired_bootstrap_matches_the_enumerated_difference():
    """A - B by hand: in a drawn seed 0, 1 - (B on [1, 0] resampled); in seed 1, (A on [1, 0]
    resampled) - 0: either way 0, .5, 1 w.p. 1/4, 1/2, 1/4. The mean of two drawn seeds is
    0, .25, .5, .75, 1 w.p. 1, 4, 6, 4, 1 (/16): CI [0, 1], not separated."""
    draws = S.hierarchical_draws(2, 2, 3000, seed=5)
    diff = S.replicates(ACC, LABELS, ROW_A, draws) - S.replicates(ACC, LABELS, ROW_B, draws)
    expected = {0.0: 1 / 16, 0.25: 4 / 16, 0.5: 6 / 16, 0.75: 4 / 16, 1.0: 1 / 16}
    values, counts = np.unique(diff, return_counts=True)
    assert set(values.tolist()) == set(expected)
    for v, c in zip(values, counts):
        assert c / len(diff) == pytest.approx(expected[v], abs=0.02)
    ci = S.percentile_ci(diff)
    assert ci == [0.0, 1.0] and S.verdict(ci, seeds=2) == "not separated"


def test_paired_draws_cancel_what_both_rows_share():
    """Same seed and same images for both rows: identical rows differ by exactly 0 in every
    replicate, and an always-right row minus B is exactly 1 - B's replicate."""
    draws = S.hierarchical_draws(2, 2, 500, seed=1)
    b = S.replicates(ACC, LABELS, ROW_B, draws)
    assert S.percentile_ci(S.replicates(ACC, LABELS, ROW_B, draws) - b) == [0.0, 0.0]
    always = S.replicates(ACC, LABELS, [[probs([1, 1])], [probs([1, 1])]], draws)
    lo, hi = S.percentile_ci(b)
    assert S.percentile_ci(always - b) == pytest.approx([1 - hi, 1 - lo])


def test_one_seed_is_the_image_bootstrap_of_table1():
    """With one seed nothing is drawn for the seed: the CI is bootstrap_cell's, draw for draw."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 40)
    runs = [rng.dirichlet(np.ones(3), 40) for _ in range(2)]
    fn = metric_fn("multiclass", "accuracy", 3)
    reps = S.replicates(fn, y, [runs], S.hierarchical_draws(1, 40, 300, seed=0))
    assert S.percentile_ci(reps) == bootstrap_cell("multiclass", "accuracy", 3, y, runs, 300, seed=0)


def test_verdicts_and_the_one_seed_rule():
    assert S.verdict([0.01, 0.2], seeds=3) == "A > B"
    assert S.verdict([-0.2, -0.01], seeds=3) == "B > A"
    assert S.verdict([-0.01, 0.2], seeds=3) == "not separated"
    assert S.verdict([0.01, 0.2], seeds=1) == ""  # training noise unmeasured: no verdict
    assert S.seed_sd([0.5]) is None and S.seed_sd([0.4, 0.6]) == pytest.approx(np.std([0.4, 0.6], ddof=1))


def _record(per_run_correct, seed):
    """An evaluation record of one pretraining seed, as Run.evaluate writes it (zero-shot)."""
    y = np.array([0, 1] * 10)
    runs = [np.array([(RIGHT if c else WRONG)[int(t)] for c, t in zip(correct, y)]) for correct in per_run_correct]
    column = {"values": [float(ACC(y, p)) for p in runs], "probs": runs, "labels": y, "n_test": len(y)}
    return {"available": True, "task": "multiclass", "metric": "accuracy", "classes": ["a", "b"],
            "dataset": "synth-x", "columns": {"in_domain": column, "held_out_camera": None},
            "json": f"eval/m/seed{seed}/zero_shot.json", "run_dir": f"pretrain/m/seed{seed}"}


def _write(tmp_path, n_seeds):
    from fundus_lab.experiment import write_results

    strong = [[1] * 18 + [0] * 2, [1] * 17 + [0] * 3, [1] * 19 + [0] * 1][:n_seeds]  # 85-95 %
    weak = [[1] * 8 + [0] * 12, [1] * 9 + [0] * 11, [1] * 7 + [0] * 13][:n_seeds]  # 35-45 %
    results = {"ours": {"zero_shot": [_record([c], s) for s, c in enumerate(strong)]},
               "clip": {"zero_shot": [_record([c], s) for s, c in enumerate(weak)]}}
    cfg = C.load_config(preset="smoke", overrides=[f"eval.pretrain_seeds={list(range(n_seeds))}",
                                                   "eval.bootstrap=200"])
    return write_results(results, cfg, tmp_path, ["zero_shot"])


def test_pairs_table_with_seeds_gives_verdicts(tmp_path):
    paths = _write(tmp_path, 3)
    rows = list(csv.DictReader(open(paths["pairs_csv"])))
    cell = next(r for r in rows if r["column"] == "zero_shot_in_domain")
    assert (cell["a"], cell["b"], cell["verdict"], cell["winner"], cell["seeds"]) == ("ours", "clip", "A > B", "ours", "3")
    assert float(cell["diff"]) == pytest.approx(0.9 - 0.4)
    assert float(cell["ci_low"]) > 0
    held = next(r for r in rows if r["column"] == "zero_shot_held_out_camera")
    assert held["diff"] == "n/a" and held["verdict"] == ""
    md = paths["pairs_md"].read_text()
    assert "**ours > clip**" in md and "unmeasured" not in md
    table = list(csv.DictReader(open(paths["csv"])))
    assert float(table[0]["zero_shot_in_domain_seed_std"]) == pytest.approx(np.std([0.9, 0.85, 0.95], ddof=1))


def test_pairs_table_with_one_seed_says_training_noise_unmeasured(tmp_path):
    paths = _write(tmp_path, 1)
    rows = list(csv.DictReader(open(paths["pairs_csv"])))
    cell = next(r for r in rows if r["column"] == "zero_shot_in_domain")
    assert float(cell["ci_low"]) > 0  # separated over test images ...
    assert cell["verdict"] == "" and cell["winner"] == ""  # ... but one run per method: no verdict
    md = paths["pairs_md"].read_text()
    assert "training noise unmeasured" in md and "ours > clip" not in md
    assert "training noise unmeasured" in paths["md"].read_text()


def test_the_run_record_carries_the_pairs_table(tmp_path):
    from fundus_lab import reproduce as rp

    paths = _write(tmp_path, 2)
    out = rp.write_summary(tmp_path, {"07_results_table": {"state": "ok", "seconds": 1.0}}, "x", 1.0, commit="0" * 40)
    assert (out / "pairs.md").read_text() == paths["pairs_md"].read_text()
    assert (out / "pairs.csv").is_file()
    assert "## Pairs" in (out / "run.md").read_text()


def test_majority_rate_is_the_floor_of_accuracy_on_an_imbalanced_test_set():
    from fundus_lab.eval.metrics import majority_rate

    assert majority_rate([0, 0, 0, 1, 2]) == pytest.approx(0.6)
    assert majority_rate([0, 1, 0, 1]) == pytest.approx(0.5)
    assert majority_rate(np.eye(3)[[0, 0, 1]]) is None  # multi-hot labels: plain accuracy has no majority answer
    # single-label accuracy scores the images with exactly one positive class: the floor is theirs
    multi_hot = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 1], [0, 1, 1]])
    assert majority_rate(multi_hot, "single_label_accuracy") == pytest.approx(2 / 3)
    assert majority_rate([0, 0, 1], "kappa") is None


def test_the_legend_gives_the_majority_class_beside_chance_when_labels_are_imbalanced(tmp_path):
    from fundus_lab.experiment import write_results

    def record(y, seed):
        probs = np.eye(3)[np.zeros(len(y), dtype=int)]  # always the commonest class
        column = {"values": [float(ACC(y, probs))], "probs": [probs], "labels": y, "n_test": len(y)}
        return {"available": True, "task": "multiclass", "metric": "accuracy", "classes": ["n", "a", "b"],
                "dataset": "synth-x", "columns": {"in_domain": column, "held_out_camera": None},
                "json": f"eval/m/seed{seed}/zero_shot.json", "run_dir": f"pretrain/m/seed{seed}"}

    cfg = C.load_config(preset="smoke", overrides=["eval.bootstrap=50"])
    imbalanced = np.array([0] * 14 + [1] * 4 + [2] * 2)
    paths = write_results({"clip": {"zero_shot": [record(imbalanced, 0)]}}, cfg, tmp_path, ["zero_shot"])
    md = paths["md"].read_text()
    assert "Zero-shot 33.3 (majority class of the test labels: 70.0 in-domain)" in md
    assert "| clip | 70.0 [" in md  # the constant answer scores exactly that floor
    balanced = np.array([0, 1, 2] * 6)
    paths = write_results({"clip": {"zero_shot": [record(balanced, 0)]}}, cfg, tmp_path / "b", ["zero_shot"])
    assert "majority class" not in paths["md"].read_text()
