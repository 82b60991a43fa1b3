"""Every method config: forward, backward, one optimizer step, save/load (timm-style sweep)."""

import math
import re
import pickle

import pytest
import torch

from doubles import METHOD_DIR, METHODS, TEXTS, batch, method_config, tiny_model
from fundus_lab.models import FundusVLM, load_model
from fundus_lab.models.model import CAPABILITIES
from fundus_lab.models.objectives import OBJECTIVES, ImagePass, TextPass, objectives_for
from fundus_lab.registry import UnknownNameError


def test_every_expected_method_has_a_config():
    expected = {"clip", "coca", "eva", "mae", "flair", "vilref", "visionclip", "ours", "ours-flip",
                "ours-no-mim", "ours-no-caption", "ours-no-xattn"}
    assert expected <= set(METHODS)


# which top-level modules one training step must move (every parameter in them), per method
# (and stage); every other parameter must stay exactly where it was
ENC = {"image_encoder", "text_encoder", "image_proj", "text_proj", "logit_scale"}
MOVES = {
    "clip": ENC,
    "visionclip": ENC,
    "flair": ENC,
    "vilref": ENC,
    "coca": ENC | {"text_decoder", "contrastive_pooler", "caption_pooler"},
    "mae": {"image_encoder", "image_decoder"},
    "ours": ENC | {"image_decoder", "text_decoder", "fusion_image", "fusion_text"},
    "ours-flip": ENC | {"image_decoder", "text_decoder", "fusion_image", "fusion_text"},
    "ours-no-mim": ENC | {"text_decoder", "fusion_text"},
    "ours-no-caption": ENC | {"image_decoder", "fusion_image"},
    "ours-no-xattn": ENC | {"image_decoder", "text_decoder"},
    ("eva", 1): {"image_encoder", "image_decoder"},   # MIM with [MASK] tokens against the teacher
    ("eva", 2): ENC,                                  # CLIP from the stage-1 encoder
}
# parameters inside a moving module that a given step does not use
IDLE = {("eva", 2): {"image_encoder.mask_token"}}
FROZEN = {"eva": {"teacher"}, "vilref": {"momentum_image_encoder", "momentum_image_proj", "momentum_text_encoder", "momentum_text_proj"}}
SWEEP = [n for n in METHODS if n != "eva"] + [("eva", 1), ("eva", 2)]


@pytest.mark.parametrize("case", SWEEP, ids=lambda c: c if isinstance(c, str) else f"{c[0]}-stage{c[1]}")
def test_one_step_moves_exactly_the_right_parameters(case, tokenizer):
    name, stage = (case, None) if isinstance(case, str) else case
    model = tiny_model(name, tokenizer).train()
    if stage is not None:
        assert model.set_progress(0 if stage == 1 else 9, 10) == stage
    out = model(batch())
    terms = {k: v for k, v in out.items() if k.endswith("_loss")}
    assert terms, "no loss term"
    assert all(torch.isfinite(v) for v in out.values() if isinstance(v, torch.Tensor))
    assert torch.allclose(out["loss"], sum(terms.values()))  # pre-weighted terms sum to the total
    out["loss"].backward()

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    roots = MOVES[case]
    idle = IDLE.get(case, set())
    if name == "visionclip":
        # timm's CLIP ResNet (ByobNet) zero-initialises each bottleneck's last BN
        # (zero_init_last): at the first step no gradient reaches the layers before it
        # inside the residual branch
        idle = idle | {n for n in before
                       if re.match(r"image_encoder\.trunk\.stages\.\d\.\d+\.(conv1_1x1|conv2_kxk|conv3_1x1\.conv)\.", n)}
    should = {n for n in before if n.split(".")[0] in roots and n not in idle}
    assert not should - moved, f"{case}: parameters that did not train: {sorted(should - moved)[:8]}"
    assert not moved - should, f"{case}: parameters that should not move: {sorted(moved - should)[:8]}"

    frozen_roots = {n.split(".")[0] for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen_roots == FROZEN.get(name, set())
    model.after_optimizer_step()
    if name == "vilref":  # theta_m <- mu theta_m + (1 - mu) theta
        mu = model.method_cfg.momentum
        p = model.image_encoder.blocks[0].attn.qkv.weight
        q = model.momentum_image_encoder.blocks[0].attn.qkv.weight
        assert torch.allclose(q, mu * before["momentum_image_encoder.trunk.blocks.0.attn.qkv.weight"] + (1 - mu) * p)


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
    tower = model.image_encoder  # the preset ViT: width 32; ResNet-50: width 2048
    pooled_width = 16 if model.coca else tower.width  # CoCa: the attentional pool, projected (open_clip's encode_image)
    assert feats["cls"].shape == (4, pooled_width) and feats["tokens"].shape == (4, tower.num_patches, tower.width)
    if model.use_contrastive:
        zt = model.encode_text(TEXTS)
        assert zt.shape == (4, 16) and torch.allclose(zt.norm(dim=-1), torch.ones(4), atol=1e-6)
        zp = model.encode_patches(images)
        assert zp.shape == (4, tower.num_patches, 16) and torch.allclose(zp.norm(dim=-1), torch.ones(4, tower.num_patches), atol=1e-6)
        assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    else:
        with pytest.raises(RuntimeError, match="contrastive_weight is 0"):
            model.encode_text(TEXTS)


EXPECTED_MODULES = {
    # name: (text_encoder, image_decoder, text_decoder type, fusion_image, fusion_text, teacher)
    "clip": (True, False, None, False, False, False),
    "coca": (True, False, "MultimodalDecoder", False, False, False),
    "eva": (True, True, None, False, False, True),
    "mae": (False, True, None, False, False, False),
    "flair": (True, False, None, False, False, False),
    "vilref": (True, False, None, False, False, False),
    "ours": (True, True, "MaskedTextDecoder", True, True, False),
    "ours-flip": (True, True, "MaskedTextDecoder", True, True, False),
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


def test_visionclip_resnet50_trains_and_evaluates_zero_shot(tokenizer):
    """VisionCLIP: CLIP with timm's CLIP ResNet-50 image tower, one step and zero-shot scores."""
    model = tiny_model("visionclip", tokenizer).train()
    assert model.model_cfg.image_encoder == "resnet50_clip"
    out = model(batch())
    out["loss"].backward()
    assert all(p.grad is not None for n, p in model.image_encoder.named_parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        scores = model.encode_image(batch()["image"]) @ model.encode_text(TEXTS).t()
    assert scores.shape == (4, 4) and torch.isfinite(scores).all()
    assert "text_embedding" in model.capabilities


def count_passes(model, monkeypatch):
    """Record every image pass (its mask ratio, or "mask_token") and text pass (masked or not)."""
    calls = {"image": [], "text": []}
    enc_cls, txt_cls = type(model.image_encoder), type(model.text_encoder)
    fwd, feats, tfwd = enc_cls.forward, enc_cls.forward_features, txt_cls.forward

    def image_forward(self, images, mask_ratio=0.0):
        calls["image"].append(mask_ratio)
        return fwd(self, images, mask_ratio)

    def image_features(self, images, mask_ratio=0.0, mask=None):
        if mask is not None:
            calls["image"].append("mask_token")
        return feats(self, images, mask_ratio, mask=mask)

    def text_forward(self, ids, attn):
        calls["text"].append("masked" if (ids == model.tokenizer.mask_token_id).any() else "full")
        return tfwd(self, ids, attn)

    monkeypatch.setattr(enc_cls, "forward", image_forward)
    monkeypatch.setattr(enc_cls, "forward_features", image_features)
    monkeypatch.setattr(txt_cls, "forward", text_forward)
    return calls


@pytest.mark.parametrize("name,image,text", [
    ("ours", [0.0, 0.75], ["masked", "full"]),            # the paper: one unmasked + one masked pass each
    ("ours-flip", [0.5, 0.75], ["masked"]),               # FLIP: no unmasked pass
    ("ours-no-mim", [0.0], ["masked", "full"]),
    ("ours-no-caption", [0.0, 0.75], ["full"]),
    ("ours-no-xattn", [0.0, 0.75], ["masked", "full"]),
    ("clip", [0.0], ["full"]),
    ("coca", [0.0], ["full"]),                            # one causal text pass feeds both terms
    ("mae", [0.75], []),
])
def test_each_method_runs_exactly_its_encoder_passes(name, image, text, tokenizer, monkeypatch):
    model = tiny_model(name, tokenizer).train()
    calls = count_passes(model, monkeypatch) if model.text_encoder is not None else None
    if calls is None:  # image-only
        ratios = []
        fwd = type(model.image_encoder).forward
        monkeypatch.setattr(type(model.image_encoder), "forward", lambda self, x, r=0.0: ratios.append(r) or fwd(self, x, r))
        model(batch())
        assert sorted(ratios) == image
        return
    model(batch())
    assert sorted(calls["image"]) == image and sorted(calls["text"]) == sorted(text)
    plan = model.passes()
    assert sorted(p.ratio for p in plan if isinstance(p, ImagePass)) == image
    assert sorted("masked" if p.masked else "full" for p in plan if isinstance(p, TextPass)) == sorted(text)


@pytest.mark.parametrize("name,heads", [
    ("clip", ["Contrastive"]), ("coca", ["Contrastive", "CoCaCaption"]), ("mae", ["ImageGeneration"]),
    ("eva", ["TeacherMIM", "Contrastive"]), ("ours", ["ImageGeneration", "Contrastive", "MaskedCaption"]),
    ("ours-no-caption", ["ImageGeneration", "Contrastive"]),
])
def test_methods_compose_objective_heads(name, heads, tokenizer):
    model = tiny_model(name, tokenizer)
    assert [type(h).__name__ for h in model.objectives] == heads
    out = model(batch())
    assert {k for k in out if k.endswith("_loss")} == {h.key for h in model.objectives if h.active(model.stage)}



def test_objective_heads_are_a_registry_and_the_config_alone_picks_them():
    assert OBJECTIVES.names() == ["image_generation", "teacher_mim", "contrastive", "masked_caption", "coca_caption"]
    with pytest.raises(UnknownNameError, match="did you mean 'contrastive'"):
        OBJECTIVES.get("contrastiv")
    heads = objectives_for(method_config("ours-flip"))
    assert [type(h).__name__ for h in heads] == ["ImageGeneration", "Contrastive", "MaskedCaption"]
    # each head holds its own views: FLIP's contrastive view is its masked image and the masked text
    assert heads[0].passes() == [ImagePass(0.75), TextPass(masked=True)]
    assert heads[1].passes() == [ImagePass(0.5), TextPass(masked=True)]
    assert heads[2].passes() == [TextPass(masked=True), ImagePass(0.5)]


@pytest.mark.parametrize("name,uses", [
    ("ours", {"text", "contrastive", "image_decoder", "caption", "masked_caption", "cross_attention"}),
    ("ours-no-xattn", {"text", "contrastive", "image_decoder", "caption", "masked_caption"}),
    ("mae", {"image_decoder"}),
    ("clip", {"text", "contrastive"}),
    ("coca", {"text", "contrastive", "caption", "coca"}),
    ("eva", {"text", "contrastive", "image_decoder", "teacher"}),
])
def test_method_config_answers_what_the_method_uses(name, uses):
    m = method_config(name)
    props = ("text", "contrastive", "image_decoder", "caption", "teacher", "coca", "masked_caption", "cross_attention")
    assert {p for p in props if getattr(m, f"uses_{p}")} == uses


def test_a_capability_is_asked_by_a_known_name(tokenizer):
    model = tiny_model("clip", tokenizer)
    assert model.has("text_embedding") and not model.has("reconstruction")
    assert model.capabilities <= set(CAPABILITIES.names())
    with pytest.raises(UnknownNameError, match="did you mean 'reconstruction'"):
        model.has("reconstructon")


def _method_lines(name):
    lines = (METHOD_DIR / f"{name}.yaml").read_text().split("method:\n", 1)[1].splitlines()
    return {line.split(":")[0].strip(): line.split(":", 1)[1].split("#")[0].strip() for line in lines if ":" in line}


@pytest.mark.parametrize("ablation,key", [("ours-no-mim", "image_gen_weight"), ("ours-no-caption", "caption_weight"),
                                          ("ours-no-xattn", "cross_attention")])
def test_each_ablation_differs_from_ours_in_exactly_one_term(ablation, key, tokenizer):
    ours, abl = _method_lines("ours"), _method_lines(ablation)
    assert ours.keys() == abl.keys()
    assert {k for k in ours if ours[k] != abl[k]} == {"name", key}
    # and the built model loses exactly that term's modules, nothing else
    full = {n.split(".")[0] for n, _ in tiny_model("ours", tokenizer).named_parameters()}
    less = {n.split(".")[0] for n, _ in tiny_model(ablation, tokenizer).named_parameters()}
    lost = {"image_gen_weight": {"image_decoder", "fusion_image"}, "caption_weight": {"text_decoder", "fusion_text"},
            "cross_attention": {"fusion_image", "fusion_text"}}[key]
    assert less == full - lost


def test_ours_caption_targets_switch_all_tokens_or_masked_only(tokenizer, monkeypatch):
    from fundus_lab import losses

    seen = {}
    real = losses.caption_loss
    monkeypatch.setattr(losses, "caption_loss", lambda logits, targets: seen.setdefault("t", targets) is None or real(logits, targets))
    for mode in ("all", "masked"):
        seen.clear()
        model = tiny_model("ours", tokenizer, caption_targets=mode)
        model(batch())
        ids, attn = model.tokenize(TEXTS)
        counted = int((seen["t"] != -100).sum())
        if mode == "all":  # eq. 6: every one of the T tokens
            assert counted == int(attn.sum())
        else:
            assert 0 < counted < int(attn.sum()) // 3


def test_contrastive_directions_image_to_text_is_eq2_as_written():
    from fundus_lab import losses

    g = torch.Generator().manual_seed(0)
    zi = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    zt = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    logits = 10.0 * zi @ zt.t()
    i2t = losses.contrastive_loss(zi, zt, 10.0, directions="image_to_text")
    assert torch.allclose(i2t, torch.nn.functional.cross_entropy(logits, torch.arange(5)))
    sym = losses.contrastive_loss(zi, zt, 10.0)
    assert torch.allclose(sym, 0.5 * (i2t + torch.nn.functional.cross_entropy(logits.t(), torch.arange(5))))
    with pytest.raises(ValueError, match="contrastive_directions"):
        losses.contrastive_loss(zi, zt, 10.0, directions="text_only")


def test_coca_caption_term_alone_trains_the_unimodal_text_layers(tokenizer):
    model = tiny_model("coca", tokenizer, contrastive_weight=0.0).train()
    out = model(batch())
    assert set(k for k in out if k.endswith("_loss")) == {"caption_loss"}
    out["loss"].backward()
    for name, p in model.text_encoder.named_parameters():
        if name in ("cls_token",):  # the CLS only feeds the contrastive embedding
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, f"text_encoder.{name} got no gradient from the caption term"
    # the captioner attends to the image through the pooler, so the image tower learns too
    assert model.image_encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_coca_is_causal_and_uses_caption_weight_two(tokenizer):
    model = tiny_model("coca", tokenizer).eval()
    assert model.method_cfg.caption_weight == 2.0 and model.method_cfg.contrastive_weight == 1.0
    ids, attn = model.tokenize(TEXTS)
    with torch.no_grad():
        a = model.text_encoder(ids, attn)["tokens"]
        changed = ids.clone()
        changed[:, -1] = 7
        b = model.text_encoder(changed, attn)["tokens"]
    # the future never reaches earlier positions
    assert torch.allclose(a[:, :-1], b[:, :-1], atol=1e-6)


def test_eva_two_stages_within_one_budget(tokenizer):
    from fundus_lab.models.model import stage1_steps

    model = tiny_model("eva", tokenizer).train()
    total = 10
    stages = [model.set_progress(s, total) for s in range(total)]
    assert stages == [1] * stage1_steps(0.5, total) + [2] * (total - stage1_steps(0.5, total))
    assert len(stages) == total  # both stages together take the run's steps, no more
    # stage 1 trains the encoder by MIM; stage 2 starts from that very encoder
    model.set_progress(0, total)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    out = model(batch())
    assert set(k for k in out if k.endswith("_loss")) == {"image_gen_loss"} and out["stage"] == 1
    out["loss"].backward()
    opt.step()
    opt.zero_grad()
    after_stage1 = {k: v.clone() for k, v in model.image_encoder.state_dict().items()}
    model.set_progress(total - 1, total)
    out = model(batch())
    assert set(k for k in out if k.endswith("_loss")) == {"contrastive_loss"} and out["stage"] == 2
    assert all(torch.equal(v, model.image_encoder.state_dict()[k]) for k, v in after_stage1.items())


def test_eva_stage1_masks_blocks_with_mask_tokens():
    from fundus_lab.models.image import block_mask

    torch.manual_seed(0)
    m = block_mask(8, 14, 0.4)
    assert m.dtype == torch.bool and m.shape == (8, 196)
    assert (m.sum(1) == round(0.4 * 196)).all()
    # blocks, not scattered patches: most masked patches have a masked 4-neighbour
    grid = m.view(8, 14, 14).float()
    nb = torch.zeros_like(grid)
    nb[:, 1:] += grid[:, :-1]
    nb[:, :-1] += grid[:, 1:]
    nb[:, :, 1:] += grid[:, :, :-1]
    nb[:, :, :-1] += grid[:, :, 1:]
    assert ((nb > 0) & (grid > 0)).sum() / grid.sum() > 0.9
    torch.manual_seed(0)
    assert torch.equal(block_mask(8, 14, 0.4), m)  # seeded


def test_capabilities_say_what_each_method_can_do(tokenizer):
    caps = {n: tiny_model(n, tokenizer).capabilities for n in ("clip", "mae", "ours", "ours-no-caption", "coca", "eva")}
    assert "text_embedding" in caps["clip"] and "reconstruction" not in caps["clip"]
    assert "text_embedding" not in caps["mae"] and "reconstruction" in caps["mae"]
    assert {"text_embedding", "reconstruction", "text_conditioned_reconstruction", "cross_attention_maps"} <= caps["ours"]
    assert "cross_attention_maps" not in caps["ours-no-caption"]
    assert "captioning" in caps["coca"] and "reconstruction" not in caps["eva"]
    assert all({"attention_maps", "fine_tune", "image_features"} <= c for c in caps.values())  # ViT towers
    resnet = tiny_model("visionclip", tokenizer).capabilities
    assert "attention_maps" not in resnet and "text_embedding" in resnet


def test_reconstruction_goes_through_ca_img_as_in_training(tokenizer):
    model = tiny_model("ours", tokenizer).eval()
    images = batch()["image"]
    with pytest.raises(ValueError, match="CA_img"):
        model.reconstruct(images)
    torch.manual_seed(0)
    a = model.reconstruct(images, texts=TEXTS)["pred_images"]
    torch.manual_seed(0)
    b = model.reconstruct(images, texts=list(reversed(TEXTS)))["pred_images"]
    assert not torch.allclose(a, b)  # the text takes part
    assert tiny_model("mae", tokenizer).reconstruct(images)["pred_images"].shape == images.shape


def test_truncation_is_reported_once(tokenizer):
    model = tiny_model("clip", tokenizer)
    long_text = " ".join(TEXTS * 6)
    with pytest.warns(UserWarning, match="1 of 2 texts .* truncated"):
        model.tokenize([long_text, TEXTS[0]])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.tokenize([long_text, TEXTS[0]])  # said once, not every batch


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
