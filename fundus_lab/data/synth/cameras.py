"""Camera profiles: how a fundus camera turns retinal reflectance into pixels.

Each profile sets the field of view (diameter as a fraction of the image side, and its
offset), colour balance (per-channel gains), gamma, lens vignetting, optical blur,
sensor noise and JPEG compression. Real datasets differ along exactly these axes, so a
model trained on some profiles and tested on the held-out one faces a real domain shift.
The held-out profile (``HELD_OUT``) mimics a hand-held/smartphone fundus camera: greener
and flatter colour, stronger vignetting, softer optics, more noise and heavy JPEG.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image
from scipy import ndimage as ndi


@dataclass(frozen=True)
class CameraProfile:
    name: str
    gains: tuple[float, float, float]   # RGB white balance
    gamma: float                        # output = input ** (1 / gamma)
    exposure: float                     # global gain
    vignetting: float                   # brightness loss at the FOV edge
    blur: float                         # Gaussian sigma, in % of the FOV radius
    noise: float                        # sensor noise std (of [0, 1] intensities)
    jpeg_quality: int                   # 0: no compression
    fov: float                          # FOV diameter / image side (>1 crops top/bottom)
    offset: tuple[float, float] = (0.0, 0.0)   # FOV centre offset, fraction of the side
    held_out: bool = False


CAMERAS: dict[str, CameraProfile] = {
    "topcon": CameraProfile("topcon", (1.0, 1.0, 1.0), 1.0, 1.0, 0.25, 0.25, 0.006, 95, 0.96),
    "canon": CameraProfile("canon", (1.02, 1.08, 0.95), 1.15, 1.08, 0.15, 0.2, 0.004, 90, 1.06, (0.0, 0.0)),
    "zeiss": CameraProfile("zeiss", (1.04, 0.9, 0.95), 0.92, 0.92, 0.35, 0.45, 0.008, 85, 0.9, (0.015, -0.01)),
    "kowa": CameraProfile("kowa", (0.98, 1.0, 1.1), 1.05, 1.0, 0.28, 0.35, 0.01, 80, 0.94, (-0.01, 0.01)),
    "handheld": CameraProfile("handheld", (0.86, 1.18, 0.96), 1.3, 0.95, 0.6, 1.1, 0.025, 45, 0.82,
                              (0.03, 0.02), held_out=True),
}
HELD_OUT = "handheld"
TRAIN_CAMERAS = tuple(k for k, c in CAMERAS.items() if not c.held_out)


def get_camera(camera) -> CameraProfile:
    if isinstance(camera, CameraProfile):
        return camera
    if camera not in CAMERAS:
        raise KeyError(f"unknown camera {camera!r}; expected one of {sorted(CAMERAS)}")
    return CAMERAS[camera]


REFERENCE = "topcon"


def shift_camera(cam: CameraProfile, strength: float = 1.0, reference: str = REFERENCE) -> CameraProfile:
    """``cam`` moved towards (strength < 1) or past (> 1) the reference profile.

    Every optical parameter becomes ``ref + strength * (cam - ref)``: 1.0 is the profile
    as defined, 0.0 makes every camera the reference one (no domain shift). A benchmark
    that must be learnable on a small budget can soften the held-out camera's shift
    without dropping it.
    """
    if strength < 0:
        raise ValueError(f"camera_shift: expected a strength >= 0, got {strength}")
    if strength == 1.0:
        return cam
    ref = get_camera(reference)

    def mix(a, b):
        return float(a + strength * (b - a))

    return replace(
        cam, gains=tuple(mix(a, b) for a, b in zip(ref.gains, cam.gains)), gamma=mix(ref.gamma, cam.gamma),
        exposure=mix(ref.exposure, cam.exposure), vignetting=mix(ref.vignetting, cam.vignetting),
        blur=max(mix(ref.blur, cam.blur), 0.0), noise=max(mix(ref.noise, cam.noise), 0.0),
        jpeg_quality=int(round(min(max(mix(ref.jpeg_quality, cam.jpeg_quality), 1), 95))) if cam.jpeg_quality else 0,
        fov=mix(ref.fov, cam.fov), offset=tuple(mix(a, b) for a, b in zip(ref.offset, cam.offset)))


def jitter(rng: np.random.Generator, cam: CameraProfile) -> CameraProfile:
    """Per-photo variation within a camera: exposure, white balance, FOV placement."""
    g = np.asarray(cam.gains) * np.exp(rng.normal(0, 0.03, 3))
    return replace(cam, gains=tuple(float(x) for x in g),
                   exposure=float(cam.exposure * np.exp(rng.normal(0, 0.08))),
                   offset=(cam.offset[0] + rng.normal(0, 0.01), cam.offset[1] + rng.normal(0, 0.01)))


def frame_geometry(cam: CameraProfile, size: int) -> tuple[float, float, float]:
    """FOV centre (cx, cy) and radius in pixels."""
    c = (size - 1) / 2
    return c + cam.offset[0] * size, c + cam.offset[1] * size, cam.fov * size / 2


def apply_camera(rng: np.random.Generator, cam: CameraProfile, image: np.ndarray, fov: np.ndarray,
                 radius: float, u2: np.ndarray) -> np.ndarray:
    """Reflectance [S, S, 3] float -> uint8 photo [S, S, 3] through the camera.

    ``fov`` is the FOV weight (outside it: black), ``u2`` the squared canonical radius.
    """
    img = image * np.asarray(cam.gains, np.float32) * cam.exposure
    img *= (1.0 - cam.vignetting * np.clip(u2, 0, 1) ** 1.5)[..., None]
    if cam.blur > 0:
        sigma = cam.blur * radius / 100.0
        img = np.stack([ndi.gaussian_filter(img[..., c], sigma) for c in range(3)], -1)
    img = np.clip(img, 0, 1) ** (1.0 / cam.gamma)
    if cam.noise > 0:
        img = img + rng.normal(0, cam.noise, img.shape[:2] + (1,)).astype(np.float32) \
            + rng.normal(0, cam.noise * 0.5, img.shape).astype(np.float32)
    img = np.clip(img * fov[..., None], 0, 1)
    out = (img * 255 + 0.5).astype(np.uint8)
    if cam.jpeg_quality:
        buf = io.BytesIO()
        Image.fromarray(out).save(buf, format="JPEG", quality=int(cam.jpeg_quality))
        out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).copy()
    return out
