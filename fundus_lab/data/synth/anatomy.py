"""Geometry and anatomy of a synthetic fundus: frame, background, optic disc, macula.

Everything is placed in *canonical retinal coordinates* (u, v), in units of the field-of-
view radius R, with the image y axis (v grows downwards, superior is v < 0) and the eye
drawn as a right eye: the optic disc is nasal, at +u, the macula temporal. A left eye is
its mirror image, so ``Frame.to_px`` maps u to x with the sign of the eye; the drawing
code never needs to know the laterality.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from scipy import ndimage as ndi

# Linear RGB-ish reflectances in [0, 1], measured on skimage.data.retina() (a left eye).
FUNDUS_RGB = np.array([0.90, 0.30, 0.19], np.float32)   # mid-periphery background
DISC_RGB = np.array([0.97, 0.64, 0.42], np.float32)     # neuro-retinal rim, yellow-pink
CUP_RGB = np.array([1.00, 0.92, 0.78], np.float32)      # pale cup


@dataclass
class Frame:
    """Where the retina lies in the image: FOV centre (cx, cy) and radius R in pixels.

    ``side`` is +1 for a right eye (disc on the image's right) and -1 for a left eye.
    """

    size: int
    cx: float
    cy: float
    radius: float
    side: int = 1
    _grid: Optional[tuple] = field(default=None, repr=False, compare=False)

    def to_px(self, u, v):
        """Canonical (u, v) in units of R -> pixel (x, y)."""
        return self.cx + self.side * self.radius * np.asarray(u), self.cy + self.radius * np.asarray(v)

    def vec_px(self, du, dv):
        """A canonical direction/offset -> pixel offset (mirrors u for a left eye)."""
        return self.side * self.radius * np.asarray(du), self.radius * np.asarray(dv)

    def grid(self):
        """(U, V): canonical coordinates of every pixel centre, float32 [S, S] each."""
        if self._grid is None:
            ax = np.arange(self.size, dtype=np.float32)
            u = (ax - self.cx) * (self.side / self.radius)
            v = (ax - self.cy) / self.radius
            self._grid = (np.broadcast_to(u[None, :], (self.size, self.size)),
                          np.broadcast_to(v[:, None], (self.size, self.size)))
        return self._grid

    def fov(self, soft: float = 1.0) -> np.ndarray:
        """Field-of-view weight in [0, 1], anti-aliased over ``soft`` pixels."""
        u, v = self.grid()
        r_px = np.sqrt(u * u + v * v) * self.radius
        return np.clip((self.radius - r_px) / soft + 0.5, 0.0, 1.0)


@dataclass
class Anatomy:
    """Per-eye anatomy, canonical units (R). ``cdr`` is the vertical cup-to-disc ratio."""

    fovea: tuple[float, float]
    disc: tuple[float, float]
    disc_rx: float
    disc_ry: float
    cdr: float
    cup_offset: tuple[float, float] = (0.0, 0.0)
    notch: Optional[str] = None          # "superior" | "inferior" | None
    pigment: float = 1.0                 # background darkness factor
    hue: float = 0.0                     # -1 yellower .. +1 redder
    foveal_reflex: float = 0.5
    tessellation: float = 0.0            # 0 none .. 1 strong tigroid pattern

    @property
    def disc_diameter(self) -> float:
        return self.disc_rx + self.disc_ry


def sample_anatomy(rng: np.random.Generator, cdr: float, *, age: float, myopic: bool = False,
                   notch: Optional[str] = None, tessellation: float = 0.0) -> Anatomy:
    """Disc ~0.25 R wide, fovea ~2.5 disc diameters temporal of it (knowledge.md)."""
    dd = rng.uniform(0.23, 0.28)
    ry = dd / 2 * rng.uniform(1.03, 1.12)        # vertically oval
    rx = dd / 2 * rng.uniform(0.9, 0.98)
    if myopic:                                   # tilted disc: narrower horizontally
        rx *= rng.uniform(0.72, 0.85)
    fovea = (rng.uniform(-0.1, 0.0), rng.uniform(-0.04, 0.04))
    dist = 2.5 * dd * rng.uniform(0.95, 1.08)
    disc = (fovea[0] + dist, fovea[1] - rng.uniform(0.0, 0.07))
    young = float(np.clip((60 - age) / 40, 0, 1))
    return Anatomy(
        fovea=fovea, disc=disc, disc_rx=rx, disc_ry=ry, cdr=float(cdr),
        cup_offset=(rng.uniform(-0.08, 0.12) * rx, rng.uniform(-0.08, 0.08) * ry),
        notch=notch, pigment=rng.uniform(0.88, 1.1), hue=rng.uniform(-1, 1),
        foveal_reflex=young * rng.uniform(0.4, 1.0), tessellation=tessellation)


class Canvas:
    """A float RGB image in [0, 1] plus the boolean lesion masks drawn on it.

    Lesions paint through ``multiply`` (absorbing: blood, pigment) or ``blend`` (a
    colour: exudates, drusen) into a window of the image, and each call ORs
    ``alpha > mask_threshold`` into the mask of its lesion key.

    ``lesion_scale`` and ``lesion_contrast`` (1.0: realistic) are read by the lesion
    painters, so that a benchmark rendered at a low working resolution can keep its
    small lesions visible: sizes are multiplied by the scale, and the contrast acts as
    ``contrast`` layers of the same absorber (multiply) or paint (blend).
    """

    def __init__(self, frame: Frame, image: np.ndarray, lesion_scale: float = 1.0, lesion_contrast: float = 1.0):
        self.frame = frame
        self.image = image
        self.masks: dict[str, np.ndarray] = {}
        self.lesion_scale = float(lesion_scale)
        self.lesion_contrast = float(lesion_contrast)

    def window(self, px: float, py: float, rad: float):
        """Slices and pixel offsets (dx [1, w], dy [h, 1]) of a square around (px, py)."""
        s = self.frame.size
        x0, x1 = max(int(np.floor(px - rad)), 0), min(int(np.ceil(px + rad)) + 1, s)
        y0, y1 = max(int(np.floor(py - rad)), 0), min(int(np.ceil(py + rad)) + 1, s)
        if x0 >= x1 or y0 >= y1:
            return None
        dx = (np.arange(x0, x1, dtype=np.float32) - px)[None, :]
        dy = (np.arange(y0, y1, dtype=np.float32) - py)[:, None]
        return (slice(y0, y1), slice(x0, x1)), dx, dy

    def add_mask(self, key: str, sl, m: np.ndarray) -> None:
        if key not in self.masks:
            self.masks[key] = np.zeros((self.frame.size,) * 2, bool)
        self.masks[key][sl] |= m

    def multiply(self, key, sl, alpha, tint, mask_threshold=0.35, contrast: float = 1.0) -> None:
        """image *= (1 - alpha * (1 - tint)) ** contrast: ``contrast`` stacked filters of
        transmittance ``tint`` (RGB); the mask follows ``alpha``, whatever the contrast."""
        a = alpha[..., None]
        f = 1.0 - a * (1.0 - np.asarray(tint, np.float32))
        self.image[sl] *= f if contrast == 1.0 else f ** np.float32(contrast)
        if key:
            self.add_mask(key, sl, alpha > mask_threshold)

    def blend(self, key, sl, alpha, colour, mask_threshold=0.35, contrast: float = 1.0) -> None:
        """image = (1 - a) * image + a * colour with a = 1 - (1 - alpha) ** contrast
        (``contrast`` coats of the paint); the mask follows ``alpha``."""
        a = alpha if contrast == 1.0 else 1.0 - (1.0 - np.clip(alpha, 0, 1)) ** np.float32(contrast)
        a = a[..., None]
        self.image[sl] = self.image[sl] * (1.0 - a) + a * np.asarray(colour, np.float32)
        if key:
            self.add_mask(key, sl, alpha > mask_threshold)


def band_noise(rng: np.random.Generator, shape, sigma: float, lo: Optional[float] = None) -> np.ndarray:
    """Gaussian-filtered white noise (band-pass when ``lo`` is given), unit std."""
    n = rng.standard_normal(shape).astype(np.float32)
    out = ndi.gaussian_filter(n, sigma, mode="wrap")
    if lo is not None:
        out = out - ndi.gaussian_filter(n, lo, mode="wrap")
    return out / (out.std() + 1e-6)


def tessellation_pattern(rng: np.random.Generator, frame: Frame) -> np.ndarray:
    """Choroidal vessel pattern in [0, 1] (1 on a choroidal vessel).

    Zero crossings of band-pass noise form a net of worm-like ridges, which is how the
    large choroidal vessels look through a thin pigment epithelium.
    """
    s = frame.size
    scale = frame.radius / 100.0
    n = band_noise(rng, (s, s), 1.6 * scale, lo=5.0 * scale)
    return np.exp(-(n / 0.8) ** 2)


def render_background(rng: np.random.Generator, frame: Frame, anat: Anatomy) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Orange-red fundus with granular choroidal texture, vignetting, macula and disc glow.

    Returns the image [S, S, 3] float32 and the tessellation pattern (or None).
    """
    s = frame.size
    u, v = frame.grid()
    r2 = u * u + v * v
    base = FUNDUS_RGB * np.array([1.0, 1.0 - 0.12 * anat.hue, 1.0 - 0.2 * anat.hue], np.float32)
    base = base / anat.pigment
    scale = frame.radius / 100.0
    # Shading: a gently darker periphery (the eye is a sphere lit from the pupil).
    shade = 1.0 - 0.22 * r2 ** 1.5
    # Granular texture at two scales; green/blue vary a bit more than red.
    fine = band_noise(rng, (s, s), 0.7 * scale)
    coarse = band_noise(rng, (s, s), 9.0 * scale)
    tex = 1.0 + 0.018 * fine + 0.018 * coarse
    img = base[None, None, :] * (shade * tex)[..., None]
    img[..., 1:] *= (1.0 + 0.02 * coarse)[..., None]
    # Macula: darker, more pigmented; fovea darkest.
    fu, fv = anat.fovea
    df2 = ((u - fu) ** 2 + (v - fv) ** 2) / anat.disc_diameter ** 2
    mac = 0.42 * np.exp(-df2 / (2 * 0.55 ** 2)) + 0.15 * np.exp(-df2 / (2 * 0.15 ** 2))
    img *= (1.0 - mac[..., None] * np.array([0.25, 0.85, 1.0], np.float32))
    # A lighter sheen around the disc and along the arcades (nerve fibre layer reflex).
    du_, dv_ = u - anat.disc[0], v - anat.disc[1]
    glow = np.exp(-(du_ ** 2 / 0.09 + dv_ ** 2 / 0.25))
    img *= (1.0 + 0.12 * glow[..., None] * np.array([0.3, 1.0, 1.0], np.float32))
    pattern = None
    if anat.tessellation > 0:
        pattern = tessellation_pattern(rng, frame)
        t = anat.tessellation
        # dark pigment between lighter orange choroidal vessels
        img *= (1.0 - t * (1.0 - pattern)[..., None] * np.array([0.16, 0.3, 0.3], np.float32))
        img *= (1.0 + t * 0.15 * pattern[..., None] * np.array([1.0, 0.6, 0.4], np.float32))
    if anat.foveal_reflex > 0:
        r_px = np.sqrt((u - fu) ** 2 + (v - fv) ** 2) * frame.radius
        refl = anat.foveal_reflex * 0.35 * np.exp(-(r_px / max(0.9 * scale, 0.7)) ** 2)
        img += refl[..., None] * np.array([0.6, 0.8, 0.8], np.float32)
    return img.astype(np.float32), pattern


def disc_geometry(frame: Frame, anat: Anatomy, margin: float = 2.0):
    """Window around the disc and elliptic radii there: (sl, rho_disc, rho_cup, theta).

    ``rho`` is the normalised elliptic radius (1 on the boundary); theta is the canonical
    polar angle around the cup centre (0 nasal, -pi/2 superior).
    """
    s = frame.size
    px, py = frame.to_px(*anat.disc)
    rad = margin * max(anat.disc_rx, anat.disc_ry) * frame.radius
    x0, x1 = max(int(px - rad), 0), min(int(px + rad) + 2, s)
    y0, y1 = max(int(py - rad), 0), min(int(py + rad) + 2, s)
    sl = (slice(y0, y1), slice(x0, x1))
    u, v = frame.grid()
    du, dv = u[sl] - anat.disc[0], v[sl] - anat.disc[1]
    rho_disc = np.sqrt((du / anat.disc_rx) ** 2 + (dv / anat.disc_ry) ** 2)
    cu, cv = du - anat.cup_offset[0], dv - anat.cup_offset[1]
    theta = np.arctan2(cv, cu)
    cup_ry = anat.cdr * anat.disc_ry
    cup_rx = anat.cdr * anat.disc_rx * 0.95
    rho_cup = np.sqrt((cu / cup_rx) ** 2 + (cv / cup_ry) ** 2)
    if anat.notch:
        # Rim notch: the cup reaches towards one pole (inferior v>0 or superior v<0).
        pole = np.pi / 2 if anat.notch == "inferior" else -np.pi / 2
        ang = np.angle(np.exp(1j * (theta - pole)))
        stretch = 1.0 + 0.55 * np.exp(-(ang / 0.45) ** 2)
        rho_cup = rho_cup / stretch
    return sl, rho_disc, rho_cup, theta


def render_disc(canvas: Canvas, anat: Anatomy, glaucomatous: bool = False) -> np.ndarray:
    """Paint the rim and the paler cup; return the optic-disc mask.

    A glaucomatous cup (enlarged, notched) is also recorded as ``glaucomatous_cupping``.
    """
    frame = canvas.frame
    sl, rho_d, rho_c, _ = disc_geometry(frame, anat)
    edge_px = 1.0 / (max(anat.disc_rx, anat.disc_ry) * frame.radius)
    a_disc = np.clip((1.0 - rho_d) / (2.5 * edge_px) + 0.5, 0, 1)
    # rim is brighter towards the cup, with a soft halo outside
    halo = np.exp(-np.clip(rho_d - 1, 0, None) ** 2 / 0.03) * (rho_d > 1) * 0.35
    rim_col = DISC_RGB * np.array([1.0, 0.93, 0.93], np.float32)
    canvas.blend(None, sl, np.maximum(a_disc * 0.92, halo), rim_col)
    a_cup = np.clip((1.0 - rho_c) / 0.15, 0, 1) * a_disc
    canvas.blend("glaucomatous_cupping" if glaucomatous else None, sl, a_cup * 0.95, CUP_RGB,
                 mask_threshold=0.5)
    disc_mask = np.zeros((frame.size,) * 2, bool)
    disc_mask[sl] = rho_d <= 1.0
    return disc_mask


def render_ppa(rng: np.random.Generator, canvas: Canvas, anat: Anatomy, width: float) -> None:
    """Peripapillary atrophy: a pale crescent at the temporal disc margin (canonical -u)."""
    frame = canvas.frame
    sl, rho_d, _, theta = disc_geometry(frame, anat, margin=2.0 + width)
    half = rng.uniform(0.9, 1.6)                        # angular half-width (rad)
    ang = np.angle(np.exp(1j * (theta - np.pi)))        # 0 at temporal
    ext = width * np.clip(1 - (ang / half) ** 2, 0, 1)  # crescent, widest temporally
    inside = (rho_d > 0.97) & (rho_d < 1.0 + ext)
    edge = np.clip((1.0 + ext - rho_d) * 12, 0, 1) * np.clip((rho_d - 0.97) * 20, 0, 1)
    a = edge * inside * rng.uniform(0.65, 0.85)
    canvas.blend("peripapillary_atrophy", sl, a, np.array([0.93, 0.78, 0.6], np.float32))
    # a pigmented border on the outer edge
    border = np.exp(-((rho_d - 1.0 - ext) * 25) ** 2) * (ext > 0.05)
    canvas.multiply(None, sl, border * 0.5, np.array([0.45, 0.35, 0.3], np.float32))


QUADRANTS = ("superotemporal", "inferotemporal", "superonasal", "inferonasal")


def quadrant_of(anat: Anatomy, u, v) -> np.ndarray:
    """Retinal quadrant of canonical points, split by horizontal and vertical lines
    through the fovea (superior: v above the fovea; temporal: away from the disc)."""
    u, v = np.asarray(u), np.asarray(v)
    sup = v < anat.fovea[1]
    temp = u < anat.fovea[0]
    out = np.where(sup, np.where(temp, QUADRANTS[0], QUADRANTS[2]), np.where(temp, QUADRANTS[1], QUADRANTS[3]))
    return out
