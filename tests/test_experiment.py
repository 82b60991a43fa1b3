"""The experiment layer's small parts: registries, the Table 1 cell statistics, the pixel
reference and the table formatting of CIs (fast; the end to end runs are in
test_eval_compare.py and test_reproduce.py)."""

import math

import numpy as np
import pytest
import torch

from fundus_lab import experiment as ex
from fundus_lab.eval import metrics as M
from fundus_lab.eval.tables import format_cell, long_format, write_table


def test_every_protocol_names_a_dataset_and_settings_of_the_eval_section():
    from fundus_lab.config import EvalConfig

    fields = set(EvalConfig.__dataclass_fields__)
    for name, p in ex.PROTOCOLS.items():
        assert p.name == name and p.dataset_key in fields and set(p.settings) <= fields, name
    for ref in ex.REFERENCES.values():
        assert set(ref.protocols) <= set(ex.PROTOCOLS)
    assert "zero_shot" not in ex.REFERENCES.get("supervised").protocols  # no trained text tower
    assert set(ex.REFERENCES.get("pixels").protocols) == {"linear_probe", "linear_probe_full"}  # no blocks to fine-tune
    assert [c for c, _, _ in ex.COLUMNS] == ["in_domain", "held_out_camera"]


def test_bootstrap_cell_brackets_the_mean_and_is_repeatable():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    probs = [np.eye(4)[np.where(rng.random(200) < 0.7, y, rng.integers(0, 4, 200))] for _ in range(3)]
    acc = float(np.mean([(p.argmax(1) == y).mean() for p in probs]))
    lo, hi = M.bootstrap_cell("multiclass", "accuracy", 4, y, probs, n=200)
    assert lo < acc < hi and hi - lo < 0.2
    assert [lo, hi] == M.bootstrap_cell("multiclass", "accuracy", 4, y, probs, n=200)
    assert all(math.isnan(v) for v in M.bootstrap_cell("multiclass", "accuracy", 4, y, [], n=10))


def test_single_label_accuracy_and_chance_levels():
    y = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 1]])
    p = np.array([[0.9, 0.05, 0.05], [0.1, 0.1, 0.8], [0.6, 0.2, 0.2]])
    assert M.metric_fn("multilabel", "single_label_accuracy", 3)(y, p) == 0.5  # rows 0 and 2 only
    assert M.chance_level("accuracy", 8) == 0.125 and M.chance_level("kappa", 5) == 0.0
    assert M.chance_level("auc", 2) == 0.5
    with pytest.raises(ValueError, match="kappa"):
        M.metric_fn("multiclass", "kappa", 3)


def test_pixel_features_are_downsampled_pixels_with_a_fingerprint():
    from fundus_lab.eval.features import model_fingerprint
    from fundus_lab.eval.zero_shot import has_text_encoder

    m = ex.PixelFeatures(side=4)
    x = torch.rand(2, 3, 32, 32)
    cls = m.image_features(x)["cls"]
    assert cls.shape == (2, 48)
    assert torch.allclose(cls[0, :16].reshape(4, 4)[0, 0], x[0, 0, :8, :8].mean())
    assert torch.allclose(m.encode_image(x).norm(dim=-1), torch.ones(2))
    assert not has_text_encoder(m)
    assert model_fingerprint(m) != model_fingerprint(ex.PixelFeatures(side=8))


def test_table_cells_show_ci_and_seed_spread(tmp_path):
    cell = {"mean": 0.5, "std": 0.1, "n": 4, "ci": [0.42, 0.58], "seed_std": None}
    assert format_cell(cell) == "50.0 [42.0, 58.0]"
    assert format_cell({**cell, "seed_std": 0.02}) == "50.0 [42.0, 58.0] ± 2.0"
    assert format_cell({"mean": 0.5, "std": 0.1, "n": 2}) == "50.0 ± 10.0"  # no CI: the old form
    rows = [{"method": "a", "p_in": cell, "p_out": None}, {"method": "b", "p_in": {**cell, "mean": 0.6}, "p_out": None}]
    paths = write_table(rows, tmp_path, [("p_in", "P, in-domain"), ("p_out", "P, held-out camera")],
                        notes=["Chance level: P 25.0."])
    md = paths["md"].read_text()
    assert "| a | 50.0 [42.0, 58.0] | n/a |" in md and "**60.0 [42.0, 58.0]**" in md
    assert md.rstrip().endswith("Chance level: P 25.0.")
    assert "Chance level" in paths["tex"].read_text()
    header = paths["csv"].read_text().splitlines()[0]
    assert "p_in_ci_low" in header and "p_out_seed_std" in header
    long = long_format(paths["csv"], {"p_in": "P, in-domain"})
    assert list(long["column"][:2]) == ["P, in-domain", "p_out"]
    assert long["ci_low"][0] == pytest.approx(0.42) and math.isnan(long["mean"][1])


def test_fine_tune_is_na_for_an_image_tower_without_blocks():
    """An outside model whose tower has no transformer blocks (a ResNet open_clip) gets n/a,
    not a crash in the layer-wise lr decay."""
    from fundus_lab import config as C
    from doubles import PlantedModel, ToyDataset

    ds = ToyDataset(np.array([0, 1, 2]), ["r", "g", "b"])
    fit = ex.PROTOCOLS.get("fine_tune").run(PlantedModel(np.eye(3), {}), {"train": ds, "val": ds, "tests": {"in_domain": ds}},
                                              C.load_config(), None)
    assert not fit.available and "no transformer blocks" in fit.result["reason"]
