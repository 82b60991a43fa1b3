"""Exports a user can move and name (issue 19): the hf export is a transformers
VisionTextDualEncoderModel that transformers alone loads with our features; the open_clip
folder holds no absolute path and a copy loads with open_clip alone; the timm config names
the real size."""

import json
import shutil
import warnings

import pytest
import torch

from fundus_lab.export import export, timm_architecture
from doubles import CLIP_TEXTS as TEXTS, export_normalise as _normalise


def _features(out):
    return out if torch.is_tensor(out) else out.pooler_output  # transformers 5 returns the output object


def test_hf_export_is_a_dual_encoder_transformers_loads_with_equal_features(model, tmp_path):
    from transformers import AutoTokenizer, ViTImageProcessor, VisionTextDualEncoderModel

    export(model, tmp_path, format="hf")
    dual, info = VisionTextDualEncoderModel.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not [k for k in info["missing_keys"] if not k.endswith("position_ids")], info  # pooler.dense.* included
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    dual.eval()
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    processor = ViTImageProcessor.from_pretrained(str(tmp_path))
    x = torch.rand(3, 3, 32, 32)
    pixels = processor(images=list(x), do_rescale=False, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, _normalise(x), atol=1e-6, rtol=0)  # same size: resizing is a no-op
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        image = torch.nn.functional.normalize(_features(dual.get_image_features(pixel_values=pixels)), dim=-1)
        text = torch.nn.functional.normalize(_features(dual.get_text_features(**enc)), dim=-1)
        torch.testing.assert_close(image, model.encode_image(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(text, model.encode_text(TEXTS), atol=1e-5, rtol=0)
    assert float(dual.logit_scale.detach()) == pytest.approx(float(model.logit_scale.detach()))


def test_open_clip_export_moves_and_loads_with_open_clip_alone(model, tmp_path, monkeypatch):
    open_clip = pytest.importorskip("open_clip")
    from fundus_lab.models.external import load_external

    first, moved = tmp_path / "first", tmp_path / "elsewhere" / "moved"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "open_clip uses one LayerNorm eps")
        export(model, first, format="open_clip")
    config_text = (first / "open_clip_config.json").read_text()
    assert str(tmp_path) not in config_text
    text_cfg = json.loads(config_text)["model_cfg"]["text_cfg"]
    assert not text_cfg["hf_model_name"].startswith("/") and not text_cfg["hf_tokenizer_name"].startswith("/")
    shutil.copytree(first, moved)
    shutil.rmtree(first)  # nothing may still point at the old place
    x = torch.rand(2, 3, 32, 32)
    monkeypatch.chdir(moved)
    oc = open_clip.create_model("local-dir:.").eval()
    oc.visual.ln_post.eps = model.image_encoder.trunk.norm.eps
    tokenizer = open_clip.get_tokenizer("local-dir:.")
    with torch.no_grad():
        torch.testing.assert_close(oc.encode_image(_normalise(x), normalize=True), model.encode_image(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(oc.encode_text(tokenizer(TEXTS), normalize=True), model.encode_text(TEXTS),
                                   atol=1e-5, rtol=0)
    monkeypatch.chdir(tmp_path)  # fundus_lab's loader finds text/ beside the config from anywhere
    loaded = load_external(moved)
    loaded.model.visual.ln_post.eps = model.image_encoder.trunk.norm.eps
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(TEXTS), model.encode_text(TEXTS), atol=1e-5, rtol=0)


def test_timm_export_names_the_real_architecture(model, tmp_path):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "the image encoder's LayerNorm eps")
        export(model, tmp_path, format="timm")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert "base" not in cfg["architecture"] and cfg["architecture"] == "vit_tiny_patch16_224"  # nearest size, width 32
    assert cfg["fundus_lab_architecture"] == "vit_w32_d2_h2_patch16_32"
    small = dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0)
    assert timm_architecture(small) == "vit_small_patch16_224"
    assert timm_architecture(dict(small, embed_dim=768, num_heads=12, patch_size=8)) == "vit_base_patch8_224"
    assert timm_architecture(dict(small, depth=6)) == "vit_small_patch16_224"  # nearest by width; model_args say depth 6
