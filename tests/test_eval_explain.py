"""fundus_lab.eval.explain: hand-computed references for attention maps and their scores against
lesion masks, and notebook 02's table (lesion_attention_summary) on a tiny synthetic dataset."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from fundus_lab.eval import explain


def _uniform(n, heads, t):
    return np.full((n, heads, t, t), 1.0 / t)


def test_rollout_of_identity_attention_is_identity():
    eye = np.broadcast_to(np.eye(5), (2, 3, 5, 5))
    r = explain.attention_rollout([eye, eye, eye])
    np.testing.assert_allclose(r, np.broadcast_to(np.eye(5), (2, 5, 5)))


def test_rollout_of_uniform_attention_matches_hand_computation():
    # A = 0.5 U + 0.5 I with U = ones/T (U @ U = U)  =>  A @ A = 0.75 U + 0.25 I
    t = 4
    u = np.ones((t, t)) / t
    r = explain.attention_rollout([_uniform(1, 2, t), _uniform(1, 2, t)])
    np.testing.assert_allclose(r[0], 0.75 * u + 0.25 * np.eye(t))
    np.testing.assert_allclose(r.sum(-1), 1.0)
    # the CLS row over patches is uniform, so the map is flat (all zeros after min-max)
    maps = explain.rollout_maps([_uniform(1, 2, 5)] * 2, (8, 8))
    assert maps.shape == (1, 8, 8) and np.ptp(maps) == 0


def test_rollout_multiplies_later_layers_on_the_left_and_fuses_heads_by_mean():
    rng = np.random.default_rng(0)
    layers = []
    for _ in range(2):
        a = rng.random((1, 2, 3, 3))
        layers.append(a / a.sum(-1, keepdims=True))
    a1, a2 = [0.5 * l.mean(1)[0] + 0.5 * np.eye(3) for l in layers]
    expected = a2 @ a1  # rows already sum to 1
    np.testing.assert_allclose(explain.attention_rollout([torch.tensor(l) for l in layers])[0], expected)


def test_cls_attention_and_grid_are_row_major():
    a = np.zeros((1, 1, 5, 5))
    a[0, 0, 0, 1 + 1] = 1.0  # CLS -> patch index 1 = row 0, column 1 of a 2x2 grid
    grid = explain.tokens_to_grid(explain.cls_attention(a))
    assert grid.shape == (1, 1, 2, 2)
    assert grid[0, 0, 0, 1] == 1.0 and grid.sum() == 1.0


def test_patch_prompt_similarity_is_cosine():
    patches = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-3.0, 0.0]]])  # [1, 4, 2]
    prompts = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    sim = explain.patch_prompt_similarity(patches, prompts)
    assert sim.shape == (1, 2, 2, 2)
    np.testing.assert_allclose(sim[0, 0].ravel(), [1.0, 0.0, 1 / np.sqrt(2), -1.0])
    np.testing.assert_allclose(sim[0, 1].ravel(), [0.0, 1.0, 1 / np.sqrt(2), 0.0])
    with pytest.raises(ValueError, match="same D"):
        explain.patch_prompt_similarity(patches, torch.ones(2, 3))


def test_cross_attention_map_averages_heads_and_tokens():
    a = np.zeros((1, 2, 3, 4))
    a[0, 0, 1, 0] = 1.0
    a[0, 1, 1, 3] = 1.0
    m = explain.cross_attention_map(a, 1)
    np.testing.assert_allclose(m[0], [[0.5, 0.0], [0.0, 0.5]])
    with pytest.raises(ValueError, match="out of range"):
        explain.cross_attention_map(a, 7)


def test_mass_in_mask_and_pointing_game():
    mask = np.zeros((32, 32), dtype=bool)
    mask[4:12, 4:12] = True
    inside = np.zeros((32, 32))
    inside[6:10, 6:10] = 1.0
    assert explain.mass_in_mask(inside, mask) == pytest.approx(1.0)
    assert explain.pointing_game(inside, mask)
    half = inside.copy()
    half[20:24, 20:24] = 1.0
    assert explain.mass_in_mask(half, mask) == pytest.approx(0.5)
    assert explain.mass_in_mask(np.ones((32, 32)), mask) == pytest.approx(mask.mean())
    far = np.zeros((32, 32))
    far[28, 28] = 1.0
    assert not explain.pointing_game(far, mask)
    near = np.zeros((32, 32))
    near[12, 12] = 1.0  # diagonal neighbour of the corner (11, 11): 1.4 px <= round(0.05 * 32) = 2 px
    assert explain.pointing_game(near, mask, tolerance=0.05)
    assert not explain.pointing_game(near, mask, tolerance=0.0)
    # a coarse patch-grid map is resized to the mask before scoring
    grid = np.zeros((4, 4))
    grid[1, 1] = 1.0  # the patch covering pixels 8..15
    patch = np.zeros((32, 32), dtype=bool)
    patch[8:16, 8:16] = True
    assert explain.pointing_game(grid, patch, tolerance=0.0)
    assert explain.mass_in_mask(grid, patch) > 0.5


def test_score_explanations_per_method_and_lesion():
    m1 = np.zeros((16, 16), dtype=bool)
    m1[:8, :8] = True
    m2 = np.zeros((16, 16), dtype=bool)
    m2[8:, 8:] = True
    on_m1 = np.zeros((16, 16))
    on_m1[2, 2] = 1.0
    masks = [{"haemorrhage": m1, "drusen": m2}, {"haemorrhage": m1, "drusen": np.zeros((16, 16), bool)}]
    scores = explain.score_explanations({"good": [on_m1, on_m1], "flat": [np.ones((16, 16))] * 2}, masks)
    assert isinstance(scores, pd.DataFrame) and len(scores) == 8
    good = scores[scores.method == "good"].set_index(["image", "lesion"])
    assert good.loc[(0, "haemorrhage"), "mass_in_mask"] == 1.0
    assert good.loc[(0, "drusen"), "pointing_hit"] == 0.0
    assert np.isnan(good.loc[(1, "drusen"), "mass_in_mask"])  # empty mask kept, not scored
    summary = explain.summarize_explanations(scores)
    assert summary.loc[("good", "haemorrhage"), "mass_in_mask"] == 1.0
    assert summary.loc[("flat", "haemorrhage"), "mass_in_mask"] == pytest.approx(0.25)
    assert summary.loc[("good", "all"), "n"] == 3
    with pytest.raises(ValueError, match="1 maps for 2 images"):
        explain.score_explanations({"x": [on_m1]}, masks)


def test_overall_score_leaves_out_diffuse_masks():
    """A media-opacity mask covers the fundus: any map puts most of its mass there, so the
    ``all`` row averages focal masks only, and the diffuse type keeps its own row."""
    focal = np.zeros((16, 16), dtype=bool)
    focal[:4, :4] = True  # 1/16 of the image
    opacity = np.ones((16, 16), dtype=bool)
    masks = [{"haemorrhage": focal, "media_opacity": opacity}]
    off_lesion = np.zeros((16, 16))
    off_lesion[12, 12] = 1.0  # attends away from the haemorrhage
    summary = explain.summarize_explanations(explain.score_explanations({"m": [off_lesion]}, masks))
    assert summary.loc[("m", "media_opacity"), "mass_in_mask"] == 1.0
    assert summary.loc[("m", "haemorrhage"), "mass_in_mask"] == 0.0
    overall = summary.loc[("m", "all")]
    assert (overall["mass_in_mask"], overall["n"], overall["area_fraction"]) == (0.0, 1, 1 / 16)
    # a threshold above the opacity's share counts it again: the mean of 0 and 1
    assert explain.summarize_explanations(explain.score_explanations({"m": [off_lesion]}, masks),
                                          max_share=1.0).loc[("m", "all"), "mass_in_mask"] == 0.5


def test_bad_attention_names_the_expected_shape():
    with pytest.raises(ValueError, match=r"\[N, heads, T, T\]"):
        explain.attention_rollout([np.ones((2, 3, 4))[None, None]])


def test_explain_imports_no_matplotlib():
    code = "import sys, fundus_lab.eval.explain; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


# ---------------------------------------------------------------------------------------
# notebook 02's table on a tiny synthetic dataset with lesion masks

TINY = dict(
    img_size=32, patch_size=16, vision_width=32, vision_depth=2, vision_heads=2, text_width=32, text_depth=2,
    text_heads=2, text_max_length=32, embed_dim=16, fusion_depth=1, fusion_heads=2, decoder_width=32,
    decoder_depth=1, decoder_heads=2,
)


@pytest.fixture(scope="module")
def odir(tmp_path_factory):
    from fundus_lab.data import open_dataset, synth

    manifest = synth.generate(tmp_path_factory.mktemp("odir"), task="odir", n=24, seed=0, image_size=64, workers=1)
    return open_dataset(manifest, image_size=32, image_cache=False)


@pytest.fixture(scope="module")
def models():
    from fundus_lab.data.tokenizer import train_tokenizer
    from fundus_lab.models import MethodConfig, ModelConfig, build_model

    tok = train_tokenizer(["hard exudates around the macula", "normal fundus"] * 2, vocab_size=120)
    out = {}
    for seed, name in enumerate(["clip", "ours"]):
        torch.manual_seed(seed)
        out[name] = build_model(ModelConfig(**TINY), MethodConfig(name=name), tok).eval()
    return out


def _notebook_02_cell(models, ds, n_score_images, batch=16):
    """Notebook 02's last code cell as it was before lesion_attention_summary existed."""
    with_lesions = [i for i, r in enumerate(ds.records) if any(m.any() for m in explain.load_record_masks(ds, r).values())]
    score_idx = with_lesions[:n_score_images]
    masks = [explain.load_record_masks(ds, ds.records[i]) for i in score_idx]
    mask_size = next(m.shape for ms in masks for m in ms.values())
    maps = {}
    for m, scored_model in models.items():
        for start in range(0, len(score_idx), batch):
            images = torch.stack([ds[i]["image"] for i in score_idx[start:start + batch]])
            for kind, heat in explain.attention_explanations(scored_model, images, mask_size).items():
                maps.setdefault(f"{m}/{kind}", []).extend(heat)
    return explain.summarize_explanations(explain.score_explanations(maps, masks)), score_idx


def test_lesion_attention_summary_equals_the_notebook_cell(odir, models):
    lesions = explain.lesion_images(odir)
    assert len(lesions) >= 4, "the tiny synthetic ODIR set should have several images with lesions"
    assert any(not explain.load_record_masks(odir, r) or not any(m.any() for m in explain.load_record_masks(odir, r).values())
               for r in odir.records), "some records without lesions, so the picking is tested"
    expected, picked = _notebook_02_cell(models, odir, 5, batch=2)
    assert picked == lesions[:5]
    got = explain.lesion_attention_summary(models, odir, n_images=5, batch_size=2)
    pd.testing.assert_frame_equal(got, expected)
    assert {"clip/rollout", "clip/last_layer", "ours/rollout", "ours/last_layer"} == set(got.index.get_level_values("method"))
    assert (got.xs("all", level="lesion")["n"] > 0).all()
    # fewer images scored: a different table (the n_images cut is real)
    fewer = explain.lesion_attention_summary(models, odir, n_images=2, batch_size=16)
    assert fewer.xs("all", level="lesion")["n"].sum() < got.xs("all", level="lesion")["n"].sum()


def test_lesion_attention_summary_needs_lesions(odir, models):
    class NoMasks:
        root = "/data/plain"
        records = [type("R", (), {"meta": {}, "path": "a.png"})()]

    assert explain.lesion_images(NoMasks()) == []
    with pytest.raises(ValueError, match=r"/data/plain.*lesion mask"):
        explain.lesion_attention_summary(models, NoMasks())
    with pytest.raises(ValueError, match=r"n_images=0"):
        explain.lesion_attention_summary(models, odir, n_images=0)
