"""Zero-shot on planted embeddings: predictions and probabilities worked out by hand."""

import numpy as np
import pytest
import torch

from fundus_lab.eval import features, zero_shot
from fundus_lab.eval.zero_shot import ZeroShotUnavailable, class_embeddings, resolve_prompts
from doubles import ImageOnlyModel, PlantedModel, ToyDataset

E = np.eye(3)
CLASSES = ["red", "green", "blue"]
# two prompts per class that straddle the class axis: their mean is exactly e_c
PROMPTS = [[f"{c} a", f"{c} b"] for c in CLASSES]
VECTORS = {}
for i, c in enumerate(CLASSES):
    VECTORS[f"{c} a"] = E[i] + 0.6 * E[(i + 1) % 3]
    VECTORS[f"{c} b"] = E[i] - 0.6 * E[(i + 1) % 3]


@pytest.fixture(autouse=True)
def _fresh_cache():
    features.clear_cache()


def test_prompt_ensemble_is_normalised_mean():
    model = PlantedModel(E, VECTORS)
    emb = class_embeddings(model, PROMPTS).numpy()
    np.testing.assert_allclose(emb, E, atol=1e-6)
    # one prompt alone is off-axis; the ensemble of a and b is not
    single = class_embeddings(model, [["red a"]]).numpy()[0]
    np.testing.assert_allclose(single, (E[0] + 0.6 * E[1]) / np.sqrt(1.36), atol=1e-6)


def test_multiclass_predictions_and_probabilities_by_hand():
    labels = np.array([0, 1, 2, 2, 1, 0, 0])
    ds = ToyDataset(labels, CLASSES, noise=0.0, prompts=PROMPTS)
    model = PlantedModel(E, VECTORS, scale=10.0)
    out = zero_shot(model, ds)
    # image of class c: rgb = 0.2 + 0.6 e_c; cos with e_j = rgb_j / |rgb|
    rgb = 0.2 + 0.6 * E[labels]
    logits = 10.0 * rgb / np.linalg.norm(rgb, axis=1, keepdims=True)
    expected = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(out["probs"], expected, atol=1e-5)
    assert out["probs"].argmax(1).tolist() == labels.tolist()
    assert out["metrics"]["accuracy"] == 1.0
    np.testing.assert_array_equal(out["labels"], labels)


def test_user_prompts_swap_the_predictions():
    labels = np.array([0, 1, 2])
    ds = ToyDataset(labels, CLASSES, noise=0.0, prompts=PROMPTS)
    model = PlantedModel(E, VECTORS)
    swapped = {"red": ["green a", "green b"], "green": ["red a", "red b"], "blue": ["blue a"]}
    out = zero_shot(model, ds, prompts=swapped)
    assert out["probs"].argmax(1).tolist() == [1, 0, 2]
    as_list = zero_shot(model, ds, prompts=[["green a", "green b"], ["red a", "red b"], ["blue a"]])
    np.testing.assert_allclose(as_list["probs"], out["probs"])


def test_bad_prompts_name_the_problem():
    ds = ToyDataset([0, 1, 2], CLASSES, prompts=PROMPTS)
    with pytest.raises(ValueError, match=r"no entry for classes \['blue'\]"):
        resolve_prompts(ds, {"red": ["x"], "green": ["y"]})
    with pytest.raises(ValueError, match="2 prompt lists for 3 classes"):
        resolve_prompts(ds, [["x"], ["y"]])
    with pytest.raises(ValueError, match="'purple'"):
        resolve_prompts(ds, {"red": ["x"], "green": ["y"], "blue": ["z"], "purple": ["w"]})


def test_multilabel_negation_scoring_contrasts_no_class_prompts():
    labels = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 0]])
    ds = ToyDataset(labels, CLASSES, task="multilabel", noise=0.0, prompts=PROMPTS)
    vectors = dict(VECTORS)
    neutral = np.ones(3) / np.sqrt(3)
    for c in CLASSES:  # every "no <class>" prompt points at the neutral grey direction
        for p in (f"no {c} a", f"a fundus photograph without {c} a", f"no signs of {c} a"):
            vectors[p] = neutral
    model = PlantedModel(E, vectors, scale=10.0)
    out = zero_shot(model, ds, multilabel_scoring="negation")
    rgb = 0.2 + 0.6 * labels
    x = rgb / np.linalg.norm(rgb, axis=1, keepdims=True)
    expected = 1 / (1 + np.exp(-10.0 * (x - x @ neutral[:, None])))
    np.testing.assert_allclose(out["probs"], expected, atol=1e-5)
    m = out["metrics"]
    assert m["auc"] == 1.0  # every positive outscores every negative, per class
    assert m["single_label_n"] == 4
    assert m["single_label_accuracy"] == 1.0
    assert {"odir_score", "macro_f1", "auc_per_class"} <= set(m)


def test_image_only_model_has_no_zero_shot():
    ds = ToyDataset([0, 1, 2], CLASSES, prompts=PROMPTS)
    with pytest.raises(ZeroShotUnavailable, match="no text encoder"):
        zero_shot(ImageOnlyModel(E), ds)


def test_features_are_cached_until_the_weights_change(tmp_path):
    ds = ToyDataset([0, 1, 2, 1], CLASSES, prompts=PROMPTS)
    model = PlantedModel(E, VECTORS)
    calls = []
    original = model.encode_image
    model.encode_image = lambda x: calls.append(len(x)) or original(x)
    f1, _ = features.extract_features(model, ds, batch_size=3, cache_dir=tmp_path)
    f2, _ = features.extract_features(model, ds, batch_size=3, cache_dir=tmp_path)
    assert calls == [3, 1]  # batched, and the second call came from the cache
    np.testing.assert_array_equal(f1, f2)
    features.clear_cache()
    features.extract_features(model, ds, batch_size=3, cache_dir=tmp_path)
    assert calls == [3, 1]  # from the disk cache
    with torch.no_grad():
        model.image_map.mul_(2.0)
    features.extract_features(model, ds, batch_size=3, cache_dir=tmp_path)
    assert calls == [3, 1, 3, 1]  # new weights, new features


def test_multilabel_default_scoring_is_the_softmax_over_class_prompts():
    """CLIP/FLAIR scoring: per-class probabilities are the softmax over the class prompts,
    so a text tower that never saw "no <class>" cannot invert a class's ranking."""
    labels = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 0]])
    ds = ToyDataset(labels, CLASSES, task="multilabel", noise=0.0, prompts=PROMPTS)
    model = PlantedModel(E, dict(VECTORS), scale=10.0)
    out = zero_shot(model, ds)
    np.testing.assert_allclose(out["probs"].sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(out["probs"], torch.softmax(torch.as_tensor(out["logits"]), -1).numpy(), atol=1e-6)
    assert out["metrics"]["auc"] == 1.0 and out["metrics"]["single_label_accuracy"] == 1.0
    with pytest.raises(ValueError, match="multilabel_scoring"):
        zero_shot(model, ds, multilabel_scoring="sigmoid")
