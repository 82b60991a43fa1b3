"""fundus_lab.viz on synthetic arrays: hand-computed references for maps and scores, figures on disk."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from fundus_lab import viz


def _uniform(n, heads, t):
    return np.full((n, heads, t, t), 1.0 / t)


def test_rollout_of_identity_attention_is_identity():
    eye = np.broadcast_to(np.eye(5), (2, 3, 5, 5))
    r = viz.attention_rollout([eye, eye, eye])
    np.testing.assert_allclose(r, np.broadcast_to(np.eye(5), (2, 5, 5)))


def test_rollout_of_uniform_attention_matches_hand_computation():
    # A = 0.5 U + 0.5 I with U = ones/T (U @ U = U)  =>  A @ A = 0.75 U + 0.25 I
    t = 4
    u = np.ones((t, t)) / t
    r = viz.attention_rollout([_uniform(1, 2, t), _uniform(1, 2, t)])
    np.testing.assert_allclose(r[0], 0.75 * u + 0.25 * np.eye(t))
    np.testing.assert_allclose(r.sum(-1), 1.0)
    # the CLS row over patches is uniform, so the map is flat (all zeros after min-max)
    maps = viz.rollout_maps([_uniform(1, 2, 5)] * 2, (8, 8))
    assert maps.shape == (1, 8, 8) and np.ptp(maps) == 0


def test_rollout_multiplies_later_layers_on_the_left_and_fuses_heads_by_mean():
    rng = np.random.default_rng(0)
    layers = []
    for _ in range(2):
        a = rng.random((1, 2, 3, 3))
        layers.append(a / a.sum(-1, keepdims=True))
    a1, a2 = [0.5 * l.mean(1)[0] + 0.5 * np.eye(3) for l in layers]
    expected = a2 @ a1  # rows already sum to 1
    np.testing.assert_allclose(viz.attention_rollout([torch.tensor(l) for l in layers])[0], expected)


def test_cls_attention_and_grid_are_row_major():
    a = np.zeros((1, 1, 5, 5))
    a[0, 0, 0, 1 + 1] = 1.0  # CLS -> patch index 1 = row 0, column 1 of a 2x2 grid
    grid = viz.tokens_to_grid(viz.cls_attention(a))
    assert grid.shape == (1, 1, 2, 2)
    assert grid[0, 0, 0, 1] == 1.0 and grid.sum() == 1.0


def test_patch_prompt_similarity_is_cosine():
    patches = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-3.0, 0.0]]])  # [1, 4, 2]
    prompts = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    sim = viz.patch_prompt_similarity(patches, prompts)
    assert sim.shape == (1, 2, 2, 2)
    np.testing.assert_allclose(sim[0, 0].ravel(), [1.0, 0.0, 1 / np.sqrt(2), -1.0])
    np.testing.assert_allclose(sim[0, 1].ravel(), [0.0, 1.0, 1 / np.sqrt(2), 0.0])
    with pytest.raises(ValueError, match="same D"):
        viz.patch_prompt_similarity(patches, torch.ones(2, 3))


def test_cross_attention_map_averages_heads_and_tokens():
    a = np.zeros((1, 2, 3, 4))
    a[0, 0, 1, 0] = 1.0
    a[0, 1, 1, 3] = 1.0
    m = viz.cross_attention_map(a, 1)
    np.testing.assert_allclose(m[0], [[0.5, 0.0], [0.0, 0.5]])
    with pytest.raises(ValueError, match="out of range"):
        viz.cross_attention_map(a, 7)


def test_mass_in_mask_and_pointing_game():
    mask = np.zeros((32, 32), dtype=bool)
    mask[4:12, 4:12] = True
    inside = np.zeros((32, 32))
    inside[6:10, 6:10] = 1.0
    assert viz.mass_in_mask(inside, mask) == pytest.approx(1.0)
    assert viz.pointing_game(inside, mask)
    half = inside.copy()
    half[20:24, 20:24] = 1.0
    assert viz.mass_in_mask(half, mask) == pytest.approx(0.5)
    assert viz.mass_in_mask(np.ones((32, 32)), mask) == pytest.approx(mask.mean())
    far = np.zeros((32, 32))
    far[28, 28] = 1.0
    assert not viz.pointing_game(far, mask)
    near = np.zeros((32, 32))
    near[12, 12] = 1.0  # diagonal neighbour of the corner (11, 11): 1.4 px <= round(0.05 * 32) = 2 px
    assert viz.pointing_game(near, mask, tolerance=0.05)
    assert not viz.pointing_game(near, mask, tolerance=0.0)
    # a coarse patch-grid map is resized to the mask before scoring
    grid = np.zeros((4, 4))
    grid[1, 1] = 1.0  # the patch covering pixels 8..15
    patch = np.zeros((32, 32), dtype=bool)
    patch[8:16, 8:16] = True
    assert viz.pointing_game(grid, patch, tolerance=0.0)
    assert viz.mass_in_mask(grid, patch) > 0.5


def test_score_explanations_per_method_and_lesion():
    m1 = np.zeros((16, 16), dtype=bool)
    m1[:8, :8] = True
    m2 = np.zeros((16, 16), dtype=bool)
    m2[8:, 8:] = True
    on_m1 = np.zeros((16, 16))
    on_m1[2, 2] = 1.0
    masks = [{"haemorrhage": m1, "drusen": m2}, {"haemorrhage": m1, "drusen": np.zeros((16, 16), bool)}]
    scores = viz.score_explanations({"good": [on_m1, on_m1], "flat": [np.ones((16, 16))] * 2}, masks)
    assert isinstance(scores, pd.DataFrame) and len(scores) == 8
    good = scores[scores.method == "good"].set_index(["image", "lesion"])
    assert good.loc[(0, "haemorrhage"), "mass_in_mask"] == 1.0
    assert good.loc[(0, "drusen"), "pointing_hit"] == 0.0
    assert np.isnan(good.loc[(1, "drusen"), "mass_in_mask"])  # empty mask kept, not scored
    summary = viz.summarize_explanations(scores)
    assert summary.loc[("good", "haemorrhage"), "mass_in_mask"] == 1.0
    assert summary.loc[("flat", "haemorrhage"), "mass_in_mask"] == pytest.approx(0.25)
    assert summary.loc[("good", "all"), "n"] == 3
    with pytest.raises(ValueError, match="1 maps for 2 images"):
        viz.score_explanations({"x": [on_m1]}, masks)


def test_mask_to_pixels_and_paste_visible():
    mask = np.array([[0, 1, 1, 0]])  # 2x2 grid of 4-px patches, patches 1 and 2 removed
    pix = viz.mask_to_pixels(mask, 4, (8, 8))[0]
    assert pix[:4, 4:].all() and pix[4:, :4].all() and not pix[:4, :4].any() and not pix[4:, 4:].any()
    orig, pred = np.zeros((3, 8, 8)), np.ones((3, 8, 8))
    pasted = viz.paste_visible(orig, pred, pix)
    np.testing.assert_array_equal(pasted[..., 0], pix)


def test_umap_works_with_few_points():
    rng = np.random.default_rng(0)
    xy = viz.umap_embed(rng.normal(size=(6, 8)), n_neighbors=15)
    assert xy.shape == (6, 2) and np.isfinite(xy).all()
    with pytest.raises(ValueError, match="N >= 3"):
        viz.umap_embed(rng.normal(size=(2, 8)))


def _assert_saved(out, name):
    for ext in ("png", "svg"):
        path = out / f"{name}.{ext}"
        assert path.is_file() and path.stat().st_size > 500, path
    assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert b"<svg" in (out / f"{name}.svg").read_bytes()[:2000]


def test_figures_save_png_and_svg(tmp_path):
    rng = np.random.default_rng(0)
    images = torch.rand(2, 3, 32, 32)
    attn = []
    for _ in range(2):
        a = rng.random((2, 2, 17, 17))
        attn.append(a / a.sum(-1, keepdims=True))
    viz.plot_attention(images, attn, out_dir=tmp_path, name="attention")
    viz.plot_cross_attention(images, rng.random((2, 2, 3, 16)), ["[CLS]", "drusen", "macula"], [1, 2], out_dir=tmp_path, name="xattn")
    sim = viz.patch_prompt_similarity(rng.normal(size=(1, 16, 4)), rng.normal(size=(2, 4)))[0]
    viz.plot_prompt_similarity(images[0], sim, ["normal", "drusen"], probs=[0.3, 0.7], out_dir=tmp_path, name="prompts")
    mask = (rng.random((2, 4)) > 0.5).astype(float)
    viz.plot_reconstruction(images, {0.5: {"pred_images": torch.rand(2, 3, 32, 32), "mask": mask}}, 16, out_dir=tmp_path, name="recon")
    emb = {"clip": {"image": rng.normal(size=(6, 4)), "text": rng.normal(size=(6, 4))}, "mae": {"image": rng.normal(size=(6, 4))}}
    meta = {"disease": list("aabbcc"), "camera": list("xyxyxy"), "split": ["train"] * 6}
    viz.plot_embeddings(emb, meta, out_dir=tmp_path, name="umap")
    metrics = pd.DataFrame({"step": [1, 2, 3], "loss": [3.0, 2.0, 1.5], "contrastive_loss": [2.0, 1.5, 1.0], "lr": [1e-4, 2e-4, 1e-4]})
    csv = tmp_path / "metrics.csv"
    metrics.to_csv(csv, index=False)
    viz.plot_training_curves(csv, out_dir=tmp_path, name="curves")
    viz.plot_confusion_matrix([0, 1, 1, 2], [0, 1, 2, 2], ["N", "D", "G"], out_dir=tmp_path, name="cm")
    viz.plot_per_class({"N": 0.9, "D": 0.5}, metric="AUC", out_dir=tmp_path, name="per_class")
    table = pd.DataFrame(
        {"method": ["clip", "ours"] * 2, "protocol": ["zero_shot"] * 2 + ["fine_tune"] * 2, "mean": [0.6, 0.7, 0.8, 0.85], "std": [0.02, 0.03, 0.01, 0.01]}
    )
    viz.plot_comparison(table, out_dir=tmp_path, name="table1")
    for name in ["attention", "xattn", "prompts", "recon", "umap", "curves", "cm", "per_class", "table1"]:
        _assert_saved(tmp_path, name)


def test_shot_curves_name_the_metric_and_save(tmp_path):
    table = pd.DataFrame({"method": ["clip"] * 2 + ["ours"] * 2, "k": [1, 16] * 2, "metric": "accuracy",
                          "mean": [0.3, 0.5, 0.35, 0.6], "std": [0.05, 0.02, 0.04, 0.01]})
    fig = viz.plot_shot_curves(table, out_dir=tmp_path, name="shots")
    ax = fig.axes[0]
    assert ax.get_ylabel() == "accuracy (mean over seeds)"
    assert ax.get_legend_handles_labels()[1] == ["clip", "ours"]
    assert list(ax.containers[1].lines[0].get_ydata()) == [0.35, 0.6]
    _assert_saved(tmp_path, "shots")
    with pytest.raises(ValueError, match=r"no column\(s\) \['k'\]"):
        viz.plot_shot_curves(table.drop(columns="k"))


def test_bad_inputs_name_what_was_expected(tmp_path):
    with pytest.raises(ValueError, match=r"\[N, heads, T, T\]"):
        viz.attention_rollout([np.ones((2, 3, 4))[None, None]])
    with pytest.raises(ValueError, match="no column"):
        viz.plot_training_curves(pd.DataFrame({"epoch": [1]}))
    with pytest.raises(ValueError, match="no column"):
        viz.plot_comparison(pd.DataFrame({"method": ["a"], "mean": [1.0]}))


def test_live_loss_plot_collects_history_headless():
    cb = viz.LiveLossPlot()
    cb(1, {"loss": torch.tensor(2.0), "note": "x"})
    cb(2, {"loss": 1.0})
    assert cb.history == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]
    assert cb.figure() is not None
