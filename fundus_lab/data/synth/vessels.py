"""The retinal artery/vein tree: growth from the disc and anti-aliased rasterisation.

Trunks leave the disc in superior and inferior temporal arcades that curve around the
macula, plus smaller nasal and macular branches. Each branch is a smooth random walk

    theta(s) = theta0 + turn * (1 - exp(-s / L)) + kappa * s + W(s),   r(s) = r0 exp(-s / T)

(W a smoothed Brownian motion), sampled every half pixel, so a vessel is a dense list of
centre-line points with radii. Branches spawn thinner children (r_child ~ 0.5-0.75 r)
at Poisson-distributed points and stop at the FOV edge, at the foveal avascular zone or
when thinner than a third of a pixel. Veins are wider (artery:vein ~ 2:3) and darker.

Rasterising: the centre-line points are dropped on the pixel grid, one Euclidean distance
transform finds each pixel's nearest point, and the exact distance d to that point's
sub-pixel position gives the coverage clip(r - d + 0.5, 0, 1): anti-aliased vessels at
the cost of one EDT per width class, whatever the number of branches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from .anatomy import Anatomy, Canvas, Frame, quadrant_of

VEIN_TINT = np.array([0.70, 0.45, 0.55], np.float32)
ARTERY_TINT = np.array([0.90, 0.72, 0.78], np.float32)

# name, theta0 (deg), turn (deg), L, kappa (deg/R), length (R), vein r0 (R), artery r0 (R), branch rate (/R)
TRUNKS = (
    ("superotemporal", -98, -80, 0.45, -6, 1.8, 0.0165, 0.0115, 4.5),
    ("inferotemporal", 98, 80, 0.45, 6, 1.8, 0.0165, 0.0115, 4.5),
    ("superonasal", -62, 18, 0.35, 0, 1.0, 0.0115, 0.0085, 3.5),
    ("inferonasal", 62, -18, 0.35, 0, 1.0, 0.0115, 0.0085, 3.5),
    ("nasal", 6, 0, 0.30, 0, 0.7, 0.0065, 0.0055, 2.0),
    ("macular", 170, 0, 0.30, 30, 0.45, 0.0045, 0.0038, 3.0),
)


@dataclass
class Branch:
    kind: str            # "artery" | "vein"
    trunk: str           # which trunk it descends from
    depth: int
    pts: np.ndarray      # [n, 2] canonical (u, v)
    r: np.ndarray        # [n] canonical radius
    s: np.ndarray        # [n] arc length from the branch start


@dataclass
class VesselTree:
    branches: list[Branch] = field(default_factory=list)

    def of(self, kind: str, max_depth: int = 99):
        return [b for b in self.branches if b.kind == kind and b.depth <= max_depth]

    def points(self, kind: str, max_depth: int = 99):
        bs = self.of(kind, max_depth)
        if not bs:
            return np.zeros((0, 2), np.float32), np.zeros(0, np.float32)
        return np.concatenate([b.pts for b in bs]), np.concatenate([b.r for b in bs])


def _walk(rng, frame: Frame, anat: Anatomy, start, theta0, turn, L, kappa, length, r0,
          noise, taper, wiggle=0.0, side=0):
    """One branch as dense centre-line points; stops at FOV, fovea or vanishing radius.

    ``wiggle`` (R) displaces the path sideways by a sum of two sines: tortuosity that
    keeps the vessel's course, unlike a larger heading noise, which would make it drift.
    """
    ds = 0.5 / frame.radius
    n = max(int(length / ds), 2)
    s = np.arange(n, dtype=np.float32) * ds
    step = 0.03
    nc = int(length / step) + 2
    walk = np.cumsum(rng.normal(0.0, noise * np.sqrt(step), nc))
    theta = theta0 + turn * (1 - np.exp(-s / L)) + kappa * s + np.interp(s, np.arange(nc) * step, walk)
    pts = np.empty((n, 2), np.float32)
    pts[:, 0] = start[0] + np.cumsum(np.cos(theta)) * ds
    pts[:, 1] = start[1] + np.cumsum(np.sin(theta)) * ds
    if wiggle > 0:
        lam = rng.uniform(0.07, 0.13, 2)
        off = wiggle * (np.sin(2 * np.pi * s / lam[0] + rng.uniform(0, 6.3))
                        + 0.5 * np.sin(2 * np.pi * s / lam[1] + rng.uniform(0, 6.3)))
        off *= np.clip(s / 0.1, 0, 1)                      # leaves the disc straight
        pts[:, 0] -= np.sin(theta) * off
        pts[:, 1] += np.cos(theta) * off
    r = r0 * np.exp(-s / taper)
    fu, fv = anat.fovea
    faz = 0.35 * anat.disc_diameter
    # Temporal of the fovea, vessels of the upper (side -1) and lower (+1) arcade never
    # cross the horizontal raphe.
    crossed = (pts[:, 0] < fu - 0.05) & (side * (pts[:, 1] - fv) < -0.02) if side else np.zeros(n, bool)
    stop = (crossed | (pts[:, 0] ** 2 + pts[:, 1] ** 2 > 0.985 ** 2)
            | ((pts[:, 0] - fu) ** 2 + (pts[:, 1] - fv) ** 2 < faz ** 2)
            | (r * frame.radius < 0.3))
    end = int(np.argmax(stop)) if stop.any() else n
    return pts[:end], r[:end].astype(np.float32), s[:end], theta[:end]


def _grow(rng, frame, anat, tree, kind, trunk, depth, start, theta0, turn, L, kappa, length,
          r0, rate, noise, taper, max_depth, wiggle=0.0, side=0):
    pts, r, s, theta = _walk(rng, frame, anat, start, theta0, turn, L, kappa, length, r0, noise, taper, wiggle, side)
    if len(pts) < 3:
        return
    # Children at Poisson points along the branch; the parent thins after each split.
    total = float(s[-1])
    k = rng.poisson(rate * total) if depth < max_depth else 0
    at = np.sort(rng.uniform(0.06, max(total, 0.061), k)) if k else np.zeros(0)
    for a in at:
        i = int(np.searchsorted(s, a))
        if i >= len(s) - 2:
            continue
        side = rng.choice([-1.0, 1.0])
        r_child = float(r[i]) * rng.uniform(0.45, 0.75)
        _grow(rng, frame, anat, tree, kind, trunk, depth + 1, pts[i], float(theta[i]) + side * np.deg2rad(rng.uniform(30, 70)),
              np.deg2rad(rng.uniform(-20, 20)), 0.2, np.deg2rad(rng.uniform(-25, 25)),
              rng.uniform(0.35, 1.0) * (1.0 - 0.2 * depth), r_child, rate * 0.7, max(noise, 0.35) * 1.3,
              taper * 0.7, max_depth, wiggle * 0.6, side)
        r[i:] *= 0.92
    tree.branches.append(Branch(kind, trunk, depth, pts, r, s))


def grow_vessels(rng: np.random.Generator, frame: Frame, anat: Anatomy, *, artery_scale: float = 1.0,
                 artery_noise: float = 1.0, tortuous: tuple = (), vein_scale: float = 1.0) -> VesselTree:
    """Grow arteries and veins from the disc.

    Args:
        artery_scale: radius factor of every artery (< 1: arteriolar narrowing).
        artery_noise: heading-noise factor of arteries (< 1: straighter).
        tortuous: trunk names whose veins are dilated and tortuous (vein occlusion).
        vein_scale: radius factor of every vein.
    """
    tree = VesselTree()
    dd = anat.disc_diameter
    for name, th0, turn, L, kappa, length, rv, ra, rate in TRUNKS:
        for kind in ("vein", "artery"):
            noise = 0.3 if kind == "vein" else 0.25 * artery_noise
            r0 = 1.15 * (rv * vein_scale if kind == "vein" else ra * artery_scale)
            wiggle = 0.0
            if kind == "vein" and name in tortuous:
                wiggle, r0 = 0.007, r0 * 1.35
            th = np.deg2rad(th0 + rng.uniform(-9, 9))
            off = 0.12 * dd * np.array([np.cos(th), np.sin(th)])
            start = np.array(anat.disc) + anat.cup_offset + off + rng.normal(0, 0.01, 2)
            _grow(rng, frame, anat, tree, kind, name, 0, start, th,
                  np.deg2rad(turn * rng.uniform(0.85, 1.15)), L * rng.uniform(0.85, 1.2),
                  np.deg2rad(kappa * rng.uniform(0.7, 1.3)), length * rng.uniform(0.85, 1.1),
                  r0 * rng.uniform(0.9, 1.1), rate, noise, 1.6, 3, wiggle,
                  -1 if name.startswith("supero") else (1 if name.startswith("infero") else 0))
    return tree


def rasterize(frame: Frame, pts: np.ndarray, r: np.ndarray):
    """Coverage [S, S] in [0, 1] of tubes of radius r (canonical) around centre points,
    and the normalised distance d / r to the centre line (for the arterial light reflex)."""
    size = frame.size
    if len(pts) == 0:
        return np.zeros((size, size), np.float32), np.full((size, size), 9.0, np.float32)
    x, y = frame.to_px(pts[:, 0], pts[:, 1])
    rp = r * frame.radius
    ix, iy = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
    ok = (ix >= 0) & (ix < size) & (iy >= 0) & (iy < size)
    # Several points share a pixel: the widest wins, and among equals the one nearest the
    # pixel centre, so distances along a straight vessel are exact.
    dc = np.hypot(x - ix, y - iy)
    order = np.lexsort((-dc[ok], rp[ok]))
    ix, iy, x, y, rp = ix[ok][order], iy[ok][order], x[ok][order], y[ok][order], rp[ok][order]
    free = np.ones((size, size), bool)
    fx = np.zeros((size, size), np.float32)
    fy = np.zeros_like(fx)
    fr = np.zeros_like(fx)
    free[iy, ix] = False
    fx[iy, ix], fy[iy, ix], fr[iy, ix] = x, y, rp
    ny, nx = ndi.distance_transform_edt(free, return_distances=False, return_indices=True)
    ax = np.arange(size, dtype=np.float32)
    d = np.hypot(ax[None, :] - fx[ny, nx], ax[:, None] - fy[ny, nx])
    rr = fr[ny, nx]
    return np.clip(rr - d + 0.5, 0.0, 1.0), d / np.maximum(rr, 1e-3)


def _coverage(frame, branches):
    """Max coverage over two width classes, so thin children do not notch thick parents."""
    if not branches:
        return rasterize(frame, np.zeros((0, 2)), np.zeros(0))
    pts = np.concatenate([b.pts for b in branches])
    r = np.concatenate([b.r for b in branches])
    thick = r * frame.radius >= 1.2
    c1, d1 = rasterize(frame, pts[thick], r[thick])
    c2, d2 = rasterize(frame, pts[~thick], r[~thick])
    return np.maximum(c1, c2), np.where(c1 >= c2, d1, d2)


def apply_beading(rng, tree: VesselTree, anat: Anatomy, quadrants: set[str], frame: Frame) -> list[Branch]:
    """Sausage-like calibre changes, r * (1 + 0.55 sin(2 pi s / lambda)), on the parts of
    major veins that lie in ``quadrants``; returns the beaded pieces (for the mask)."""
    pieces = []
    for b in tree.of("vein", max_depth=1):
        q = quadrant_of(anat, b.pts[:, 0], b.pts[:, 1])
        sel = np.isin(q, list(quadrants)) & (b.r > 0.45 * b.r[0]) & (b.r * frame.radius > 0.5)
        sel &= np.hypot(b.pts[:, 0] - anat.disc[0], b.pts[:, 1] - anat.disc[1]) > anat.disc_diameter
        if sel.sum() < 6:
            continue
        lam = rng.uniform(0.035, 0.055)
        mod = 1.0 + 0.55 * np.sin(2 * np.pi * b.s / lam + rng.uniform(0, 6.3))
        b.r = np.where(sel, b.r * mod * 1.15, b.r).astype(np.float32)
        pieces.append(Branch("vein", b.trunk, b.depth, b.pts[sel], b.r[sel], b.s[sel]))
    return pieces


def render_vessels(rng: np.random.Generator, canvas: Canvas, tree: VesselTree, anat: Anatomy, *,
                   av_nicking: int = 0, narrowing_mask: bool = False,
                   beaded: list[Branch] = (), tortuous: tuple = ()) -> list[tuple[float, float]]:
    """Draw veins, then arteries over them (arteries cross over veins).

    With ``av_nicking`` > 0, that many artery-over-vein crossings pinch the vein (its
    radius drops to ~30% within ~2 artery widths either side). Returns the nicking sites.
    """
    frame = canvas.frame
    art_cov, art_d = _coverage(frame, tree.of("artery"))
    sites = []
    if av_nicking:
        # Crossings: major-vein points that lie under an artery wider than a pixel.
        cand = []
        for bi, b in enumerate(tree.of("vein", max_depth=2)):
            x, y = frame.to_px(b.pts[:, 0], b.pts[:, 1])
            ix = np.clip(np.rint(x).astype(int), 0, frame.size - 1)
            iy = np.clip(np.rint(y).astype(int), 0, frame.size - 1)
            hit = (art_cov[iy, ix] > 0.9) & (b.r * frame.radius > 0.9) & (b.s > 0.1)
            idx = np.flatnonzero(hit)
            if len(idx):
                # one site per run of consecutive hits
                starts = idx[np.r_[True, np.diff(idx) > 1]]
                cand += [(b, int(i)) for i in starts]
        if cand:
            pick = rng.permutation(len(cand))[:av_nicking]
            for j in pick:
                b, i = cand[j]
                w = 3.0 * float(b.r[i]) + 2.0 / frame.radius
                dist = np.abs(b.s - b.s[i])
                b.r = (b.r * (1.0 - 0.72 * np.exp(-(dist / w) ** 4))).astype(np.float32)
                sites.append((float(b.pts[i, 0]), float(b.pts[i, 1])))
                px, py = frame.to_px(*b.pts[i])
                rad = max(2.0 * float(b.r[i]) * frame.radius, 1.5)     # the pinched crossing
                win = canvas.window(px, py, rad + 1)
                if win:
                    sl, dx, dy = win
                    canvas.add_mask("av_nicking", sl, dx ** 2 + dy ** 2 <= rad ** 2)
    vein_cov, _ = _coverage(frame, tree.of("vein"))
    canvas.multiply(None, (slice(None), slice(None)), vein_cov, VEIN_TINT)
    canvas.multiply(None, (slice(None), slice(None)), art_cov, ARTERY_TINT)
    # the central light reflex of arteries wider than ~1.5 px
    reflex = art_cov * np.exp(-(art_d / 0.35) ** 2) * 0.10
    canvas.image += reflex[..., None] * np.array([1.0, 0.9, 0.9], np.float32)
    if narrowing_mask:
        canvas.add_mask("arteriolar_narrowing", (slice(None), slice(None)), art_cov > 0.5)
    if beaded:
        cov, _ = rasterize(frame, np.concatenate([b.pts for b in beaded]), np.concatenate([b.r for b in beaded]))
        canvas.add_mask("venous_beading", (slice(None), slice(None)), cov > 0.5)
    if tortuous:
        tv = [b for b in tree.of("vein") if b.trunk in tortuous and b.depth <= 1]
        if tv:
            cov, _ = _coverage(frame, tv)
            canvas.add_mask("venous_tortuosity", (slice(None), slice(None)), cov > 0.5)
    return sites
