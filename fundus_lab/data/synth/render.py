"""One synthetic colour fundus photograph from an eye's labels.

Order of painting follows the retinal layers, deep to superficial, then the optics:
background and choroid -> deep lesions (drusen, atrophy, laser scars) -> optic disc ->
intraretinal lesions (microaneurysms, dot-blot haemorrhages, hard exudates) -> vessels ->
nerve-fibre-layer and pre-retinal lesions (flame haemorrhages, cotton-wool spots, new
vessels, pre-retinal blood) -> media haze -> camera.

How the grade rules of the ICDR scale become lesions:
grade 1 microaneurysms only; grade 2 adds dot-blot haemorrhages, hard exudates or
cotton-wool spots (fewer than 20 haemorrhages per quadrant); grade 3 more than 20
haemorrhages in each of the four quadrants, or haemorrhages in all four quadrants with
venous beading in 2+ quadrants or IRMA; grade 4 adds NVD, NVE and/or pre-retinal blood.
DME puts hard exudates within one disc diameter of the fovea (2: on the centre).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import lesions as L
from .anatomy import (QUADRANTS, Anatomy, Canvas, Frame, quadrant_of, render_background, render_disc, render_ppa,
                      sample_anatomy)
from .cameras import CameraProfile, apply_camera, frame_geometry, get_camera, jitter, shift_camera
from .labels import EyeLabels
from .vessels import apply_beading, grow_vessels, render_vessels


@dataclass
class RenderedEye:
    image: np.ndarray                       # uint8 [S, S, 3]
    masks: dict[str, np.ndarray]            # lesion key -> bool [S, S]
    findings: dict[str, list]               # lesion key -> canonical centres [(u, v)]
    anatomy: Anatomy
    frame: Frame
    camera: CameraProfile
    disc_mask: np.ndarray                   # bool [S, S]
    notes: dict = field(default_factory=dict)


def _dr_lesions(rng, canvas, anat, lab: EyeLabels, found, plan):
    g = lab.dr_grade
    dd = anat.disc_diameter
    if g >= 1:
        n_ma = {1: (2, 9), 2: (5, 18), 3: (8, 25), 4: (6, 20)}[g]
        pts = L.sample_points(rng, anat, int(rng.integers(*n_ma)), r_min=0.08, r_max=0.62)
        found["microaneurysm"] = L.microaneurysms(rng, canvas, pts)
    if g == 2:
        opts = rng.random(3) < [0.75, 0.55, 0.35]
        if not opts.any():
            opts[int(rng.integers(3))] = True
        if opts[0]:
            pts = L.sample_points(rng, anat, int(rng.integers(2, 14)), r_min=0.1, r_max=0.7)
            found["dot_blot_haemorrhage"] = L.dot_blot_haemorrhages(rng, canvas, pts)
        if opts[1] and not lab.dme:
            c = L.sample_points(rng, anat, int(rng.integers(1, 3)), r_min=1.2 * dd, r_max=0.6)
            found["hard_exudate"] = L.hard_exudates(rng, canvas, c)
        plan["cws"] = int(rng.integers(1, 4)) if opts[2] else 0
    if g >= 3:
        # 4-2-1 rule: > 20 haemorrhages in each quadrant, or fewer with beading / IRMA.
        many = g == 3 and rng.random() < 0.6
        per_q = (21, 28) if many else (3, 12)
        pts = np.concatenate([L.sample_points(rng, anat, int(rng.integers(*per_q)), r_min=0.1, r_max=0.85, quadrant=q)
                              for q in QUADRANTS])
        found["dot_blot_haemorrhage"] = L.dot_blot_haemorrhages(rng, canvas, pts)
        if g == 3 and not many:
            if rng.random() < 0.7:
                plan["beading"] = {"superotemporal", "inferotemporal"} | (
                    {str(rng.choice(["superonasal", "inferonasal"]))} if rng.random() < 0.4 else set())
            else:
                plan["irma"] = int(rng.integers(1, 4))
        if rng.random() < 0.5 and not lab.dme:
            c = L.sample_points(rng, anat, int(rng.integers(1, 3)), r_min=1.2 * dd, r_max=0.6)
            found["hard_exudate"] = L.hard_exudates(rng, canvas, c)
        plan["cws"] = int(rng.integers(0, 5))
    if g == 4:
        which = rng.random(3) < [0.55, 0.5, 0.35]
        if not which.any():
            which[int(rng.integers(3))] = True
        plan["nvd"], plan["nve"], plan["preretinal"] = (bool(x) for x in which)
        plan["laser"] = rng.random() < 0.3
    if lab.dme:
        if lab.dme == 2:
            c = [(anat.fovea[0] + rng.normal(0, 0.02), anat.fovea[1] + rng.normal(0, 0.02))]
            found["hard_exudate"] = found.get("hard_exudate", []) + L.hard_exudates(rng, canvas, c, ring=True)
            c = [(anat.fovea[0] + rng.normal(0, 0.01), anat.fovea[1] + rng.normal(0, 0.01))]
            found["hard_exudate"] += L.hard_exudates(rng, canvas, c, per_cluster=(3, 7), spread=0.015)
        else:
            c = L.sample_points(rng, anat, int(rng.integers(1, 3)), r_min=0.45 * dd, r_max=0.9 * dd, avoid_disc=1.0)
            found["hard_exudate"] = found.get("hard_exudate", []) + L.hard_exudates(rng, canvas, c, spread=0.02)


CALIBRATION = {"lesion_scale": 1.0, "lesion_contrast": 1.0, "camera_shift": 1.0}   # realistic


def calibration(**kwargs) -> dict[str, float]:
    """The full calibration (defaults filled in) from keyword arguments; unknown names
    and out-of-range values raise a ValueError that names them."""
    unknown = sorted(set(kwargs) - set(CALIBRATION))
    if unknown:
        raise ValueError(f"synth: unknown generator parameter(s) {unknown}; expected {sorted(CALIBRATION)}")
    out = {**CALIBRATION, **{k: v for k, v in kwargs.items() if v is not None}}
    check_calibration(**out)
    return {k: float(v) for k, v in out.items()}


def check_calibration(lesion_scale: float, lesion_contrast: float, camera_shift: float) -> None:
    """Raise a ValueError naming the parameter when a calibration value is out of range."""
    for name, value, lo, hi in (("lesion_scale", lesion_scale, 0.25, 8.0), ("lesion_contrast", lesion_contrast, 0.25, 8.0),
                                ("camera_shift", camera_shift, 0.0, 2.0)):
        if not isinstance(value, (int, float)) or not lo <= float(value) <= hi:
            raise ValueError(f"synth: {name} must be a number in [{lo}, {hi}] (1.0 = realistic), got {value!r}")


def render_eye(rng: np.random.Generator, labels: EyeLabels | None = None, camera="topcon", size: int = 224,
               eye: str = "right", lesion_scale: float = 1.0, lesion_contrast: float = 1.0,
               camera_shift: float = 1.0) -> RenderedEye:
    """Draw one eye. Deterministic given ``rng``'s state.

    Args:
        labels: what the eye has (default: a normal eye).
        camera: a profile name from ``cameras.CAMERAS`` or a CameraProfile.
        size: output side in pixels (rendered at this size directly).
        eye: "right" (disc on the image's right) or "left".
        lesion_scale: size factor of the small lesions (1.0: realistic; see ``lesions``).
        lesion_contrast: colour depth of every lesion (1.0: realistic; see ``Canvas``).
        camera_shift: strength of the camera profile's difference from the reference
            camera (1.0: as defined; see ``cameras.shift_camera``).
    """
    check_calibration(lesion_scale, lesion_contrast, camera_shift)
    if eye not in ("left", "right"):
        raise ValueError(f"render_eye: eye must be 'left' or 'right', got {eye!r}")
    if size < 32:
        raise ValueError(f"render_eye: size must be >= 32 px, got {size}")
    lab = labels or EyeLabels()
    cam = jitter(rng, shift_camera(get_camera(camera), camera_shift))
    cx, cy, radius = frame_geometry(cam, size)
    frame = Frame(size, cx, cy, radius, 1 if eye == "right" else -1)
    notch = str(rng.choice(["superior", "inferior"])) if lab.glaucoma and rng.random() < 0.65 else None
    tess = float(rng.uniform(0.35, 0.8)) if lab.myopia else 0.0
    anat = sample_anatomy(rng, lab.cdr, age=lab.age, myopic=lab.myopia, notch=notch, tessellation=tess)
    img, pattern = render_background(rng, frame, anat)
    canvas = Canvas(frame, img, lesion_scale=lesion_scale, lesion_contrast=lesion_contrast)
    found: dict[str, list] = {}
    plan: dict = {}
    dd = anat.disc_diameter
    fov = frame.fov()
    if pattern is not None:
        canvas.add_mask("tessellation", (slice(None), slice(None)), (pattern > 0.5) & (fov > 0.5))
        found["tessellation"] = []

    # -- deep: drusen, atrophy, CNV, laser scars, peripapillary atrophy
    if lab.amd:
        found["drusen"] = L.drusen(rng, canvas, anat, int(rng.integers(12, 45)), soft=rng.random() < 0.6)
        if lab.amd == "ga":
            found["geographic_atrophy"] = L.geographic_atrophy(rng, canvas, anat, pattern)
        elif lab.amd == "wet":
            found["cnv_scar"] = L.cnv_scar(rng, canvas, anat)
    if lab.myopia and rng.random() < 0.3 and "geographic_atrophy" not in found:
        found["geographic_atrophy"] = L.geographic_atrophy(rng, canvas, anat, pattern)
    if lab.other == "laser":
        found["laser_scar"] = L.laser_scars(rng, canvas, anat, int(rng.integers(25, 90)))
    if lab.myopia or (lab.glaucoma and rng.random() < 0.4):
        render_ppa(rng, canvas, anat, width=rng.uniform(0.35, 0.8) if lab.myopia else rng.uniform(0.15, 0.3))
        found["peripapillary_atrophy"] = [anat.disc]
    disc_mask = render_disc(canvas, anat, glaucomatous=lab.glaucoma)
    if lab.glaucoma:
        found["glaucomatous_cupping"] = [anat.disc]

    # -- intraretinal
    _dr_lesions(rng, canvas, anat, lab, found, plan)
    if lab.dr_grade == 4 and plan.get("laser") and "laser_scar" not in found:
        found["laser_scar"] = L.laser_scars(rng, canvas, anat, int(rng.integers(25, 70)))
    if lab.hypertensive >= 3:
        c = [(anat.fovea[0] + rng.normal(0, 0.02), anat.fovea[1] + rng.normal(0, 0.02))]
        found["hard_exudate"] = found.get("hard_exudate", []) + L.hard_exudates(rng, canvas, c, ring=True)

    if lab.unseen == "ocular_ischaemic_syndrome":  # mid-peripheral blots and dots from hypoperfusion
        pts = L.sample_points(rng, anat, int(rng.integers(8, 24)), r_min=0.45, r_max=0.85)
        found["dot_blot_haemorrhage"] = found.get("dot_blot_haemorrhage", []) + L.dot_blot_haemorrhages(rng, canvas, pts)
        pts = L.sample_points(rng, anat, int(rng.integers(4, 12)), r_min=0.45, r_max=0.85)
        found["microaneurysm"] = found.get("microaneurysm", []) + L.microaneurysms(rng, canvas, pts)

    # -- vessels
    tortuous = ()
    if lab.other == "brvo":
        tortuous = (str(rng.choice(["superotemporal", "inferotemporal"])),)
    elif lab.other == "crvo":
        tortuous = ("superotemporal", "inferotemporal", "superonasal", "inferonasal")
    hyp = lab.hypertensive
    narrow = bool(hyp) or lab.unseen == "ocular_ischaemic_syndrome"  # thin arterioles: pressure or hypoperfusion
    tree = grow_vessels(rng, frame, anat, artery_scale=rng.uniform(0.5, 0.65) if narrow else 1.0,
                        artery_noise=0.4 if narrow else 1.0, tortuous=tortuous)
    beaded = apply_beading(rng, tree, anat, plan["beading"], frame) if plan.get("beading") else []
    if plan.get("beading") and len({quadrant_of(anat, *b.pts.mean(0)).item() for b in beaded}) < 2:
        plan["irma"] = int(rng.integers(1, 4))      # beading too short to count: IRMA instead
    sites = render_vessels(rng, canvas, tree, anat, av_nicking=int(rng.integers(2, 5)) if hyp else 0,
                           narrowing_mask=narrow, beaded=beaded, tortuous=tortuous)
    if narrow:
        found["arteriolar_narrowing"] = []
        if sites:
            found["av_nicking"] = sites
    if beaded:
        found["venous_beading"] = [tuple(map(float, b.pts.mean(0))) for b in beaded]
    if tortuous:
        # One point per trunk, in the quadrant the trunk is named after: a temporal arcade
        # where it passes just temporal of the fovea, a nasal trunk at its most nasal.
        found["venous_tortuosity"] = []
        for b in tree.of("vein", 0):
            if b.trunk not in tortuous:
                continue
            if "temporal" in b.trunk:
                past = np.flatnonzero(b.pts[:, 0] < anat.fovea[0] - 0.2)
                i = int(past[0]) if len(past) else len(b.pts) - 1
            else:
                i = int(np.argmax(b.pts[:, 0]))
            found["venous_tortuosity"].append(tuple(map(float, b.pts[i])))

    # -- nerve fibre layer and pre-retinal
    flames = []
    if hyp >= 2:
        flames += list(L.sample_points(rng, anat, int(rng.integers(2, 8)), around=anat.disc, r_min=0.6 * dd, r_max=2.2 * dd, avoid_disc=0.6))
        plan["cws"] = plan.get("cws", 0) + int(rng.integers(1, 4))
    if lab.glaucoma and rng.random() < 0.15:
        flames += list(L.sample_points(rng, anat, 1, around=anat.disc, r_min=0.5 * dd, r_max=0.65 * dd, avoid_disc=0.0))
    if lab.other == "brvo":
        q = "superotemporal" if tortuous[0] == "superotemporal" else "inferotemporal"
        flames += list(L.sample_points(rng, anat, int(rng.integers(12, 30)), r_min=0.1, r_max=0.85, quadrant=q))
        plan["cws"] = plan.get("cws", 0) + int(rng.integers(0, 3))
    elif lab.other == "crvo":
        for q in QUADRANTS:
            flames += list(L.sample_points(rng, anat, int(rng.integers(6, 14)), r_min=0.1, r_max=0.85, quadrant=q))
        plan["cws"] = plan.get("cws", 0) + int(rng.integers(1, 4))
    purtscher = []
    if lab.unseen == "purtscher_retinopathy":  # white patches clustered around the disc, a few flames
        purtscher = L.sample_points(rng, anat, int(rng.integers(6, 14)), around=anat.disc, r_min=0.8 * dd,
                                    r_max=3.0 * dd, avoid_disc=0.7)
        flames += list(L.sample_points(rng, anat, int(rng.integers(2, 6)), around=anat.disc, r_min=0.6 * dd,
                                       r_max=2.0 * dd, avoid_disc=0.6))
    if flames:
        found["flame_haemorrhage"] = L.flame_haemorrhages(rng, canvas, anat, flames)
    if len(purtscher):
        found["cotton_wool_spot"] = L.cotton_wool_spots(rng, canvas, purtscher)
    if plan.get("cws"):
        arc, _ = tree.points("vein", max_depth=0)
        far = np.hypot(arc[:, 0] - anat.disc[0], arc[:, 1] - anat.disc[1]) > 0.8 * dd
        arc = arc[far & (np.hypot(arc[:, 0], arc[:, 1]) < 0.8)]
        if len(arc):
            pick = arc[rng.integers(len(arc), size=plan["cws"])] + rng.normal(0, 0.035, (plan["cws"], 2))
            found["cotton_wool_spot"] = found.get("cotton_wool_spot", []) + L.cotton_wool_spots(rng, canvas, pick)
    if plan.get("irma"):
        c = L.sample_points(rng, anat, plan["irma"], r_min=0.3, r_max=0.7)
        found["irma"] = sum((L.new_vessels(rng, canvas, p, 0.035, "irma", (4, 8)) for p in c), [])
    if plan.get("nvd"):
        found["nvd"] = L.new_vessels(rng, canvas, anat.disc, 0.6 * dd, "nvd")
    if plan.get("nve"):
        arc, _ = tree.points("vein", max_depth=0)
        ok = (np.hypot(arc[:, 0] - anat.disc[0], arc[:, 1] - anat.disc[1]) > 1.5 * dd) & (np.hypot(arc[:, 0], arc[:, 1]) < 0.85)
        arc = arc[ok] if ok.any() else L.sample_points(rng, anat, 4, r_min=0.3, r_max=0.7)
        k = int(rng.integers(1, 3))
        found["nve"] = sum((L.new_vessels(rng, canvas, arc[int(rng.integers(len(arc)))], 0.07, "nve")
                            for _ in range(k)), [])
    if plan.get("preretinal"):
        c = L.sample_points(rng, anat, 1, r_min=0.25, r_max=0.6)[0]
        found["preretinal_haemorrhage"] = L.preretinal_haemorrhage(rng, canvas, c)

    # -- optics: lens haze, then the camera
    if lab.cataract > 0:
        L.media_opacity(rng, canvas, lab.cataract, fov)
        found["media_opacity"] = []
    u, v = frame.grid()
    image = apply_camera(rng, cam, canvas.image, fov, radius, u * u + v * v)
    inside = fov > 0.5
    masks = {k: m & inside for k, m in canvas.masks.items()}
    masks = {k: m for k, m in masks.items() if m.any()}
    found = {k: pts for k, pts in found.items() if k in masks}
    return RenderedEye(image, masks, found, anat, frame, cam, disc_mask & inside, notes={"plan": plan})


def render_fundus(rng: np.random.Generator, labels: EyeLabels | None = None, camera="topcon",
                  size: int = 224, eye: str = "right", **calibration) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(image uint8 [S, S, 3], lesion masks {key: bool [S, S]}) for one eye; see render_eye."""
    r = render_eye(rng, labels, camera, size, eye, **calibration)
    return r.image, r.masks
