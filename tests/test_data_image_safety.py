"""Issue 16, items 7 and 11: an image is never silently blanked, and never costs gigabytes.

Item 7: a float image with NaN or Inf pixels used to read as all black (the maximum is NaN,
the scale is skipped, the cast gives 0); it is now an ImageError naming the file and the
count. Item 11: an 8000 x 8000 palette PNG of ~60 KB (under the 100-megapixel guard) cost
3.5 GB to decode; its decode cost is now estimated from the header and it is refused
before decoding, so one image stays under 1 GB of peak memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fundus_lab.data import images as I
from fundus_lab.data.images import ImageError

REPO = Path(__file__).resolve().parents[1]


def _float_tiff(path: Path, bad: float) -> Path:
    arr = np.full((16, 16), 0.5, np.float32)
    arr[3, 4] = bad
    arr[7, 7] = bad
    Image.fromarray(arr, mode="F").save(path)
    return path


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_mode_f_image_with_non_finite_pixels_is_refused_naming_file_and_count(tmp_path, bad):
    path = _float_tiff(tmp_path / "f.tif", bad)
    with pytest.raises(ImageError, match=r"f\.tif: 2 of 256 pixel value\(s\) are NaN or Inf"):
        I.read_image(path)


@pytest.mark.parametrize("shape", [(8, 8), (8, 8, 3), (8, 8, 4)])
def test_as_rgb8_refuses_non_finite_arrays_instead_of_blanking(shape):
    arr = np.full(shape, 0.5, np.float64)
    arr[(1,) * len(shape)] = np.nan
    with pytest.raises(ImageError, match=r"data.npz\[3\]: 1 of \d+ pixel value\(s\) are NaN or Inf"):
        I.as_rgb8(arr, "data.npz[3]")
    good = I.as_rgb8(np.full(shape, 0.5))  # finite floats still scale as before
    assert good.min() == good.max() == (64 if shape == (8, 8, 4) else 128)  # alpha 0.5 composites to half


def test_npz_dataset_item_with_a_nan_pixel_names_the_npz_and_index(tmp_path):
    import yaml

    from fundus_lab.data import open_dataset

    images = np.full((4, 8, 8, 3), 0.6, np.float32)
    images[2, 1, 1, 0] = np.nan
    np.savez(tmp_path / "data.npz", train_images=images, train_labels=np.array([0, 1, 0, 1]))
    manifest = {"name": "tiny", "task": "multiclass", "metric": "accuracy",
                "classes": [{"name": "normal", "key": "normal"}, {"name": "glaucoma", "key": "glaucoma"}],
                "sources": [{"annotations": "data.npz", "format": "npz", "npz_splits": ["train"]}],
                "split": {"fractions": {"train": 0.5, "val": 0.25, "test": 0.25}, "seed": 1}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(manifest))
    ds = open_dataset(tmp_path / "tiny.yaml", split=None, image_size=8)
    i = next(k for k, r in enumerate(ds.records) if r.meta["npz_index"] == 2)
    with pytest.raises(ImageError, match=r"data.npz\[train_images\]\[2\]: 1 of 192 pixel value"):
        ds.load_image(i)


def palette_bomb(path: Path, side: int = 8000) -> Path:
    """A mostly-black palette PNG: tens of KB on disk, ``side``^2 pixels once decoded."""
    arr = np.zeros((side, side), np.uint8)
    arr[side // 2, side // 2] = 1
    im = Image.fromarray(arr, "P")
    im.putpalette([0, 0, 0, 200, 80, 40] + [0] * 762)
    im.save(path, optimize=True)
    return path


def test_palette_png_of_8000_pixels_stays_under_1gb_peak(tmp_path):
    path = palette_bomb(tmp_path / "bomb.png")
    assert path.stat().st_size < 100_000 and 8000 * 8000 < I.MAX_PIXELS
    probe = textwrap.dedent(f"""
        import resource, time
        from fundus_lab.data import images as I
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.time()
        try:
            I.load_tensor({str(path)!r}, image_size=32)
            print("decoded")
        except I.ImageError as err:
            print("refused:", err)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print("delta_kb", peak - base, "seconds", round(time.time() - t0, 2))
    """)
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "refused:" in out and "bomb.png: 8000 x 8000 P would take about" in out and "MAX_DECODE_BYTES" in out
    delta_kb = int(out.split("delta_kb ")[1].split()[0])
    assert delta_kb < 1_000_000, out  # ru_maxrss is in KiB on Linux: under 1 GB above baseline


def test_decode_estimate_lets_ordinary_fundus_photographs_through():
    # a 12 MP RGB photograph (IDRiD) and a 12 MP RGBA PNG are under the limit; the bomb is not
    for mode, size, ok in [("RGB", (4288, 2848), True), ("RGBA", (4288, 2848), True), ("P", (8000, 8000), False),
                           ("I;16", (4000, 4000), True)]:
        im = Image.new(mode, (1, 1))
        im._size = size  # the header's size, as Image.open reports it before decoding
        assert (I.decode_bytes(im) <= I.MAX_DECODE_BYTES) is ok, (mode, size, I.decode_bytes(im))


def test_large_jpeg_is_decoded_reduced_and_counted_at_the_reduced_size(tmp_path, monkeypatch):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (2400, 2400), (120, 60, 30)).save(path, quality=80)
    monkeypatch.setattr(I, "MAX_DECODE_BYTES", 2400 * 2400 * 6)  # the full size would be refused
    with pytest.raises(ImageError, match=r"big.jpg: 2400 x 2400 RGB would take"):
        I.read_image(path)
    assert I.read_image(path, draft_size=300).shape[0] <= 600  # reduced decode: accepted


def test_opaque_palette_image_reads_as_before(tmp_path):
    arr = (np.arange(64).reshape(8, 8) % 3).astype(np.uint8)
    im = Image.fromarray(arr, "P")
    im.putpalette([10, 20, 30, 200, 100, 50, 0, 255, 0] + [0] * 759)
    im.save(tmp_path / "p.png")
    want = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(I.read_image(tmp_path / "p.png"), want)


def test_a_palette_upload_with_transparency_is_reduced_before_conversion():
    """The prompt playground's upload path (widgets.load_image_bytes) with a 6000 x 6000
    palette PNG with a transparent entry: it used to go through the RGBA float conversion
    at full size (1.9 GB above baseline, measured); the palette is now expanded and reduced first."""
    script = textwrap.dedent("""
        import io, json, resource
        import numpy as np
        from PIL import Image
        from fundus_lab import widgets
        arr = np.zeros((6000, 6000), np.uint8)
        arr[2000:4000, 2000:4000] = 1
        im = Image.fromarray(arr, "P")
        im.putpalette([0, 0, 0, 180, 60, 20] + [0] * 762)
        buf = io.BytesIO()
        im.save(buf, format="PNG", transparency=0)
        del arr, im
        data = buf.getvalue()
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        img = widgets.load_image_bytes(data, "pal.png")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        centre = np.asarray(img)[img.size[1] // 2, img.size[0] // 2].tolist()
        print(json.dumps({"bytes": len(data), "side": max(img.size), "centre": centre, "extra_mb": (peak - base) // 1024}))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    from fundus_lab import widgets

    assert got["bytes"] < 200_000 and got["side"] <= 2 * widgets.MAX_SIDE
    assert got["centre"] == [180, 60, 20]  # the opaque centre keeps its colour
    assert got["extra_mb"] < 1000, got  # was 1944 MB
