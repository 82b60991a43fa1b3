"""Export round trips: the image tower loads in timm, the text tower in transformers, the
pair in open_clip's layout, each giving the features of the fundus_lab model."""

import json
import warnings

import pytest
import timm
import torch
from transformers import AutoModel, AutoTokenizer

from doubles import CLIP_TEXTS as TEXTS, CLIP_TINY as TINY, export_normalise as _normalise
from fundus_lab.export import ExportError, export, export_text_hf
from fundus_lab.models import MethodConfig, ModelConfig, build_model


def test_timm_export_round_trip(model, tmp_path):
    with warnings.catch_warnings():  # today's final norm uses eps 1e-5, timm's 1e-6 (the towers rewrite aligns it)
        warnings.filterwarnings("ignore", "the image encoder's LayerNorm eps")
        export(model, tmp_path, format="timm")
    cfg = json.loads((tmp_path / "config.json").read_text())
    args = cfg["model_args"]
    vit = timm.create_model(cfg["architecture"], pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors")), **args).eval()
    local = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    for m in (vit, local):  # the recorded eps makes the features exact
        m.norm.eps = cfg["fundus_lab_layer_norm_eps"]["norm"]
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        ours = model.image_features(x)["cls"]
        torch.testing.assert_close(vit(_normalise(x)), ours, atol=1e-5, rtol=0)
        torch.testing.assert_close(local(_normalise(x)), ours, atol=1e-5, rtol=0)
    assert local.pretrained_cfg["mean"] == list(TINY["image_mean"])


def test_hf_text_export_round_trip(model, tmp_path):
    export_text_hf(model, tmp_path)  # the text tower alone (format="hf" is the dual encoder: test_export_conventions)
    bert, tok = AutoModel.from_pretrained(str(tmp_path)).eval(), AutoTokenizer.from_pretrained(str(tmp_path))
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        ids, attn = model.tokenize(TEXTS)
        torch.testing.assert_close(enc["input_ids"], ids)
        ours = model.text_encoder(ids, attn)["tokens"]
        torch.testing.assert_close(bert(**enc).last_hidden_state, ours, atol=1e-5, rtol=0)


def test_open_clip_export_round_trip(model, tmp_path):
    pytest.importorskip("open_clip", reason="open_clip not installed (pip install 'fundus_lab[external]')")
    import open_clip

    from fundus_lab.models.external import load_external

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "open_clip uses one LayerNorm eps")
        export(model, tmp_path, format="open_clip")
    loaded = load_external(tmp_path)
    with pytest.MonkeyPatch.context() as mp:  # open_clip resolves the relative text/ folder from the working directory
        mp.chdir(tmp_path)
        oc = open_clip.create_model(f"local-dir:{tmp_path}").eval()  # open_clip's own loader reads the folder too
    for m in (loaded.model, oc):
        m.visual.ln_post.eps = model.image_encoder.trunk.norm.eps
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(x), model.encode_image(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(loaded.encode_text(TEXTS), model.encode_text(TEXTS), atol=1e-5, rtol=0)
        tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path}")
        torch.testing.assert_close(oc.encode_image(_normalise(x), normalize=True), model.encode_image(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(oc.encode_text(tokenizer(TEXTS), normalize=True), model.encode_text(TEXTS), atol=1e-5, rtol=0)
    assert float(loaded.logit_scale.detach()) == pytest.approx(float(model.logit_scale.detach()))


def test_export_errors_say_why(tmp_path):
    mae = build_model(ModelConfig(**TINY), MethodConfig(name="mae", contrastive_weight=0.0, caption_weight=0.0,
                                                        cross_attention=False))
    with pytest.raises(ExportError, match="no Hugging Face text tower"):
        export(mae, tmp_path / "hf", format="hf")
    with pytest.raises(ExportError, match="format='onnx'"):
        export(mae, tmp_path / "x", format="onnx")
    pytest.importorskip("open_clip")
    with pytest.raises(ExportError, match="not an architecture open_clip"):
        export(mae, tmp_path / "oc", format="open_clip")


def test_fl_export_is_callable(model, tmp_path):
    import fundus_lab as fl

    assert fl.export(model, tmp_path, format="hf") == tmp_path
    assert (tmp_path / "config.json").is_file() and fl.export.FORMATS == ("hf", "timm", "open_clip")
