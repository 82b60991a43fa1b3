"""fundus_lab.viz and fundus_lab.model_viz on synthetic arrays: reconstruction helpers and figures on disk
(the explanation maps and scores they draw are tested in test_eval_explain.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from fundus_lab import model_viz, viz
from fundus_lab.eval import explain


def test_mask_to_pixels_and_paste_visible():
    mask = np.array([[0, 1, 1, 0]])  # 2x2 grid of 4-px patches, patches 1 and 2 removed
    pix = model_viz.mask_to_pixels(mask, 4, (8, 8))[0]
    assert pix[:4, 4:].all() and pix[4:, :4].all() and not pix[:4, :4].any() and not pix[4:, 4:].any()
    orig, pred = np.zeros((3, 8, 8)), np.ones((3, 8, 8))
    pasted = model_viz.paste_visible(orig, pred, pix)
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
    model_viz.plot_attention(images, attn, out_dir=tmp_path, name="attention")
    model_viz.plot_cross_attention(images, rng.random((2, 2, 3, 16)), ["[CLS]", "drusen", "macula"], [1, 2], out_dir=tmp_path, name="xattn")
    sim = explain.patch_prompt_similarity(rng.normal(size=(1, 16, 4)), rng.normal(size=(2, 4)))[0]
    model_viz.plot_prompt_similarity(images[0], sim, ["normal", "drusen"], probs=[0.3, 0.7], out_dir=tmp_path, name="prompts")
    mask = (rng.random((2, 4)) > 0.5).astype(float)
    model_viz.plot_reconstruction(images, {0.5: {"pred_images": torch.rand(2, 3, 32, 32), "mask": mask}}, 16, out_dir=tmp_path, name="recon")
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


def test_shot_curves_facet_one_panel_per_head_same_colour_per_method_one_legend():
    rows = [{"model": m, "head": h, "k": k, "mean": 0.5 + 0.01 * k, "std": 0.02, "metric": "accuracy"}
            for h in ("fine-tune", "probe") for m in ("clip", "ours") for k in (1, 2, 4)]
    fig = viz.plot_shot_curves(pd.DataFrame(rows), hue="model", facet="head")
    panels = [ax for ax in fig.axes if ax.has_data()]
    assert [ax.get_title() for ax in panels] == ["fine-tune", "probe"]
    colours = [[line.get_color() for line in ax.get_lines() if line.get_marker() == "o"] for ax in panels]
    assert colours[0] == colours[1] and len(set(colours[0])) == 2  # clip and ours keep their colour across panels
    assert len(fig.legends) == 1 and [t.get_text() for t in fig.legends[0].get_texts()] == ["clip", "ours"]
    assert all(ax.get_legend() is None for ax in panels)
    with pytest.raises(ValueError, match="head"):
        viz.plot_shot_curves(pd.DataFrame(rows).drop(columns="head"), hue="model", facet="head")
