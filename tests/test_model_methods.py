"""Every method config: forward, backward, one optimizer step, save/load (timm-style sweep)."""

import math
import pickle
from pathlib import Path

import pytest
import torch
import yaml

from fundus_lab.config import Config, from_dict
from fundus_lab.data.tokenizer import train_tokenizer
from fundus_lab.models import FundusVLM, MethodConfig, ModelConfig, build_model, load_model

METHOD_DIR = Path(__file__).resolve().parents[1] / "configs" / "methods"
METHODS = sorted(p.stem for p in METHOD_DIR.glob("*.yaml"))
TEXTS = [
    "moderate diabetic retinopathy with dot and blot haemorrhages",
    "normal fundus, no abnormality",
    "glaucoma: enlarged cup with a thin rim",
    "cataract, hazy blurred image of the retina",
]
TINY = dict(
    img_size=32, patch_size=16, vision_width=32, vision_depth=2, vision_heads=2, text_width=32, text_depth=2,
    text_heads=2, text_max_length=32, embed_dim=16, fusion_depth=1, fusion_heads=2, decoder_width=32,
    decoder_depth=1, decoder_heads=2, text_decoder_depth=1, caption_depth=1,
)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS * 2, vocab_size=200)


def method_config(name: str, **over) -> MethodConfig:
    path = METHOD_DIR / f"{name}.yaml"
    data = yaml.safe_load(path.read_text())
    from_dict(Config, data, str(path))  # the whole file fits the run config schema
    cfg = from_dict(MethodConfig, data["method"], str(path))
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(name, tokenizer, seed=0, **over) -> FundusVLM:
    torch.manual_seed(seed)
    if name == "vilref":
        over.setdefault("queue_size", 6)
    return build_model(ModelConfig(**TINY), method_config(name, **over), tokenizer)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(4, 8)
    labels[[0, 1, 2, 3], [1, 0, 2, 1]] = 1  # samples 0 and 3 share a category
    return {"image": torch.rand(4, 3, 32, 32, generator=g), "text": list(TEXTS), "label": labels}


def test_every_expected_method_has_a_config():
    expected = {"clip", "coca", "eva", "mae", "flair", "vilref", "ours", "ours-no-mim", "ours-no-caption", "ours-no-xattn"}
    assert expected <= set(METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_forward_backward_and_one_step(name, tokenizer):
    model = tiny_model(name, tokenizer).train()
    out = model(batch())
    terms = {k: v for k, v in out.items() if k.endswith("_loss")}
    assert terms, "no loss term"
    assert all(torch.isfinite(v) for v in out.values())
    assert torch.allclose(out["loss"], sum(terms.values()))  # pre-weighted terms sum to the total
    out["loss"].backward()

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.optim.SGD(trainable.values(), lr=0.5).step()
    unchanged = [n for n, p in trainable.items() if torch.equal(p, before[n])]
    assert not unchanged, f"{name}: parameters that did not train: {unchanged}"
    assert all(torch.equal(p, before[n]) for n, p in frozen.items())

    # frozen teacher / momentum encoders: exactly the modules that must not train
    frozen_roots = {n.split(".")[0] for n in frozen}
    expect = {"eva": {"teacher"}, "vilref": {"momentum_image_encoder", "momentum_image_proj", "momentum_text_encoder", "momentum_text_proj"}}
    assert frozen_roots == expect.get(name, set())

    model.after_optimizer_step()
    if name == "vilref":  # theta_m <- mu theta_m + (1 - mu) theta
        mu = model.method_cfg.momentum
        p = model.image_encoder.blocks[0].attn.qkv.weight
        q = model.momentum_image_encoder.blocks[0].attn.qkv.weight
        assert torch.allclose(q, mu * before["momentum_image_encoder.trunk.blocks.0.attn.qkv.weight"] + (1 - mu) * p)
    else:
        assert all(torch.equal(p, before[n]) for n, p in frozen.items())


@pytest.mark.parametrize("name", METHODS)
def test_save_load_round_trip_without_pickle(name, tokenizer, tmp_path, monkeypatch):
    model = tiny_model(name, tokenizer).train()
    model(batch())["loss"].backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    model.after_optimizer_step()
    model.eval()
    model.save_pretrained(tmp_path / "ckpt")
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} >= {"model.safetensors", "config.json"}

    def refuse(*args, **kwargs):
        raise AssertionError("load_model must not unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    loaded = load_model(tmp_path / "ckpt")
    monkeypatch.undo()

    assert type(loaded) is FundusVLM and not loaded.training
    assert loaded.method_cfg == model.method_cfg
    ref, got = model.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    images = batch(1)["image"]
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), loaded.encode_image(images))
        if model.use_contrastive:
            assert torch.equal(model.encode_text(TEXTS), loaded.encode_text(TEXTS))


@pytest.mark.parametrize("name", METHODS)
def test_encoders_give_normalised_embeddings(name, tokenizer):
    model = tiny_model(name, tokenizer).eval()
    images = batch()["image"]
    with torch.no_grad():
        z = model.encode_image(images)
        feats = model.image_features(images)
    width = 16 if model.use_contrastive else 32
    assert z.shape == (4, width) and torch.allclose(z.norm(dim=-1), torch.ones(4))
    assert feats["cls"].shape == (4, 32) and feats["tokens"].shape == (4, 4, 32)
    if model.use_contrastive:
        zt = model.encode_text(TEXTS)
        assert zt.shape == (4, 16) and torch.allclose(zt.norm(dim=-1), torch.ones(4), atol=1e-6)
        zp = model.encode_patches(images)
        assert zp.shape == (4, 4, 16) and torch.allclose(zp.norm(dim=-1), torch.ones(4, 4), atol=1e-6)
        assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    else:
        with pytest.raises(RuntimeError, match="contrastive_weight is 0"):
            model.encode_text(TEXTS)


EXPECTED_MODULES = {
    # name: (text_encoder, image_decoder, text_decoder type, fusion_image, fusion_text, teacher)
    "clip": (True, False, None, False, False, False),
    "coca": (True, False, "CaptionDecoder", False, False, False),
    "eva": (True, True, None, False, False, True),
    "mae": (False, True, None, False, False, False),
    "flair": (True, False, None, False, False, False),
    "vilref": (True, False, None, False, False, False),
    "ours": (True, True, "MaskedTextDecoder", True, True, False),
    "ours-full-view": (True, True, "MaskedTextDecoder", True, True, False),
    "ours-no-mim": (True, False, "MaskedTextDecoder", False, True, False),
    "ours-no-caption": (True, True, None, True, False, False),
    "ours-no-xattn": (True, True, "MaskedTextDecoder", False, False, False),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_MODULES))
def test_unused_modules_are_not_built(name, tokenizer):
    model = tiny_model(name, tokenizer)
    text, img_dec, txt_dec, f_img, f_txt, teacher = EXPECTED_MODULES[name]
    assert (model.text_encoder is not None) == text
    assert hasattr(model, "image_decoder") == img_dec
    assert (type(model.text_decoder).__name__ if hasattr(model, "text_decoder") else None) == txt_dec
    assert (model.fusion_image is not None, model.fusion_text is not None, model.teacher is not None) == (f_img, f_txt, teacher)
    assert hasattr(model, "logit_scale") == (name != "mae")


@pytest.mark.parametrize("view,passes", [("full", 2), ("masked", 1)])
def test_contrastive_view_switch_sets_the_encoder_passes(view, passes, tokenizer, monkeypatch):
    model = tiny_model("ours", tokenizer, contrastive_view=view)
    ratios = []
    forward = type(model.image_encoder).forward

    def counting(self, images, mask_ratio=0.0):
        ratios.append(mask_ratio)
        return forward(self, images, mask_ratio)

    monkeypatch.setattr(type(model.image_encoder), "forward", counting)
    model(batch())
    assert len(ratios) == passes and 0.75 in ratios  # FLIP: one masked pass feeds everything


def test_label_methods_need_labels_and_texts(tokenizer):
    b = batch()
    del b["label"]
    for name in ("flair", "vilref"):
        with pytest.raises(ValueError, match="batch\\['label'\\]"):
            tiny_model(name, tokenizer)(b)
        with pytest.raises(ValueError, match="batch\\['label'\\]"):
            tiny_model(name, tokenizer)(dict(b, label=[None] * 4))
    # methods that do not read labels accept batches without usable ones
    assert torch.isfinite(tiny_model("clip", tokenizer)(dict(b, label=[None] * 4))["loss"])
    # integer class ids work as well as multi-hot rows
    assert torch.isfinite(tiny_model("flair", tokenizer)(dict(b, label=torch.tensor([1, 0, 2, 1])))["loss"])
    b = batch()
    b["text"] = [None] + b["text"][1:]
    with pytest.raises(ValueError, match=r"batch\['text'\]\[0\]"):
        tiny_model("clip", tokenizer)(b)
    # an image-only method ignores texts entirely
    assert torch.isfinite(tiny_model("mae", tokenizer)({"image": batch()["image"]})["loss"])


def test_vilref_queue_fills_with_momentum_features_and_labels(tokenizer):
    model = tiny_model("vilref", tokenizer).train()
    b = batch()
    model(b)
    assert int(model.queue_count) == 4 and int(model.queue_ptr) == 4
    assert torch.equal(model.label_queue[:4], b["label"])
    with torch.no_grad():
        zi = torch.nn.functional.normalize(model.momentum_image_proj(model.momentum_image_encoder(b["image"])["cls"]), dim=-1)
    assert torch.allclose(model.image_queue[:4], zi, atol=1e-6)
    model(b)  # wraps around a queue of 6
    assert int(model.queue_count) == 6 and int(model.queue_ptr) == 2
    model.eval()
    model(b)  # evaluation does not enqueue
    assert int(model.queue_ptr) == 2


def test_logit_scale_is_clamped_as_in_clip(tokenizer):
    model = tiny_model("clip", tokenizer)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model._scale().item() == pytest.approx(100.0)
    model.after_optimizer_step()
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))


def test_invalid_method_switches_name_the_field(tokenizer):
    with pytest.raises(ValueError, match="method.mask_ratio"):
        tiny_model("ours", tokenizer, mask_ratio=1.0)
    with pytest.raises(ValueError, match="every loss weight is 0"):
        tiny_model("clip", tokenizer, contrastive_weight=0.0)
    with pytest.raises(ValueError, match="model.img_size"):
        tiny_model("clip", tokenizer).encode_image(torch.rand(1, 3, 48, 48))
