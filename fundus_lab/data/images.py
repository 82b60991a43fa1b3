"""Fundus images from disk to a float tensor: decode, 8-bit RGB, field-of-view crop,
square, resize, and fundus-preserving augmentation.

Cameras differ most in what surrounds the retina: black borders of any width, a circular
field of view (FOV) cut at top and bottom, text burnt into a corner. Cropping to the FOV
and padding to a square makes every camera's image a centred disc of the same scale, so
a model learns the retina and not the border.

    rgb = read_image(path)                       # uint8 [H, W, 3]
    sq = prepare(rgb, 224)                       # uint8 [224, 224, 3], FOV centred
    x = to_tensor(sq)                            # float [3, 224, 224] in [0, 1]
    x = augment(x)                               # training only
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage

# larger than any fundus camera (IDRiD: 4288 x 2848 = 12 MP; FIVES 2048^2) by a wide
# margin, small enough that a hostile header cannot make us allocate gigabytes
MAX_PIXELS = 100_000_000
# the memory one image may take from decode to the resized square (issue 16, item 11): a
# 12 MP RGBA PNG needs about 0.7 GiB by decode_bytes(), an 8000 x 8000 palette PNG (61 KB
# on disk, under MAX_PIXELS) about 0.8 GiB and is refused before decoding; JPEG is decoded
# reduced (draft) first when the caller resizes anyway, and counted at the reduced size
MAX_DECODE_BYTES = 768 * 2**20
# bytes per pixel from the decoded image to uint8 RGB in _rgb8_from_pil: decoded + converted
# + our float intermediates (RGBA is composited in float32; 16/32-bit grey is scaled in float64)
_BYTES_PER_PIXEL = {"1": 7, "L": 7, "P": 7, "RGB": 6, "RGBA": 51, "LA": 51, "PA": 51, "RGBa": 51, "La": 51,
                    "I;16": 25, "I;16B": 25, "I;16L": 25, "I;16N": 25, "I": 35, "F": 35}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".ppm", ".webp")


class DataError(ValueError):
    """Bad input data (annotations or images); the message names the file and the field."""


class ImageError(DataError):
    """An image that is missing, corrupt, or too large to decode safely."""


def _refuse_non_finite(arr: np.ndarray, where: str) -> None:
    """Raise :class:`ImageError` when a float image holds NaN or Inf (issue 16, item 7).

    Scaling takes the image's maximum, which one NaN turns into NaN, and the cast then
    makes every pixel 0: a silently black image. There is no faithful value for a missing
    pixel, so the image is refused, naming how many pixels are not finite."""
    if arr.dtype.kind != "f":
        return
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise ImageError(f"image {where}: {bad} of {arr.size} pixel value(s) are NaN or Inf; "
                         "expected finite intensities (fix or drop the image)")


def decode_bytes(im: Image.Image) -> int:
    """Estimated peak bytes of turning ``im`` (opened, not loaded) into a prepared square:
    the decode and conversion (:data:`_BYTES_PER_PIXEL` of its mode; a palette with
    transparency is composited as RGBA) plus the padded square and its resize input.
    Read from the header only (size and mode), so it is known before anything is decoded."""
    w, h = im.size
    mode = "RGBA" if im.mode == "P" and "transparency" in im.info else im.mode
    return w * h * _BYTES_PER_PIXEL.get(mode, 10) + max(w, h) ** 2 * 3 * 2


def _rgb8_from_pil(im: Image.Image, where: str = "<image>") -> np.ndarray:
    """Any PIL mode -> uint8 [H, W, 3]. Alpha is composited on black (the fundus
    background); 16-bit and 32-bit grey are rescaled by their type's range, not stretched,
    so intensities stay comparable between images. A float (mode F) image with NaN or Inf
    pixels is refused (:func:`_refuse_non_finite`)."""
    mode = im.mode
    if mode in ("RGB",):
        return np.asarray(im, dtype=np.uint8)
    if mode == "P" and "transparency" not in im.info:  # opaque palette: no RGBA float detour
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    if mode in ("P", "PA"):
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        arr = np.asarray(im.convert("RGBA"), dtype=np.float32)
        rgb = arr[..., :3] * (arr[..., 3:4] / 255.0)
        return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im)
        if mode == "F":
            arr = np.asarray(arr, dtype=np.float64)
            _refuse_non_finite(arr, where)
            hi = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
            grey = arr / hi * 255.0
        elif mode == "I" and arr.max(initial=0) > 65535:
            grey = arr.astype(np.float64) / (2**32 - 1) * 255.0
        elif mode == "I" and arr.max(initial=0) <= 255:
            grey = arr.astype(np.float64)
        else:  # 16-bit
            grey = arr.astype(np.float64) / 257.0
        grey = np.clip(grey + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def read_image(
    path: Union[str, Path], max_pixels: Optional[int] = None, draft_size: Optional[int] = None
) -> np.ndarray:
    """Decode ``path`` to uint8 RGB [H, W, 3] (EXIF orientation applied).

    ``draft_size`` lets JPEG decode at a reduced scale (1/2 .. 1/8) when the image will be
    resized to about that size anyway: a 4288 x 2848 IDRiD photograph decodes ~8x faster.
    The pixel count is checked from the header before any decoding, against ``max_pixels``
    (default: the module's ``MAX_PIXELS``, read at call time so it can be raised), and so is
    the memory decoding would take (:func:`decode_bytes`) against ``MAX_DECODE_BYTES``.
    """
    max_pixels = MAX_PIXELS if max_pixels is None else max_pixels
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image file {path} does not exist")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except Image.DecompressionBombError:
            raise ImageError(
                f"image {path}: its header declares more than {Image.MAX_IMAGE_PIXELS} pixels "
                "(a decompression bomb or a corrupt header); expected a fundus photograph"
            ) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise ImageError(f"image {path} cannot be read as an image ({err}); expected PNG, JPEG or TIFF") from None
        with im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(
                    f"image {path}: {w} x {h} = {w * h} pixels exceeds the limit of {max_pixels} "
                    "(decompression-bomb guard); raise fundus_lab.data.images.MAX_PIXELS if it is genuine"
                )
            if w == 0 or h == 0:
                raise ImageError(f"image {path}: empty image ({w} x {h})")
            try:
                if draft_size and im.format == "JPEG":
                    im.draft("RGB", (draft_size, draft_size))
                need = decode_bytes(im)  # after draft: a JPEG counts at the size it will decode to
                if need > MAX_DECODE_BYTES:
                    raise ImageError(
                        f"image {path}: {w} x {h} {im.mode} would take about {need / 2**20:.0f} MiB to decode and "
                        f"prepare, over the limit of {MAX_DECODE_BYTES / 2**20:.0f} MiB (decode-memory guard); "
                        "shrink the file, or raise fundus_lab.data.images.MAX_DECODE_BYTES if the memory is there")
                im.load()
                im = ImageOps.exif_transpose(im)
                return _rgb8_from_pil(im, str(path))
            except ImageError:
                raise
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
                raise ImageError(f"image {path} is corrupt or truncated ({err})") from None


def as_rgb8(arr: np.ndarray, where: str = "<array>") -> np.ndarray:
    """An in-memory image (grey [H,W], [H,W,1], RGB, RGBA; uint8/uint16/float) -> uint8 RGB.
    A float image with NaN or Inf pixels is an :class:`ImageError` naming ``where``."""
    a = np.asarray(arr)
    _refuse_non_finite(a, where)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ImageError(f"{where}: expected an image array [H, W], [H, W, 3] or [H, W, 4], got shape {a.shape}")
    if a.dtype == np.uint16:
        a = a.astype(np.float64) / 257.0
    elif a.dtype.kind == "f":
        a = a * (255.0 if a.max(initial=0) <= 1.0 else 1.0)
    a = a.astype(np.float64)
    if a.shape[2] == 4:
        a = a[..., :3] * (a[..., 3:4] / 255.0)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------
# field of view


def fov_mask(rgb: np.ndarray, max_side: int = 256) -> tuple[np.ndarray, int]:
    """Boolean FOV mask of every k-th pixel, k = ceil(max(H, W) / max_side), and k.

    Luminance Y = 0.299 R + 0.587 G + 0.114 B, Gaussian-smoothed (sigma = 1% of the side,
    which removes JPEG noise and burnt-in text strokes), thresholded at
    t = max(0.04, 0.25 * median(Y | Y > 0.04)): well above a black border's noise, well
    below even a dark fundus's periphery. The largest connected component is the FOV.
    """
    h, w = rgb.shape[:2]
    step = max(1, math.ceil(max(h, w) / max_side))
    small = rgb[::step, ::step]  # plain subsampling: the Gaussian below does the smoothing
    y = small[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / 255.0
    y = ndimage.gaussian_filter(y, sigma=max(0.5, 0.01 * max(y.shape)))
    bright = y[y > 0.04]
    if bright.size == 0:
        return np.zeros(y.shape, bool), step
    t = max(0.04, 0.25 * float(np.median(bright)))
    mask = y > t
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
        mask = labels == (1 + int(np.argmax(sizes)))
    return mask, step


def fov_box(rgb: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) pixel bounds of the field of view, bottom/right exclusive.
    The whole image when no FOV is found (an all-black image stays as it is)."""
    h, w = rgb.shape[:2]
    mask, step = fov_mask(rgb)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return 0, h, 0, w
    # mask pixel i stands for image pixels [i * step, (i + 1) * step)
    top, bottom = int(rows[0]) * step, (int(rows[-1]) + 1) * step
    left, right = int(cols[0]) * step, (int(cols[-1]) + 1) * step
    return max(0, top), min(h, bottom), max(0, left), min(w, right)


def crop_to_fov(rgb: np.ndarray) -> np.ndarray:
    top, bottom, left, right = fov_box(rgb)
    return rgb[top:bottom, left:right]


def pad_to_square(rgb: np.ndarray) -> np.ndarray:
    """Centre on a black square of side max(H, W): a FOV cut at top/bottom stays a disc
    of the right diameter with its centre in the middle."""
    h, w = rgb.shape[:2]
    side = max(h, w)
    out = np.zeros((side, side, rgb.shape[2]), dtype=rgb.dtype)
    y0, x0 = (side - h) // 2, (side - w) // 2
    out[y0:y0 + h, x0:x0 + w] = rgb
    return out


def prepare(rgb: np.ndarray, image_size: int, fov_crop: bool = True) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> uint8 [S, S, 3]: FOV crop, pad to square, antialiased resize."""
    if fov_crop:
        rgb = crop_to_fov(rgb)
    sq = pad_to_square(rgb)
    if sq.shape[0] != image_size:
        resample = Image.BICUBIC if sq.shape[0] < image_size else Image.BILINEAR
        sq = np.asarray(Image.fromarray(sq).resize((image_size, image_size), resample, reducing_gap=3.0))
    return sq


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [0, 1]."""
    if not rgb.flags.writeable or not rgb.flags.c_contiguous:
        rgb = np.array(rgb, order="C")
    return torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)


# ---------------------------------------------------------------------------------------
# augmentation


def augment(
    x: torch.Tensor,
    rotation: float = 15.0,
    scale: tuple[float, float] = (1.0, 1.12),
    shift: float = 0.03,
    flip: bool = True,
    brightness: float = 0.15,
    contrast: float = 0.15,
    gamma: float = 0.15,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Random transform of a prepared fundus ``x`` [3, S, S] in [0, 1] that keeps it a fundus.

    Geometry: rotation in [-rotation, rotation] degrees, zoom in ``scale`` (>= 1, so the crop
    stays inside the FOV), shift up to ``shift`` of the side, horizontal flip (mirrors
    laterality: a left eye looks like a right eye, which disease labels do not depend on).
    Photometry, the same gain on all three channels so there is no hue shift:
    x' = clip(((b * x - m) * c + m) ** g) with b, c, g in [1 - a, 1 + a] and m the FOV mean.
    The background is re-blackened with the warped FOV mask. Draws from torch's RNG, which
    DataLoader seeds per worker.
    """
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"augment expects [3, H, W], got {tuple(x.shape)}")

    def u(lo: float, hi: float) -> float:
        return float(lo + (hi - lo) * torch.rand((), generator=generator))

    mask = (x.mean(0, keepdim=True) > 0.04).float()  # [1, S, S]
    angle = math.radians(u(-rotation, rotation))
    zoom = u(*scale)
    tx, ty = u(-shift, shift) * 2, u(-shift, shift) * 2  # normalised coords span 2
    sx = -1.0 if flip and u(0, 1) < 0.5 else 1.0
    cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
    theta = torch.tensor([[cos * sx, -sin, tx], [sin * sx, cos, ty]], dtype=x.dtype)[None]
    both = torch.cat([x, mask], 0)[None]  # [1, 4, S, S]
    grid = torch.nn.functional.affine_grid(theta, list(both.shape), align_corners=False)
    warped = torch.nn.functional.grid_sample(both, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    img, m = warped[:3], (warped[3:] > 0.5).float()
    b, c, g = u(1 - brightness, 1 + brightness), u(1 - contrast, 1 + contrast), u(1 - gamma, 1 + gamma)
    img = img * b
    mean = (img * m).sum() / (3 * m.sum()).clamp_min(1.0)
    img = ((img - mean) * c + mean).clamp(0.0, 1.0) ** g
    return (img * m).clamp_(0.0, 1.0)


def load_tensor(
    source: Union[str, Path, np.ndarray],
    image_size: int = 224,
    fov_crop: bool = True,
    train_augment: bool = False,
    max_pixels: Optional[int] = None,
    where: str = "<array>",
) -> torch.Tensor:
    """A file path or an in-memory array -> float [3, S, S] in [0, 1], ready for a model.
    ``where`` names an in-memory array in errors (the npz file and index it came from)."""
    if isinstance(source, np.ndarray):
        rgb = as_rgb8(source, where)
    else:
        rgb = read_image(source, max_pixels=max_pixels, draft_size=2 * image_size)
    x = to_tensor(prepare(rgb, image_size, fov_crop=fov_crop))
    return augment(x) if train_augment else x
