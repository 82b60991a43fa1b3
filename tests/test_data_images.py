"""Image decoding, field-of-view crop, and augmentation, against hand-made references and
a real fundus photograph (``skimage.data.retina()``)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from fundus_lab.data import images as I


@pytest.fixture(scope="module")
def retina():
    skdata = pytest.importorskip("skimage.data")
    return skdata.retina()  # 1411 x 1411 RGB fundus photograph on black


def _save(arr_or_img, path, **kw):
    im = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    im.save(path, **kw)
    return path


# ---------------------------------------------------------------------------------------
# decoding


def test_grey_rgba_palette_16bit_become_8bit_rgb(tmp_path):
    grey = np.array([[0, 128], [200, 255]], np.uint8)
    out = I.read_image(_save(grey, tmp_path / "g.png"))
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    assert (out == grey[..., None]).all()

    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[..., 3] = [[255, 0], [128, 255]]
    out = I.read_image(_save(rgba, tmp_path / "a.png"))
    assert out[0, 0].tolist() == [200, 100, 50] and out[0, 1].tolist() == [0, 0, 0]  # on black
    assert out[1, 0].tolist() == [100, 50, 25]  # 128/255 of the colour, rounded

    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.putdata([0, 1])
    out = I.read_image(_save(pal, tmp_path / "p.png"))
    assert out[0, 1].tolist() == [10, 200, 30]

    for ext in ("png", "tif"):
        sixteen = np.array([[0, 257 * 128], [65535, 257]], np.uint16)
        out = I.read_image(_save(Image.fromarray(sixteen), tmp_path / f"s16.{ext}"))
        assert out[..., 0].tolist() == [[0, 128], [255, 1]], ext  # scaled by 255/65535, not stretched


def test_in_memory_arrays():
    assert I.as_rgb8(np.full((2, 2), 0.5, np.float32))[0, 0].tolist() == [128, 128, 128]
    assert I.as_rgb8(np.full((2, 2, 1), 65535, np.uint16))[0, 0].tolist() == [255, 255, 255]
    with pytest.raises(I.ImageError, match="shape"):
        I.as_rgb8(np.zeros((2, 2, 5), np.uint8))


def test_missing_corrupt_and_truncated_files_name_the_file(tmp_path):
    with pytest.raises(I.ImageError, match="nope.png does not exist"):
        I.read_image(tmp_path / "nope.png")
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not an image at all")
    with pytest.raises(I.ImageError, match="junk.jpg cannot be read"):
        I.read_image(junk)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(I.ImageError, match="cut.jpg is corrupt or truncated"):
        I.read_image(cut)


def _png_header_only(path, w, h):
    """A PNG whose header claims w x h pixels with (almost) no data: a decompression bomb
    shape that must be refused from the header, before any allocation."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [12_000, 60_000])  # above our limit / above PIL's own error
def test_decompression_bomb_is_a_clear_error(tmp_path, side):
    bomb = _png_header_only(tmp_path / "bomb.png", side, side)
    with pytest.raises(I.ImageError, match=r"bomb\.png.*(pixels|decompression)"):
        I.read_image(bomb)


def test_pixel_limit_is_configurable(tmp_path, monkeypatch):
    path = _save(np.zeros((40, 40, 3), np.uint8), tmp_path / "x.png")
    with pytest.raises(I.ImageError, match="1600 pixels exceeds the limit of 1000"):
        I.read_image(path, max_pixels=1000)
    monkeypatch.setattr(I, "MAX_PIXELS", 1500)
    with pytest.raises(I.ImageError, match="limit of 1500"):
        I.load_tensor(path, 8)


def test_jpeg_draft_decodes_at_reduced_scale(tmp_path):
    path = _save(np.full((800, 1200, 3), 120, np.uint8), tmp_path / "big.jpg")
    small = I.read_image(path, draft_size=200)
    assert 200 <= min(small.shape[:2]) < 800  # libjpeg scaled it down, not below the request


# ---------------------------------------------------------------------------------------
# field of view


@pytest.mark.parametrize("pad", [(0, 0, 0, 0), (40, 40, 40, 40), (300, 10, 5, 200), (0, 500, 600, 0)])
def test_fov_box_on_a_real_fundus_with_black_borders(retina, pad):
    top, bottom, left, right = pad
    ref = I.fov_box(retina)
    # the retina photograph's disc nearly fills the frame, with a dark margin
    h, w = retina.shape[:2]
    assert ref[0] >= 0 and ref[1] <= h and (ref[1] - ref[0]) > 0.8 * h and (ref[3] - ref[2]) > 0.8 * w
    padded = np.pad(retina, ((top, bottom), (left, right), (0, 0)))
    box = I.fov_box(padded)
    tol = 0.012 * max(padded.shape[:2])  # the mask is computed at 256 px: about one mask pixel
    assert abs(box[0] - (ref[0] + top)) <= tol and abs(box[1] - (ref[1] + top)) <= tol
    assert abs(box[2] - (ref[2] + left)) <= tol and abs(box[3] - (ref[3] + left)) <= tol
    # after crop, square and resize, borders of any size give the same picture
    a = I.prepare(retina, 64).astype(float)
    b = I.prepare(padded, 64).astype(float)
    assert np.abs(a - b).mean() < 4.0


def test_fov_cut_at_top_and_bottom_becomes_a_centred_disc(retina):
    t, b, l, r = I.fov_box(retina)
    cut = retina[t + 200 : b - 200]  # the camera cut the circle at top and bottom
    framed = np.pad(cut, ((0, 0), (150, 150), (0, 0)))  # black at the sides only
    box = I.fov_box(framed)
    assert box[0] == 0 and box[1] == framed.shape[0]  # the FOV touches top and bottom
    assert abs(box[2] - (l + 150)) < 20 and abs(box[3] - (r + 150)) < 20
    sq = I.prepare(framed, 100)
    assert sq.shape == (100, 100, 3)
    rows = sq.mean(axis=(1, 2))
    assert rows[:5].max() < 2 and rows[-5:].max() < 2  # black bands added above and below
    assert rows[50] > 20
    band_top = np.argmax(rows > 2)
    band_bottom = np.argmax(rows[::-1] > 2)
    assert abs(band_top - band_bottom) <= 2  # centred vertically


def test_all_black_image_is_left_whole():
    black = np.zeros((30, 40, 3), np.uint8)
    assert I.fov_box(black) == (0, 30, 0, 40)
    assert I.prepare(black, 8).shape == (8, 8, 3)


def test_text_in_a_corner_is_not_part_of_the_fov():
    img = np.zeros((200, 200, 3), np.uint8)
    yy, xx = np.mgrid[:200, :200]
    img[(yy - 110) ** 2 + (xx - 110) ** 2 < 60**2] = (180, 90, 40)
    img[2:10, 2:40] = 255  # burnt-in label text
    top, bottom, left, right = I.fov_box(img)
    assert 45 <= top <= 55 and 165 <= bottom <= 175 and 45 <= left <= 55 and 165 <= right <= 175


def test_to_tensor_and_load_tensor(tmp_path, retina):
    x = I.to_tensor(np.array([[[0, 128, 255]]], np.uint8))
    assert x.shape == (3, 1, 1) and x.dtype == torch.float32
    assert torch.allclose(x.flatten(), torch.tensor([0.0, 128 / 255, 1.0]))
    path = _save(retina[::4, ::4], tmp_path / "r.jpg")
    t = I.load_tensor(path, 32)
    assert t.shape == (3, 32, 32) and 0.0 <= float(t.min()) and float(t.max()) <= 1.0


# ---------------------------------------------------------------------------------------
# augmentation


def test_augment_keeps_a_fundus_a_fundus(retina):
    x = I.to_tensor(I.prepare(retina, 64))
    g = torch.Generator().manual_seed(0)
    fov = x.mean(0) > 0.04
    ratio = (x[0][fov].mean() / x[1][fov].mean()).item()
    outs = [I.augment(x, generator=g) for _ in range(8)]
    for y in outs:
        assert y.shape == x.shape and float(y.min()) >= 0.0 and float(y.max()) <= 1.0
        assert float(y[:, :3, :3].abs().max()) == 0.0  # corners stay black
        m = y.mean(0) > 0.04
        r = (y[0][m].mean() / y[1][m].mean()).item()
        assert abs(r - ratio) / ratio < 0.2  # red/green balance kept: no hue shift
        assert 0.5 < m.float().mean() / fov.float().mean() < 1.2  # the disc stays about as big
    assert not torch.allclose(outs[0], outs[1])
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(I.augment(x, generator=g1), I.augment(x, generator=g2))


def test_augment_with_no_change_is_identity():
    x = torch.rand(3, 16, 16) * 0.5 + 0.3
    y = I.augment(x, rotation=0, scale=(1, 1), shift=0, flip=False, brightness=0, contrast=0, gamma=0)
    assert torch.allclose(x, y, atol=1e-5)
