"""Lesion painters. Each draws one lesion type onto a Canvas and records its pixel mask
under the lesion's knowledge key; each returns the canonical centres it drew, which the
report writer turns into counts and locations.

Sizes are in units of the FOV radius R (a disc diameter is ~0.25 R); positions are
canonical (u, v) coordinates, see ``anatomy``. Red lesions absorb (``Canvas.multiply``),
pale and yellow ones replace the colour (``Canvas.blend``).

``Canvas.lesion_scale`` multiplies the size of the small focal lesions (microaneurysms,
dots and blots, exudates, drusen, cotton-wool spots, flame haemorrhages, laser spots and
the calibre of new vessels), never their number, place or shape; the large ones
(atrophy, CNV scar, pre-retinal blood) are visible at any resolution and keep their size.
``Canvas.lesion_contrast`` deepens every lesion's colour the same way (see ``Canvas``).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .anatomy import Anatomy, Canvas, quadrant_of
from .vessels import rasterize

BLOOD = np.array([0.58, 0.22, 0.26], np.float32)        # transmittance of a haemorrhage
DARK_BLOOD = np.array([0.45, 0.12, 0.16], np.float32)
EXUDATE = np.array([0.98, 0.90, 0.52], np.float32)
DRUSEN = np.array([0.96, 0.78, 0.42], np.float32)
CWS = np.array([0.95, 0.90, 0.82], np.float32)
Point = tuple[float, float]


def sample_points(rng: np.random.Generator, anat: Anatomy, n: int, *, around=None, r_min=0.0,
                  r_max=0.62, quadrant=None, fov=0.93, avoid_disc=0.75) -> np.ndarray:
    """n canonical points, uniform over an annulus around ``around`` (default: fovea),
    inside the FOV, optionally in one quadrant, and off the disc (in disc diameters)."""
    if n <= 0:
        return np.zeros((0, 2))
    cu, cv = anat.fovea if around is None else around
    out = []
    for _ in range(50):
        m = 4 * n + 16
        rad = np.sqrt(rng.uniform(r_min ** 2, r_max ** 2, m))
        ang = rng.uniform(-np.pi, np.pi, m)
        u, v = cu + rad * np.cos(ang), cv + rad * np.sin(ang)
        ok = (u * u + v * v < fov ** 2)
        ok &= np.hypot(u - anat.disc[0], v - anat.disc[1]) > avoid_disc * anat.disc_diameter
        if quadrant is not None:
            ok &= quadrant_of(anat, u, v) == quadrant
        out += list(zip(u[ok], v[ok]))
        if len(out) >= n:
            break
    if len(out) < n:
        raise RuntimeError(f"sample_points: could not place {n} points (quadrant={quadrant})")
    return np.array(out[:n])


def _multiply(canvas: Canvas, key, sl, alpha, tint, mask_threshold=0.35) -> None:
    canvas.multiply(key, sl, alpha, tint, mask_threshold, contrast=canvas.lesion_contrast)


def _blend(canvas: Canvas, key, sl, alpha, colour, mask_threshold=0.35) -> None:
    canvas.blend(key, sl, alpha, colour, mask_threshold, contrast=canvas.lesion_contrast)


def _spot(canvas: Canvas, u, v, r, edge_px=0.8, r_core=None):
    """Window and anti-aliased disk alpha of radius r (canonical, times the canvas'
    ``lesion_scale``) at (u, v); with ``r_core`` also the alpha of a concentric inner
    disk in the same window."""
    f = canvas.frame
    px, py = f.to_px(u, v)
    r = r * canvas.lesion_scale
    r_core = None if r_core is None else r_core * canvas.lesion_scale
    rp = max(r * f.radius, 0.75)
    win = canvas.window(px, py, rp + 2 * edge_px + 1)
    if win is None:
        return (None, None) if r_core is None else (None, None, None)
    sl, dx, dy = win
    d = np.sqrt(dx * dx + dy * dy)
    a = np.clip((rp - d) / edge_px + 0.5, 0, 1)
    if r_core is None:
        return sl, a
    return sl, a, np.clip((max(r_core * f.radius, 0.75) - d) / edge_px + 0.5, 0, 1)


def microaneurysms(rng, canvas: Canvas, pts) -> list[Point]:
    """Tiny sharp red dots, radius ~0.9% R (about a pixel at 224 px)."""
    for u, v in pts:
        sl, a = _spot(canvas, u, v, rng.uniform(0.007, 0.011), edge_px=0.6)
        if sl is not None:
            _multiply(canvas, "microaneurysm", sl, a * 0.9, DARK_BLOOD, mask_threshold=0.3)
    return [tuple(p) for p in pts]


def dot_blot_haemorrhages(rng, canvas: Canvas, pts) -> list[Point]:
    """Round dots (60%) or irregular blots made of 2-4 overlapping soft disks."""
    f = canvas.frame
    for u, v in pts:
        if rng.random() < 0.6:
            sl, a = _spot(canvas, u, v, rng.uniform(0.009, 0.016), edge_px=1.0)
            if sl is not None:
                _multiply(canvas, "dot_blot_haemorrhage", sl, a * 0.85, BLOOD)
            continue
        for _ in range(rng.integers(2, 5)):
            du, dv = rng.normal(0, 0.012, 2) * canvas.lesion_scale   # the blot's lobes scale with it
            sl, a = _spot(canvas, u + du, v + dv, rng.uniform(0.01, 0.02), edge_px=1.5)
            if sl is not None:
                _multiply(canvas, "dot_blot_haemorrhage", sl, a * 0.6, BLOOD)
    return [tuple(p) for p in pts]


def flame_haemorrhages(rng, canvas: Canvas, anat: Anatomy, pts) -> list[Point]:
    """Feathery streaks along the nerve fibres, i.e. radial to the disc."""
    f = canvas.frame
    for u, v in pts:
        du, dv = u - anat.disc[0], v - anat.disc[1]
        ang = np.arctan2(dv, du) + rng.normal(0, 0.15)
        ex, ey = f.vec_px(np.cos(ang), np.sin(ang))
        n = np.hypot(ex, ey)
        ex, ey = ex / n, ey / n
        length = rng.uniform(0.04, 0.075) * f.radius * canvas.lesion_scale
        width = max(rng.uniform(0.009, 0.015) * f.radius * canvas.lesion_scale, 0.8)
        px, py = f.to_px(u, v)
        win = canvas.window(px, py, length * 1.6)
        if win is None:
            continue
        sl, dx, dy = win
        along = dx * ex + dy * ey
        across = -dx * ey + dy * ex
        # tapered at both ends, feathered (striated) across
        taper = 1.0 - np.clip(np.abs(along) / length, 0, 1) ** 2
        a = np.exp(-(across / (width * (0.4 + 0.6 * taper))) ** 2) * (taper > 0)
        a *= 0.8 + 0.2 * np.cos(across * 2.2 + along * 0.3)
        _multiply(canvas, "flame_haemorrhage", sl, np.clip(a, 0, 1) * 0.7, BLOOD)
    return [tuple(p) for p in pts]


def hard_exudates(rng, canvas: Canvas, centres, per_cluster=(4, 14), spread=0.035, ring=False) -> list[Point]:
    """Sharp yellow-white waxy dots in clusters, or a circinate ring around each centre."""
    drawn = []
    for cu, cv in centres:
        k = int(rng.integers(*per_cluster))
        if ring:
            rad = rng.uniform(0.05, 0.09)
            ang = rng.uniform(0, 2 * np.pi) + np.linspace(0, 2 * np.pi * rng.uniform(0.6, 1.0), 2 * k)
            pu = cu + rad * np.cos(ang) + rng.normal(0, 0.006, len(ang))
            pv = cv + rad * np.sin(ang) + rng.normal(0, 0.006, len(ang))
        else:
            pu, pv = cu + rng.normal(0, spread, k), cv + rng.normal(0, spread, k)
        for u, v in zip(pu, pv):
            if u * u + v * v > 0.9:
                continue
            sl, a = _spot(canvas, u, v, rng.uniform(0.006, 0.014), edge_px=0.7)
            if sl is not None:
                _blend(canvas, "hard_exudate", sl, a * rng.uniform(0.75, 0.95), EXUDATE)
        drawn.append((float(cu), float(cv)))
    return drawn


def cotton_wool_spots(rng, canvas: Canvas, pts) -> list[Point]:
    """Fluffy white patches with soft, irregular edges."""
    f = canvas.frame
    for u, v in pts:
        px, py = f.to_px(u, v)
        rp = rng.uniform(0.025, 0.045) * f.radius * canvas.lesion_scale
        win = canvas.window(px, py, rp * 1.8)
        if win is None:
            continue
        sl, dx, dy = win
        e = rng.uniform(0.6, 1.0)
        th = rng.uniform(0, np.pi)
        a_, b_ = dx * np.cos(th) + dy * np.sin(th), -dx * np.sin(th) + dy * np.cos(th)
        d2 = (a_ / rp) ** 2 + (b_ / (rp * e)) ** 2
        wob = 1.0 + 0.25 * np.sin(3 * np.arctan2(b_, a_) + rng.uniform(0, 6.3))
        a = np.exp(-(d2 / wob) ** 1.5 * 1.2) * 0.8
        _blend(canvas, "cotton_wool_spot", sl, a, CWS, mask_threshold=0.3)
    return [tuple(p) for p in pts]


def new_vessels(rng, canvas: Canvas, centre, extent, key: str, n_loops=(12, 24)) -> list[Point]:
    """A fine tangled net of new vessels (NVD, NVE, IRMA): short, very tortuous walks."""
    f = canvas.frame
    pts, rad = [], []
    ds = 0.5 / f.radius
    for _ in range(int(rng.integers(*n_loops))):
        n = int(rng.uniform(0.5, 1.0) * extent * 2.5 / ds)
        th = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.35, n)) + np.linspace(0, rng.choice([-1, 1]) * 5, n)
        start = np.array(centre) + rng.normal(0, extent * 0.35, 2)
        p = start + np.cumsum(np.stack([np.cos(th), np.sin(th)], 1) * ds, 0)
        p = p[np.hypot(p[:, 0] - centre[0], p[:, 1] - centre[1]) < extent]
        pts.append(p)
        rad.append(np.full(len(p), max(rng.uniform(0.0025, 0.004) * canvas.lesion_scale, 0.45 / f.radius)))
    cov, _ = rasterize(f, np.concatenate(pts), np.concatenate(rad))
    full = (slice(None), slice(None))
    _multiply(canvas, key, full, cov * 0.9, np.array([0.62, 0.30, 0.36], np.float32), mask_threshold=0.25)
    return [tuple(map(float, centre))]


def preretinal_haemorrhage(rng, canvas: Canvas, centre) -> list[Point]:
    """A large boat-shaped dark-red area with a flat upper border (blood level)."""
    f = canvas.frame
    a_r, b_r = rng.uniform(0.07, 0.13), rng.uniform(0.05, 0.09)
    px, py = f.to_px(*centre)
    win = canvas.window(px, py, a_r * f.radius * 1.2)
    if win is None:
        return []
    sl, dx, dy = win
    rx, ry = a_r * f.radius, b_r * f.radius
    d = np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2)
    flat = -ry * rng.uniform(0.1, 0.4)
    a = np.clip((1 - d) * ry / 1.5, 0, 1) * np.clip((dy - flat) / 1.0 + 0.5, 0, 1)
    _multiply(canvas, "preretinal_haemorrhage", sl, a * 0.95, DARK_BLOOD)
    return [tuple(map(float, centre))]


def drusen(rng, canvas: Canvas, anat: Anatomy, n: int, soft: bool) -> list[Point]:
    """Round yellow spots at the macula: small hard ones or large soft confluent ones."""
    dd = anat.disc_diameter
    pts = sample_points(rng, anat, n, r_max=1.1 * dd, avoid_disc=1.0)
    lo, hi = (0.014, 0.032) if soft else (0.006, 0.013)
    for u, v in pts:
        sl, a = _spot(canvas, u, v, rng.uniform(lo, hi), edge_px=2.0 if soft else 0.8)
        if sl is not None:
            _blend(canvas, "drusen", sl, a * rng.uniform(0.5, 0.8), DRUSEN, mask_threshold=0.25)
    return [tuple(p) for p in pts]


def geographic_atrophy(rng, canvas: Canvas, anat: Anatomy, pattern=None, centre=None) -> list[Point]:
    """A sharply bordered pale patch where the large choroidal vessels show through."""
    f = canvas.frame
    cu, cv = centre if centre is not None else (anat.fovea[0] + rng.normal(0, 0.02), anat.fovea[1] + rng.normal(0, 0.02))
    rr = rng.uniform(0.06, 0.12)
    px, py = f.to_px(cu, cv)
    win = canvas.window(px, py, rr * f.radius * 1.6)
    if win is None:
        return []
    sl, dx, dy = win
    d = np.sqrt(dx ** 2 + dy ** 2) / (rr * f.radius)
    ang = np.arctan2(dy, dx)
    shape = 1.0 + 0.2 * np.sin(2 * ang + rng.uniform(0, 6.3)) + 0.12 * np.sin(3 * ang + rng.uniform(0, 6.3))
    a = np.clip((shape - d) * rr * f.radius / 1.2, 0, 1)
    _blend(canvas, "geographic_atrophy", sl, a * 0.6, np.array([0.97, 0.70, 0.48], np.float32))
    # choroidal vessels inside: orange ridges on the pale floor
    if pattern is None:
        h, w = a.shape
        n = ndi.gaussian_filter(rng.standard_normal((h, w)).astype(np.float32), 1.5 * f.radius / 100)
        pattern = np.exp(-(n / (n.std() + 1e-6) / 0.5) ** 2)
    else:
        pattern = pattern[sl]
    _multiply(canvas, None, sl, a * pattern * 0.35, np.array([0.95, 0.55, 0.5], np.float32))
    _multiply(canvas, None, sl, np.exp(-((d - shape) * 8) ** 2) * 0.35, np.array([0.5, 0.4, 0.35], np.float32))
    return [(float(cu), float(cv))]


def cnv_scar(rng, canvas: Canvas, anat: Anatomy) -> list[Point]:
    """Wet AMD: a grey-green membrane at the macula rimmed by sub-retinal blood."""
    f = canvas.frame
    cu, cv = anat.fovea[0] + rng.normal(0, 0.02), anat.fovea[1] + rng.normal(0, 0.02)
    rr = rng.uniform(0.045, 0.08)
    px, py = f.to_px(cu, cv)
    win = canvas.window(px, py, rr * f.radius * 2.2)
    if win is None:
        return []
    sl, dx, dy = win
    d = np.sqrt(dx ** 2 + (dy * rng.uniform(0.8, 1.2)) ** 2) / (rr * f.radius)
    ring = np.exp(-((d - 1.25) / 0.35) ** 2) * (0.6 + 0.4 * np.cos(np.arctan2(dy, dx) * 2 + rng.uniform(0, 6)))
    _multiply(canvas, "cnv_scar", sl, np.clip(ring, 0, 1) * 0.85, BLOOD, mask_threshold=0.4)
    core = np.clip((1.0 - d) * 3, 0, 1)
    _blend(canvas, "cnv_scar", sl, core * 0.75, np.array([0.55, 0.52, 0.38], np.float32))
    return [(float(cu), float(cv))]


def laser_scars(rng, canvas: Canvas, anat: Anatomy, n: int) -> list[Point]:
    """Panretinal photocoagulation: rows of round pigmented spots with pale halos."""
    f = canvas.frame
    spacing = rng.uniform(0.055, 0.075)
    g = np.arange(-1, 1, spacing)
    gu, gv = np.meshgrid(g, g)
    gu = gu + (np.arange(len(g))[:, None] % 2) * spacing / 2          # hexagonal rows
    pts = np.stack([gu.ravel(), gv.ravel()], 1) + rng.normal(0, spacing * 0.08, (gu.size, 2))
    r_f = np.hypot(pts[:, 0] - anat.fovea[0], pts[:, 1] - anat.fovea[1])
    keep = (r_f > 0.6) & (np.hypot(pts[:, 0], pts[:, 1]) < 0.92)
    keep &= np.hypot(pts[:, 0] - anat.disc[0], pts[:, 1] - anat.disc[1]) > 1.5 * anat.disc_diameter
    pts = pts[keep]
    pts = pts[rng.permutation(len(pts))[:n]]
    for u, v in pts:
        r = rng.uniform(0.014, 0.022)
        sl, halo, core = _spot(canvas, u, v, r * 1.35, edge_px=1.0, r_core=r * 0.8)
        if sl is None:
            continue
        _blend(canvas, "laser_scar", sl, halo * 0.6, np.array([0.92, 0.74, 0.52], np.float32))
        _blend(canvas, None, sl, core * rng.uniform(0.7, 0.95), np.array([0.22, 0.12, 0.07], np.float32))
    return [tuple(p) for p in pts]


def media_opacity(rng, canvas: Canvas, strength: float, fov: np.ndarray) -> None:
    """Cataract: the whole view blurred, veiled and low in contrast (alpha = strength)."""
    f = canvas.frame
    sigma = (0.5 + 1.5 * strength) * f.radius / 100.0
    img = np.stack([ndi.gaussian_filter(canvas.image[..., c], sigma) for c in range(3)], -1)
    mean = (img * fov[..., None]).sum((0, 1)) / max(fov.sum(), 1)
    veil = np.array([0.95, 0.75, 0.55], np.float32) * mean.max()
    h = 0.2 + 0.35 * strength
    canvas.image = ((1 - h) * (mean + (img - mean) * (1 - 0.35 * strength)) + h * veil).astype(np.float32)
    canvas.add_mask("media_opacity", (slice(None), slice(None)), fov > 0.5)



def lesion_sizes(dataset_dir, working_size: int, limit: int | None = None) -> dict[str, np.ndarray]:
    """Equivalent diameters (px at ``working_size``) of every connected lesion region in a
    written synthetic dataset, by lesion key: what a model at that resolution gets to see.

    Reads ``masks/*.npz`` (as the writer stores them, at the generation size) of the first
    ``limit`` images; a region's diameter is ``2 sqrt(area / pi)`` times
    ``working_size / generation size``. Image-wide findings (haze, tessellation) are left out.
    """
    import csv
    from pathlib import Path

    root = Path(dataset_dir)
    labels = root / "labels.csv"
    if not labels.is_file():
        raise FileNotFoundError(f"lesion_sizes: {labels} is missing (expected a dataset written by synth.generate)")
    with open(labels, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:limit]
    out: dict[str, list] = {}
    for row in rows:
        with np.load(root / row["mask"]) as z:
            for key in z.files:
                if key in ("media_opacity", "tessellation"):
                    continue
                m = z[key]
                lab, n = ndi.label(m)
                if n == 0:
                    continue
                areas = np.bincount(lab.ravel())[1:]
                out.setdefault(key, []).extend(2 * np.sqrt(areas / np.pi) * working_size / m.shape[0])
    return {k: np.asarray(v, np.float32) for k, v in sorted(out.items())}


def lesion_size_table(sizes: dict[str, np.ndarray], title: str = "") -> str:
    """Markdown table of ``lesion_sizes``: regions and diameter percentiles in pixels."""
    lines = [f"lesion sizes{(' - ' + title) if title else ''} (equivalent diameter, px)",
             "| lesion | regions | p10 | median | p90 | < 2 px |", "|---|---:|---:|---:|---:|---:|"]
    for k, d in sizes.items():
        p10, p50, p90 = np.percentile(d, [10, 50, 90])
        lines.append(f"| {k} | {len(d)} | {p10:.1f} | {p50:.1f} | {p90:.1f} | {100 * np.mean(d < 2):.0f} % |")
    return "\n".join(lines)
