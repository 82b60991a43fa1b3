"""Issue 10, items 17-19: the prompt playground converts a 16-bit upload like the dataset
path does, shows prompts as plain text (no mathtext), and decodes a huge upload at
reduced size. Each failed before the fix."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

from fundus_lab import widgets
from fundus_lab.data.images import read_image
from doubles import ColourModel, colour_image as _image

REPO = Path(__file__).resolve().parent.parent


def test_16_bit_png_upload_matches_the_dataset_conversion(tmp_path):
    grey = np.full((40, 40), 12000, np.uint16)  # 12000 / 65535 of full scale: ~47 in 8 bits
    grey[10:30, 10:30] = 30000
    path = tmp_path / "g16.png"
    Image.fromarray(grey).save(path)
    uploaded = np.asarray(widgets.load_image_bytes(path.read_bytes(), "g16.png"))
    assert uploaded.dtype == np.uint8 and uploaded.shape == (40, 40, 3)
    np.testing.assert_array_equal(uploaded, read_image(path))  # the dataset path's conversion
    assert abs(uploaded.mean() - (12000 * 0.75 + 30000 * 0.25) / 257) < 1  # not saturated at 255


def test_prompts_with_mathtext_are_plain_text_and_never_raise():
    data = [{"image": _image([1, 0, 0], [1, 0, 0])}]
    prompts = "red $\\undefinedmacro$\nblue $x^$"
    pg = widgets.PromptPlayground({"toy": data}, {"double": ColourModel()}, prompts=prompts)
    assert pg.message.value == "" and pg.figure.value[:4] == b"\x89PNG"
    assert pg.result.classes == ["red $\\undefinedmacro$", "blue $x^$"]
    fig = widgets.playground_figure(pg.result)
    fig.savefig(io.BytesIO(), format="png")  # the figure itself draws them as text
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert "red $\\undefinedmacro$" in titles


def test_a_huge_sparse_upload_is_decoded_at_reduced_size_and_memory(tmp_path):
    """A 6300 x 6300 PNG of ~0.15 MB: the decoded image is reduced to about MAX_SIDE, and
    the memory to load and prepare it stays far below the 3.2 GB it took before (measured
    here: ~0 MB above the baseline after the fix, ~2 GB before)."""
    script = textwrap.dedent("""
        import io, resource, sys
        import numpy as np
        from PIL import Image
        import torch.nn.functional
        import fundus_lab.data.images
        from fundus_lab import widgets  # imports first: the baseline is the process ready to decode
        arr = np.zeros((6300, 6300, 3), np.uint8)
        arr[2000:4000, 2000:4000] = (180, 60, 20)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        del arr
        data = buf.getvalue()
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        img = widgets.load_image_bytes(data, "big.png")
        widgets.image_tensor(img, 224)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(len(data), img.size[0], img.size[1], (peak - base) // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    size_bytes, w, h, extra_mb = map(int, out.stdout.split())
    assert size_bytes < 400_000
    assert max(w, h) <= 2 * widgets.MAX_SIDE and min(w, h) >= widgets.MAX_SIDE // 2
    assert extra_mb < 200, f"{extra_mb} MB above the baseline to load a {size_bytes}-byte upload"


def test_a_large_jpeg_uses_draft_decoding():
    arr = np.zeros((4000, 3000, 3), np.uint8)
    arr[1000:3000, 500:2500] = (200, 90, 40)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=80)
    img = widgets.load_image_bytes(buf.getvalue(), "big.jpg")
    assert max(img.size) <= 2 * widgets.MAX_SIDE and img.mode == "RGB"
    centre = np.asarray(img)[img.size[1] // 2, img.size[0] // 2]
    assert abs(int(centre[0]) - 200) < 10
