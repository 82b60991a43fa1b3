"""Baselines as their authors define them (issue 17, item 4): CoCa's probes read its
attentional pool, EVA's text tower starts from its CLIP teacher's, VisionCLIP pools with
attention, FLAIR mean-pools its text, ViLReF trains on reports."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fundus_lab import config as C
from fundus_lab.data.tokenizer import train_tokenizer
from fundus_lab.eval.features import extract_features
from fundus_lab.eval.fine_tune import FineTuneClassifier, _width, param_groups
from fundus_lab.models import CheckpointError, ModelConfig, build_model
from doubles import ToyDataset
from doubles import TEXTS, TINY, batch, method_config, tiny_model


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS * 2, vocab_size=200)


# ---------------------------------------------------------------------- CoCa


def test_coca_probe_features_are_the_attentional_pool_encode_image_reads(tokenizer):
    """Few-shot and linear probe read ``extract_features(kind="cls")``: for CoCa that is the
    attentional pool through the image projection, open_clip's ``encode_image(normalize=False)``
    (post-projection), so it equals our encode_image up to the L2 norm, and not the ViT's CLS."""
    model = tiny_model("coca", tokenizer).eval()
    ds = ToyDataset([0, 1, 2, 0, 1, 2], ["a", "b", "c"], size=32)
    probe_features, _ = extract_features(model, ds, kind="cls", cache=False, progress=False)
    embed, _ = extract_features(model, ds, kind="embed", cache=False, progress=False)
    assert probe_features.shape == (6, model.model_cfg.embed_dim)
    np.testing.assert_allclose(probe_features / np.linalg.norm(probe_features, axis=1, keepdims=True), embed, atol=1e-6)
    with torch.no_grad():
        vit_cls = model.image_encoder(ds.images)["cls"]
        pooled = model.contrastive_pooler(model.image_encoder(ds.images)["tokens"])[:, 0]
    assert vit_cls.shape[1] != probe_features.shape[1]
    np.testing.assert_allclose(probe_features, model.image_proj(pooled).detach().numpy(), atol=1e-6)


def test_coca_fine_tuning_trains_the_attentional_pool_it_reads(tokenizer):
    model = tiny_model("coca", tokenizer)
    images = batch()["image"]
    classifier = FineTuneClassifier(copy.deepcopy(model), 3, _width(model, images[0]))
    assert classifier.head.in_features == model.model_cfg.embed_dim
    groups = param_groups(classifier, lr=0.1, layer_decay=0.75, weight_decay=0.0)
    in_optimizer = {id(p) for g in groups for p in g["params"]}
    backbone = classifier.backbone
    for name in ("contrastive_pooler", "image_proj"):
        assert all(id(p) in in_optimizer for p in getattr(backbone, name).parameters()), name
    assert not any(id(p) in in_optimizer for p in backbone.caption_pooler.parameters())
    before = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    optim = torch.optim.SGD(groups, lr=0.1)
    classifier.head.weight.data.normal_()  # the head starts at zero: give the pool a gradient
    F.cross_entropy(classifier(images), torch.tensor([0, 1, 2, 0])).backward()
    optim.step()
    moved = {n.split(".")[0] for n, p in backbone.named_parameters() if not torch.equal(p, before[n])}
    assert {"image_encoder", "contrastive_pooler", "image_proj"} == moved


def test_other_methods_probe_the_towers_pooled_feature(tokenizer):
    model = tiny_model("clip", tokenizer).eval()
    with torch.no_grad():
        assert torch.equal(model.image_features(batch()["image"])["cls"], model.image_encoder(batch()["image"])["cls"])
    assert model.image_feature_modules == ()


# ---------------------------------------------------------------------- EVA-CLIP


@pytest.fixture(scope="module")
def clip_teacher(tokenizer, tmp_path_factory):
    """A tiny clip with trained-looking (perturbed) weights saved as EVA's teacher."""
    clip = tiny_model("clip", tokenizer, seed=3)
    with torch.no_grad():
        for p in clip.parameters():
            p.add_(0.01 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("clip_teacher")
    clip.save_pretrained(folder)
    return clip, folder


def test_eva_text_tower_starts_from_the_teachers(tokenizer, clip_teacher):
    clip, folder = clip_teacher
    eva = tiny_model("eva", tokenizer, teacher_checkpoint=str(folder))
    assert eva.method_cfg.text_init == "teacher"  # eva.yaml
    for ours, theirs in ((eva.text_encoder, clip.text_encoder), (eva.text_proj, clip.text_proj), (eva.teacher, clip.image_encoder)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the student's image tower is its own (EVA's stage 1 trains it against the teacher)
    assert not torch.equal(eva.image_encoder.blocks[0].attn.qkv.weight, clip.image_encoder.blocks[0].attn.qkv.weight)
    # and the switch off leaves the text tower random
    random_text = tiny_model("eva", tokenizer, teacher_checkpoint=str(folder), text_init="random")
    assert not torch.equal(random_text.text_proj.weight, clip.text_proj.weight)


def test_eva_without_a_teacher_warns_loudly(tokenizer):
    with pytest.warns(UserWarning, match="FROZEN RANDOM ViT and its text tower starts RANDOM"):
        tiny_model("eva", tokenizer)


def test_eva_text_init_refuses_what_it_cannot_start_from(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="method.text_init='teacher'.*image_gen_target='teacher'"):
        tiny_model("clip", tokenizer, text_init="teacher")
    mae = tiny_model("mae", None)
    mae.save_pretrained(tmp_path / "mae")
    with pytest.raises(CheckpointError, match="no contrastive text tower"):
        tiny_model("eva", tokenizer, teacher_checkpoint=str(tmp_path / "mae"))
    other_tok = train_tokenizer(["completely different words for another vocabulary"] * 4, vocab_size=200)
    tiny_model("clip", other_tok).save_pretrained(tmp_path / "other")
    with pytest.raises(CheckpointError, match="tokenizer differs"):
        tiny_model("eva", tokenizer, teacher_checkpoint=str(tmp_path / "other"))


# ---------------------------------------------------------------------- VisionCLIP


def test_visionclip_pools_with_clips_attention_pool(tokenizer):
    import timm

    if not timm.list_models("resnet50_clip"):
        pytest.skip("the installed timm has no resnet50_clip")
    model = tiny_model("visionclip", tokenizer).eval()
    assert type(model.image_encoder.trunk.head).__name__ == "AttentionPool2d"
    images = batch()["image"]
    with torch.no_grad():
        fmap = model.image_encoder.trunk.forward_features(model.image_encoder.normalize(images))
        pooled = model.image_features(images)["cls"]
        torch.testing.assert_close(pooled, model.image_encoder.trunk.head(fmap))
    assert not torch.allclose(pooled, fmap.mean((2, 3)), atol=1e-3)  # not average pooling


# ---------------------------------------------------------------------- FLAIR: text pooling


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_text_pooling_cls_or_mean_of_the_texts_own_tokens(pooling, tokenizer):
    model = build_model(ModelConfig(**TINY, text_pooling=pooling), method_config("flair"), tokenizer).eval()
    with torch.no_grad():
        ids, attn = model.tokenize(TEXTS)
        out = model.text_encoder(ids, attn)
        pooled = model.text_embedding_input(out)
        for i, text in enumerate(TEXTS):  # each text alone, unpadded: the pool of its own tokens
            own = model.text_encoder(*model.tokenize([text]))["tokens"][0]
            expected = own.mean(0) if pooling == "mean" else own[0]
            torch.testing.assert_close(pooled[i], expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_text(TEXTS), F.normalize(model.text_proj(pooled), dim=-1))
    if pooling == "mean":
        assert not torch.allclose(pooled, out["tokens"][:, 0], atol=1e-3)


def test_clip_and_eva_text_towers_have_no_dropout_as_their_authors(tokenizer):
    """CLIP's and EVA-CLIP's text Transformers have no dropout; the BERT default (0.1)
    stays for the methods whose text tower is a BERT (ours, flair, vilref)."""
    for method, expected in (("clip", 0.0), ("eva", 0.0), ("ours", 0.1), ("flair", 0.1)):
        assert C.load_config(preset="smoke", method=method).model.text_dropout == expected, method
    for p in (0.0, 0.1):
        model = build_model(ModelConfig(**TINY, text_dropout=p), method_config("clip"), tokenizer).train()
        bert = model.text_encoder.transformer.config
        assert bert.hidden_dropout_prob == p and bert.attention_probs_dropout_prob == p
        ids, attn = model.tokenize(TEXTS)
        with torch.no_grad():  # in train mode, dropout alone makes two passes differ
            a, b = (model.text_encoder(ids, attn)["cls"] for _ in range(2))
        assert torch.equal(a, b) == (p == 0.0)
    with pytest.raises(ValueError, match=r"model.text_dropout=1.5 must be in \[0, 1\)"):
        build_model(ModelConfig(**TINY, text_dropout=1.5), method_config("clip"), tokenizer)


def test_flair_config_mean_pools_and_coca_refuses_mean(tokenizer):
    assert C.load_config(preset="smoke", method="flair").model.text_pooling == "mean"
    assert C.load_config(preset="smoke", method="clip").model.text_pooling == "cls"
    with pytest.raises(ValueError, match="model.text_pooling='mean'.*CoCa"):
        build_model(ModelConfig(**TINY, text_pooling="mean"), method_config("coca"), tokenizer)
    with pytest.raises(C.ConfigError, match="text_pooling"):
        C.load_config(preset="smoke", method="flair", overrides=["model.text_pooling=max"])


# ---------------------------------------------------------------------- ViLReF


def test_vilref_trains_on_reports():
    cfg = C.load_config(preset="smoke", method="vilref")
    assert cfg.data.text_source == "report" and cfg.method.labels_from == "report_keywords"


# ---------------------------------------------------------------------- pretraining cache keys


def test_coca_code_revision_enters_its_cache_key_only():
    """The changed baselines get new pretraining keys (their configs, or CoCa's code revision);
    the methods this issue does not touch keep the keys of their cached runs."""
    from fundus_lab.experiment.pretraining import _pretrain_inputs

    inputs = {m: _pretrain_inputs(C.load_config(preset="smoke", method=m)) for m in ("clip", "ours", "coca", "flair", "eva")}
    for m in ("clip", "ours"):
        assert "code_revision" not in inputs[m]
        assert "text_pooling" not in inputs[m]["model"] and "text_init" not in inputs[m]["method"]
    assert inputs["coca"]["code_revision"] == 2
    assert inputs["flair"]["model"]["text_pooling"] == "mean"
    assert inputs["eva"]["method"]["text_init"] == "teacher"


def test_eva_run_takes_the_teachers_tokenizer(clip_teacher, tmp_path):
    """The text tower starts from the teacher's, so the run reads text with its vocabulary."""
    from fundus_lab.train import prepare_tokenizer

    clip, folder = clip_teacher
    cfg = C.load_config(preset="smoke", method="eva", overrides={"method.teacher_checkpoint": str(folder)})
    assert prepare_tokenizer(cfg, None, tmp_path).get_vocab() == clip.tokenizer.get_vocab()
    assert not (tmp_path / "tokenizer").exists()  # no vocabulary of its own
