"""fundus_lab.widgets: prompt parsing, upload checks, scoring against hand-computed values, widget callbacks.

``ColourModel`` is a test double with the model contract's interface whose embeddings are
readable by hand: an image (or patch) embeds as its mean RGB colour, a text as the colour
words it contains. A red image must then prefer "red" with p = softmax(s * [1, 0]).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from doubles import ColourModel, colour_image as _image
from fundus_lab import widgets


def _png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def test_parse_prompts_lines_and_separators():
    text = "# colours\nred | crimson; scarlet\n\n  green  \nblue;;navy\n"
    assert widgets.parse_prompts(text) == {"red": ["red", "crimson", "scarlet"], "green": ["green"], "blue": ["blue", "navy"]}
    with pytest.raises(widgets.PromptError, match="at least two classes"):
        widgets.parse_prompts("only one | class")
    with pytest.raises(widgets.PromptError, match="line 3: class 'red' was already given on line 1"):
        widgets.parse_prompts("red\ngreen\nred | again")
    assert widgets.parse_prompts(widgets.format_prompts([["a", "b", "c", "d"], ["e"]])) == {"a": ["a", "b", "c"], "e": ["e"]}


def test_load_image_bytes_accepts_png_jpeg_and_refuses_the_rest(monkeypatch):
    arr = np.full((20, 30, 3), 200)
    assert widgets.load_image_bytes(_png(arr)).size == (30, 20)
    assert widgets.load_image_bytes(_png(arr, "JPEG")).mode == "RGB"
    with pytest.raises(widgets.ImageInputError, match="notes.txt: not an image"):
        widgets.load_image_bytes(b"hello, not a picture", "notes.txt")
    with pytest.raises(widgets.ImageInputError, match="GIF images are not accepted"):
        widgets.load_image_bytes(_png(arr, "GIF"), "a.gif")
    with pytest.raises(widgets.ImageInputError, match="empty"):
        widgets.load_image_bytes(b"", "e.png")
    monkeypatch.setattr(widgets, "MAX_UPLOAD_BYTES", 100)
    with pytest.raises(widgets.ImageInputError, match="too large; the limit"):
        widgets.load_image_bytes(b"x" * 101, "big.png")
    monkeypatch.setattr(widgets, "MAX_UPLOAD_BYTES", 10**9)
    monkeypatch.setattr(widgets, "MAX_PIXELS", 100)
    with pytest.raises(widgets.ImageInputError, match="30x20 pixels is too large"):
        widgets.load_image_bytes(_png(arr), "wide.png")


def test_score_matches_hand_computation():
    model = ColourModel(scale=10.0)
    red = _image([1, 0, 0], [1, 0, 0])
    res = widgets.score(model, red, "red | crimson red\ngreen")
    assert res.classes == ["red", "green"]
    # class red: both prompts embed as ~[1,0,0]; green as ~[0,1,0]; image = [1,0,0]
    expected = torch.softmax(torch.tensor([1.0, 0.0]) * 10.0, 0).numpy()
    np.testing.assert_allclose(res.probs, expected, atol=1e-3)
    assert [m.shape for m in res.prompt_maps] == [(2, 2, 2), (1, 2, 2)]
    # left half red, right half green: the "red" prompt map is hot on the left column only
    split = widgets.score(model, _image([1, 0, 0], [0, 1, 0]), {"red": ["red"], "green": ["green"]})
    np.testing.assert_allclose(split.prompt_maps[0][0], [[1, 0], [1, 0]], atol=1e-2)
    np.testing.assert_allclose(split.prompt_maps[1][0], [[0, 1], [0, 1]], atol=1e-2)
    np.testing.assert_allclose(split.probs, [0.5, 0.5], atol=1e-6)
    assert model.training  # score restores the mode it found
    fig = widgets.playground_figure(split)
    assert len(fig.axes) >= 3
    assert "fl-prob" in widgets.probability_html(split)


def test_score_resizes_any_input_image():
    model = ColourModel()
    res = widgets.score(model, Image.fromarray(np.full((40, 50, 3), (0, 0, 255), np.uint8)), "blue\nred")
    assert res.image.shape == (16, 16, 3) and res.probs[0] > 0.99


def _probs(pg) -> dict[str, float]:
    return dict(pg.result.table())


def test_playground_callbacks_rescore_and_report_errors():
    data = [{"image": _image([1, 0, 0], [1, 0, 0])}, {"image": _image([0, 0, 1], [0, 0, 1])}]
    pg = widgets.PromptPlayground({"toy": data}, {"double": ColourModel()}, prompts="red\nblue")
    assert pg.index.max == 1
    assert _probs(pg)["red"] > 0.99 and "red" in pg.probabilities.value and pg.figure.value[:4] == b"\x89PNG"

    pg.index.value = 1  # second image is blue
    assert _probs(pg)["blue"] > 0.99

    pg.prompts.value = "red\ngreen\nblue | navy blue"
    assert list(_probs(pg)) == ["red", "green", "blue"] and _probs(pg)["blue"] > 0.99
    assert "green" in pg.probabilities.value

    pg.prompts.value = "just one class"
    assert "at least two classes" in pg.message.value
    pg.prompts.value = "red\nblue"
    assert pg.message.value == ""

    pg.on_upload(({"name": "readme.txt", "content": memoryview(b"plain text")},))
    assert "readme.txt: not an image" in pg.message.value and pg.uploaded is None

    green = np.zeros((24, 24, 3), np.uint8)
    green[..., 1] = 255
    pg.prompts.value = "red\ngreen"
    pg.on_upload(({"name": "g.png", "content": memoryview(_png(green))},))
    assert pg.message.value == "" and _probs(pg)["green"] > 0.99
    pg.clear_upload()  # back to dataset image 1, blue: neither red nor green, so a tie
    np.testing.assert_allclose(list(_probs(pg).values()), [0.5, 0.5], atol=1e-6)


# ---------------------------------------------------------------------------------------
# with a real (tiny, random) FundusVLM saved and loaded as a checkpoint

TINY = dict(
    img_size=32, patch_size=16, vision_width=32, vision_depth=1, vision_heads=2, text_width=32, text_depth=1,
    text_heads=2, text_max_length=32, embed_dim=16, fusion_depth=1, fusion_heads=2, decoder_width=32,
    decoder_depth=1, decoder_heads=2, text_decoder_depth=1, caption_depth=1,
)


def _real_checkpoint(tmp_path, method: str):
    import yaml

    from fundus_lab.config import from_dict
    from fundus_lab.data.tokenizer import train_tokenizer
    from fundus_lab.models import MethodConfig, ModelConfig, build_model
    from fundus_lab.experiment.store import project_root

    texts = ["normal fundus", "diabetic retinopathy with haemorrhages", "glaucoma with a large cup", "drusen at the macula"]
    data = yaml.safe_load((project_root() / "configs" / "methods" / f"{method}.yaml").read_text())
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY), from_dict(MethodConfig, data["method"]), train_tokenizer(texts * 2, vocab_size=120))
    return model.save_pretrained(tmp_path / method)


def test_playground_with_a_real_checkpoint(tmp_path):
    from fundus_lab import load_model

    path = _real_checkpoint(tmp_path, "clip")
    images = [{"image": torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i))} for i in range(2)]
    pg = widgets.PromptPlayground({"random": images}, {"clip": str(path)}, prompts="normal fundus | healthy retina\nglaucoma")
    assert pg.message.value == "", pg.message.value
    res = pg.result
    assert res.probs.sum() == pytest.approx(1.0, abs=1e-5)
    assert [m.shape for m in res.prompt_maps] == [(2, 2, 2), (1, 2, 2)]  # 32 px / 16 px patches

    # independent reference: p = softmax(s * <z, normalise(mean of prompt embeddings)>)
    model = load_model(path).eval()
    with torch.no_grad():
        z = model.encode_image(images[0]["image"][None])
        t = torch.stack([
            torch.nn.functional.normalize(model.encode_text(["normal fundus", "healthy retina"]).mean(0), dim=-1),
            model.encode_text(["glaucoma"])[0],
        ])
        expected = torch.softmax(model.logit_scale.exp().clamp(max=100) * (z @ t.T)[0], 0)
        patches = torch.nn.functional.normalize(model.image_proj(model.image_features(images[0]["image"][None])["tokens"]), dim=-1)
        glaucoma_map = (patches[0] @ t[1]).reshape(2, 2)
    np.testing.assert_allclose(res.probs, expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(res.prompt_maps[1][0], glaucoma_map.numpy(), atol=1e-5)

    before = res.probs.copy()
    pg.prompts.value = "normal fundus\nglaucoma\ndrusen at the macula"
    assert len(pg.result.probs) == 3 and not np.allclose(pg.result.probs[:2], before)


def test_playground_reports_a_model_without_text(tmp_path):
    path = _real_checkpoint(tmp_path, "mae")
    pg = widgets.PromptPlayground({"random": [{"image": torch.rand(3, 32, 32)}]}, {"mae": str(path)}, prompts="a\nb")
    assert pg.result is None and "fl-error" in pg.message.value and "mae" in pg.message.value
