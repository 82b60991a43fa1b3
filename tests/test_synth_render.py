"""The synthetic fundus renderer: anatomy, laterality, lesions per grade/disease, cameras."""

import numpy as np
import pytest

from fundus_lab import knowledge
from fundus_lab.data.synth import EyeLabels, render_eye, render_fundus
from fundus_lab.data.synth.anatomy import Frame
from fundus_lab.data.synth.vessels import rasterize

SIZE = 96
TRAIN_CAMS = ["topcon", "canon", "zeiss", "kowa"]


def rng(i):
    return np.random.default_rng(i)


def quadrants_of_mask(r, mask):
    """Which retinal quadrants a mask touches, from pixel positions only: superior is
    above the fovea, temporal is on the side away from the disc."""
    ys, xs = np.nonzero(mask)
    fx, fy = r.frame.to_px(*r.anatomy.fovea)
    dx_disc = np.nonzero(r.disc_mask)[1].mean() - fx
    temporal = np.sign(xs - fx) != np.sign(dx_disc)
    sup = ys < fy
    names = set()
    for s, t, name in [(1, 1, "ST"), (0, 1, "IT"), (1, 0, "SN"), (0, 0, "IN")]:
        if ((sup == bool(s)) & (temporal == bool(t))).any():
            names.add(name)
    return names


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("eye", ["right", "left"])
def test_disc_is_nasal_by_laterality(seed, eye):
    r = render_eye(rng(seed), EyeLabels(), TRAIN_CAMS[seed], SIZE, eye)
    cx = np.nonzero(r.disc_mask)[1].mean()
    centre = (SIZE - 1) / 2
    if eye == "right":
        assert cx > centre + 0.15 * SIZE
    else:
        assert cx < centre - 0.15 * SIZE
    # the fovea sits about 2.5 disc diameters temporal of the disc
    fx, _ = r.frame.to_px(*r.anatomy.fovea)
    disc_w = np.ptp(np.nonzero(r.disc_mask)[1]) + 1
    assert 1.8 < abs(cx - fx) / disc_w < 3.4


def test_same_rng_same_image_and_masks():
    lab = EyeLabels(dr_grade=3, dme=2)
    a_img, a_masks = render_fundus(rng(7), lab, "zeiss", SIZE, "left")
    b_img, b_masks = render_fundus(rng(7), lab, "zeiss", SIZE, "left")
    assert np.array_equal(a_img, b_img)
    assert a_masks.keys() == b_masks.keys()
    assert all(np.array_equal(a_masks[k], b_masks[k]) for k in a_masks)
    c_img, _ = render_fundus(rng(8), lab, "zeiss", SIZE, "left")
    assert not np.array_equal(a_img, c_img)


def test_image_looks_like_a_fundus():
    img, _ = render_fundus(rng(0), EyeLabels(), "topcon", SIZE, "right")
    assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8
    assert img[:3, :3].max() < 15 and img[-3:, -3:].max() < 15       # black corners
    c = img[SIZE // 2 - 10:SIZE // 2 + 10, SIZE // 3 - 10:SIZE // 3 + 10].reshape(-1, 3).mean(0)
    assert c[0] > c[1] > c[2] and c[0] > 90                         # orange-red retina


@pytest.mark.parametrize("seed", range(3))
def test_normal_eye_has_no_lesions(seed):
    r = render_eye(rng(seed), EyeLabels(cdr=0.3), TRAIN_CAMS[seed], SIZE, "right")
    assert r.masks == {} and r.findings == {}


@pytest.mark.parametrize("seed", range(4))
def test_grade_1_is_microaneurysms_only(seed):
    r = render_eye(rng(seed), EyeLabels(dr_grade=1), "topcon", SIZE, "left")
    assert set(r.masks) == {"microaneurysm"}
    assert 2 <= len(r.findings["microaneurysm"]) <= 9
    assert r.masks["microaneurysm"].sum() >= len(r.findings["microaneurysm"]) // 2


@pytest.mark.parametrize("seed", range(4))
def test_grade_2_has_more_than_microaneurysms_but_no_proliferation(seed):
    r = render_eye(rng(seed), EyeLabels(dr_grade=2), "canon", SIZE, "right")
    assert "microaneurysm" in r.masks
    assert set(r.masks) & {"dot_blot_haemorrhage", "hard_exudate", "cotton_wool_spot"}
    assert not set(r.masks) & {"nvd", "nve", "preretinal_haemorrhage", "venous_beading"}


@pytest.mark.parametrize("seed", range(6))
def test_grade_3_haemorrhages_cover_all_quadrants(seed):
    r = render_eye(rng(seed), EyeLabels(dr_grade=3), TRAIN_CAMS[seed % 4], SIZE, ["left", "right"][seed % 2])
    assert quadrants_of_mask(r, r.masks["dot_blot_haemorrhage"]) == {"ST", "IT", "SN", "IN"}
    assert not set(r.masks) & {"nvd", "nve", "preretinal_haemorrhage"}
    counts = r.findings["dot_blot_haemorrhage"]
    # 4-2-1 rule: > 20 per quadrant, or else beading / IRMA must be present
    if len(counts) < 84:
        assert set(r.masks) & {"venous_beading", "irma"}


@pytest.mark.parametrize("seed", range(5))
def test_grade_4_has_proliferation(seed):
    r = render_eye(rng(seed), EyeLabels(dr_grade=4), "kowa", SIZE, "right")
    assert set(r.masks) & {"nvd", "nve", "preretinal_haemorrhage"}


@pytest.mark.parametrize("dme", [1, 2])
def test_dme_puts_exudates_near_the_fovea(dme):
    r = render_eye(rng(dme), EyeLabels(dr_grade=2, dme=dme), "topcon", SIZE, "right")
    ys, xs = np.nonzero(r.masks["hard_exudate"])
    fx, fy = r.frame.to_px(*r.anatomy.fovea)
    dd_px = r.anatomy.disc_diameter * r.frame.radius
    d = np.hypot(xs - fx, ys - fy)
    assert d.min() < (0.4 if dme == 2 else 1.1) * dd_px


def test_glaucoma_cup_is_large_and_inside_the_disc():
    r = render_eye(rng(1), EyeLabels(glaucoma=True, cdr=0.8), "topcon", 160, "left")
    cup, disc = r.masks["glaucomatous_cupping"], r.disc_mask
    assert (cup & ~disc).sum() == 0
    # vertical extent of the cup / disc is about the CDR (a notch may lengthen the cup)
    ratio = np.ptp(np.nonzero(cup)[0]) / np.ptp(np.nonzero(disc)[0])
    assert 0.6 < ratio < 1.0


@pytest.mark.parametrize("labels,keys", [
    (EyeLabels(amd="drusen", age=75), {"drusen"}),
    (EyeLabels(amd="ga", age=75), {"drusen", "geographic_atrophy"}),
    (EyeLabels(amd="wet", age=75), {"drusen", "cnv_scar"}),
    (EyeLabels(hypertensive=1), {"arteriolar_narrowing"}),
    (EyeLabels(myopia=True), {"tessellation", "peripapillary_atrophy"}),
    (EyeLabels(other="brvo"), {"flame_haemorrhage", "venous_tortuosity"}),
    (EyeLabels(other="laser"), {"laser_scar"}),
    (EyeLabels(cataract=0.8), {"media_opacity"}),
])
def test_disease_implies_its_lesion_masks(labels, keys):
    r = render_eye(rng(3), labels, "topcon", SIZE, "right")
    assert keys <= set(r.masks)
    assert set(r.masks) <= set(knowledge.lesion_keys())
    for m in r.masks.values():
        assert m.shape == (SIZE, SIZE) and m.dtype == bool and m.any()


def test_cataract_lowers_contrast():
    base = render_eye(rng(5), EyeLabels(), "topcon", SIZE, "right")
    hazy = render_eye(rng(5), EyeLabels(cataract=0.9), "topcon", SIZE, "right")
    inside = base.frame.fov() > 0.99
    assert hazy.image[..., 1][inside].std() < 0.8 * base.image[..., 1][inside].std()


def test_held_out_camera_is_a_visible_shift():
    def mean_colour(cam):
        imgs = [render_fundus(rng(i), EyeLabels(), cam, SIZE, "right")[0] for i in range(3)]
        return np.mean([im[im.sum(-1) > 60].mean(0) for im in imgs], 0)
    topcon, handheld = mean_colour("topcon"), mean_colour("handheld")
    assert handheld[1] / handheld[0] > 1.2 * topcon[1] / topcon[0]    # greener


def test_rasterize_matches_hand_computed_coverage():
    f = Frame(32, 15.5, 15.5, 15.0, 1)
    # a horizontal tube of radius 2 px through the centre row y = 15.5 ... sampled at half-pixel steps
    u = np.arange(-0.6, 0.6, 0.5 / 15.0)
    pts = np.stack([u, np.zeros_like(u)], 1)
    cov, _ = rasterize(f, pts, np.full(len(u), 2.0 / 15.0))
    col = cov[:, 16]
    # pixel centres at distance 0.5, 1.5, 2.5 from the line: coverage clip(2 - d + 0.5)
    assert col[14:18] == pytest.approx([1.0, 1.0, 1.0, 1.0])
    assert col[13] == 0.0 and col[18] == 0.0
    cov, _ = rasterize(f, pts, np.full(len(u), 1.2 / 15.0))          # thinner: partial cover
    assert cov[14:18, 16] == pytest.approx([0.2, 1.0, 1.0, 0.2], abs=1e-5)
    assert cov[:, 0].max() == 0.0                    # beyond the tube's end


def test_bad_labels_and_arguments_raise_clearly():
    with pytest.raises(ValueError, match="dr_grade"):
        EyeLabels(dr_grade=5)
    with pytest.raises(ValueError, match="dme"):
        EyeLabels(dr_grade=1, dme=1)
    with pytest.raises(ValueError, match="amd"):
        EyeLabels(amd="yes")
    with pytest.raises(KeyError, match="unknown camera 'nikon'"):
        render_fundus(rng(0), EyeLabels(), "nikon", SIZE)
    with pytest.raises(ValueError, match="eye must be"):
        render_fundus(rng(0), EyeLabels(), "topcon", SIZE, eye="both")


# -- calibration to a working resolution ---------------------------------------------------
def test_lesion_scale_enlarges_small_lesions_only_and_keeps_the_lesion_set():
    lab = EyeLabels(dr_grade=2, dme=1, age=60, diabetic=True)
    base = render_eye(rng(5), lab, "topcon", 128, "right")
    same = render_eye(rng(5), lab, "topcon", 128, "right", lesion_scale=1.0, lesion_contrast=1.0, camera_shift=1.0)
    assert np.array_equal(base.image, same.image)                     # 1.0 is the realistic default
    big = render_eye(rng(5), lab, "topcon", 128, "right", lesion_scale=2.5)
    assert set(big.masks) == set(base.masks) and big.findings == base.findings   # same lesions, same places
    # area ~ scale^2 for isolated dots; clustered exudates merge, so less
    for key, factor in (("microaneurysm", 3.0), ("hard_exudate", 1.5)):
        assert big.masks[key].sum() > factor * base.masks[key].sum(), key
    assert np.array_equal(big.disc_mask, base.disc_mask)              # anatomy untouched


def test_lesion_contrast_deepens_colour_but_not_the_mask():
    lab = EyeLabels(dr_grade=3, age=60, diabetic=True)
    base = render_eye(rng(2), lab, "topcon", 96, "left")
    deep = render_eye(rng(2), lab, "topcon", 96, "left", lesion_contrast=2.0)
    m = base.masks["dot_blot_haemorrhage"]
    assert np.array_equal(deep.masks["dot_blot_haemorrhage"], m)
    g0, g1 = base.image[..., 1][m].astype(float).mean(), deep.image[..., 1][m].astype(float).mean()
    assert g1 < g0 - 3                                                 # darker red lesions


def test_camera_shift_zero_makes_every_camera_the_reference():
    from fundus_lab.data.synth.cameras import CAMERAS, shift_camera
    ref = CAMERAS["topcon"]
    held = shift_camera(CAMERAS["handheld"], 0.0)
    assert (held.gains, held.gamma, held.blur, held.noise, held.fov, held.jpeg_quality) == \
           (ref.gains, ref.gamma, ref.blur, ref.noise, ref.fov, ref.jpeg_quality)
    half = shift_camera(CAMERAS["handheld"], 0.5)
    assert half.blur == pytest.approx((ref.blur + CAMERAS["handheld"].blur) / 2)
    assert shift_camera(CAMERAS["handheld"], 1.0) == CAMERAS["handheld"]
    a = render_eye(rng(1), None, "handheld", 64, "right", camera_shift=0.0).image
    b = render_eye(rng(1), None, "topcon", 64, "right").image
    assert np.array_equal(a, b)


def test_bad_calibration_is_named():
    from fundus_lab.data.synth import calibration
    with pytest.raises(ValueError, match="lesion_scale"):
        render_eye(rng(0), None, "topcon", 64, "right", lesion_scale=0.0)
    with pytest.raises(ValueError, match="camera_shift"):
        calibration(camera_shift=-1)
    with pytest.raises(ValueError, match="unknown generator parameter"):
        calibration(lesion_size=2)


def test_lesion_sizes_reports_pixels_at_the_working_resolution(tmp_path):
    from fundus_lab.data import synth
    from fundus_lab.data.synth.lesions import lesion_size_table, lesion_sizes
    synth.write_dataset(tmp_path, "aptos", n=10, seed=0, image_size=64, workers=1)
    at64, at128 = lesion_sizes(tmp_path, 64), lesion_sizes(tmp_path, 128)
    assert "microaneurysm" in at64 and set(at64) == set(at128)
    assert np.allclose(at128["microaneurysm"], 2 * at64["microaneurysm"])
    assert "| microaneurysm |" in lesion_size_table(at64)
    with pytest.raises(FileNotFoundError, match="labels.csv"):
        lesion_sizes(tmp_path / "nothing", 64)
