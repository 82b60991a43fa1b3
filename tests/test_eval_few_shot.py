"""Few-shot sampling (stratified, sized, repeatable), probes and the honesty rules."""

import numpy as np
import pytest

from fundus_lab.eval import LeakageError, features, few_shot, linear_probe, sample_few_shot
from fundus_lab.eval.honesty import assert_disjoint, write_split_file
from doubles import ImageOnlyModel, PlantedModel, ToyDataset

E = np.eye(3)
CLASSES = ["red", "green", "blue"]
PROMPTS = [[c] for c in CLASSES]
VECTORS = {c: E[i] for i, c in enumerate(CLASSES)}


@pytest.fixture(autouse=True)
def _fresh_cache():
    features.clear_cache()


def test_sampling_is_stratified_sized_and_repeatable():
    labels = np.repeat([0, 1, 2, 3], [10, 20, 30, 40])
    for k in (1, 4, 8):
        idx = sample_few_shot(labels, k, seed=3)
        assert len(idx) == 4 * k
        assert np.bincount(labels[idx], minlength=4).tolist() == [k] * 4
        np.testing.assert_array_equal(idx, sample_few_shot(labels, k, seed=3))
    assert not np.array_equal(sample_few_shot(labels, 4, 0), sample_few_shot(labels, 4, 1))
    first = sample_few_shot(labels, 4, 0)
    other = sample_few_shot(labels, 4, 0, exclude=first)
    assert not set(first) & set(other)
    with pytest.warns(UserWarning, match="fewer than k=12"):
        idx = sample_few_shot(labels, 12, 0)
    assert np.bincount(labels[idx]).tolist() == [10, 12, 12, 12]


def test_multilabel_sampling_gives_k_positives_per_class():
    rng = np.random.default_rng(0)
    labels = (rng.random((200, 5)) < 0.3).astype(int)
    idx = sample_few_shot(labels, 4, seed=1)
    assert (labels[idx].sum(0) >= 4).all()
    assert len(idx) <= 20
    np.testing.assert_array_equal(idx, sample_few_shot(labels, 4, seed=1))


def _splits(n_train=60, n_val=30, n_test=45, noise=0.15):
    rng = np.random.default_rng(0)
    make = lambda n, split, seed: ToyDataset(rng.integers(0, 3, n), CLASSES, noise=noise, seed=seed,  # noqa: E731
                                             prompts=PROMPTS, split=split)
    return make(n_train, "train", 1), make(n_val, "val", 2), make(n_test, "test", 3)


@pytest.mark.slow  # 38 s in a full unit run on the 2-core CPU
def test_few_shot_probe_and_prompt_head_learn_the_colours():
    train, val, test = _splits()
    model = PlantedModel(E, VECTORS)
    out = few_shot(model, train, test, shots=(1, 4), seeds=3, val_ds=val)
    assert set(out["shots"]) == {1, 4}
    res = out["shots"][4]
    assert res["probe"]["n_seeds"] == 3 and len(res["probe"]["runs"]) == 3
    assert res["probe"]["mean"]["accuracy"] > 0.9
    assert res["prompt_head"]["mean"]["accuracy"] > 0.9
    for run in res["probe"]["runs"]:
        assert len(run["shots"]) == 12
        assert np.bincount(train.labels[run["shots"]], minlength=3).tolist() == [4, 4, 4]
        assert np.bincount(val.labels[run["val"]], minlength=3).tolist() == [4, 4, 4]
    std = res["probe"]["std"]["accuracy"]
    accs = [r["metrics"]["accuracy"] for r in res["probe"]["runs"]]
    assert std == pytest.approx(np.std(accs))


def test_few_shot_validation_comes_from_train_when_no_val_set():
    train, _, test = _splits(n_train=90)
    out = few_shot(PlantedModel(E, VECTORS), train, test, shots=(2,), seeds=2)
    for run in out["shots"][2]["probe"]["runs"]:
        assert not set(run["shots"]) & set(run["val"])


@pytest.mark.slow  # 37 s in a full unit run on the 2-core CPU
def test_choices_never_look_at_test_labels():
    """C and lambda are chosen on validation data: scrambling the test labels changes the
    scores but not a single choice."""
    train, val, test = _splits()
    scrambled = ToyDataset(np.roll(test.labels, 1), CLASSES, noise=0.15, seed=3, prompts=PROMPTS, split="test")
    scrambled.images = test.images
    model = PlantedModel(E, VECTORS)
    a = few_shot(model, train, test, shots=(2,), seeds=2, val_ds=val)["shots"][2]
    b = few_shot(model, train, scrambled, shots=(2,), seeds=2, val_ds=val)["shots"][2]
    assert [r["C"] for r in a["probe"]["runs"]] == [r["C"] for r in b["probe"]["runs"]]
    assert [r["lambda"] for r in a["prompt_head"]["runs"]] == [r["lambda"] for r in b["prompt_head"]["runs"]]
    assert a["probe"]["mean"]["accuracy"] != b["probe"]["mean"]["accuracy"]


def test_image_only_model_gets_probe_but_no_prompt_head():
    train, val, test = _splits()
    out = few_shot(ImageOnlyModel(E), train, test, shots=(2,), seeds=1, val_ds=val)
    assert out["shots"][2]["prompt_head"] is None
    assert out["shots"][2]["probe"]["mean"]["accuracy"] > 0.8


def test_linear_probe_on_full_split():
    train, val, test = _splits()
    out = linear_probe(PlantedModel(E, VECTORS), train, test, val_ds=val)
    assert out["metrics"]["accuracy"] > 0.9
    assert out["probs"].shape == (len(test), 3)
    np.testing.assert_allclose(out["probs"].sum(1), 1.0, rtol=1e-6)


def test_shared_patient_is_refused(tmp_path):
    train = ToyDataset([0, 1, 2, 0], CLASSES, patients=["a", "b", "c", "d"], split="train")
    test = ToyDataset([0, 1, 2], CLASSES, patients=["x", "c", "y"], split="test")
    with pytest.raises(LeakageError, match="patient:c"):
        assert_disjoint(train, test)
    with pytest.raises(LeakageError):
        few_shot(PlantedModel(E, VECTORS), train, test, shots=(1,), seeds=1)
    # the same ids in a different dataset folder are different people
    other = ToyDataset([0, 1, 2], CLASSES, patients=["x", "c", "y"], root="/elsewhere", split="test")
    assert_disjoint(train, other)
    digest = write_split_file(train, tmp_path / "train.csv")
    lines = (tmp_path / "train.csv").read_text().splitlines()
    assert lines[0] == "index,image,patient_id,eye,split,label" and len(lines) == 5
    assert digest == write_split_file(train, tmp_path / "again.csv")


def test_few_shot_progress_bar_counts_seed_runs_and_can_be_switched_off(capsys):
    train, val, test = _splits()
    few_shot(PlantedModel(E, VECTORS), train, test, shots=(1, 2), seeds=2, val_ds=val, head_steps=2, progress=False)
    assert "few-shot seeds" not in capsys.readouterr().err
    features.clear_cache()
    few_shot(PlantedModel(E, VECTORS), train, test, shots=(1, 2), seeds=2, val_ds=val, head_steps=2)
    err = capsys.readouterr().err
    assert "few-shot seeds" in err and "0/4 [" in err  # 2 shot counts x 2 seeds
    assert "features train" in err  # the extraction bars, passed on
