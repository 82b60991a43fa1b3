"""Image towers from timm: one interface for the preset ViT, named timm ViTs and CNNs; masking
modes; timm / RETFound weight files (issue 9 item 5, issue 11)."""

import argparse
import warnings
from dataclasses import replace

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from fundus_lab.checkpoint import CheckpointError
from fundus_lab.models import ModelConfig
from fundus_lab.models.image import ConvNetTower, VisionTransformer, block_mask, build_image_encoder, load_image_weights

TINY_VIT = "vit_tiny_patch16_224"
PRESET = ModelConfig(img_size=32, patch_size=16, vision_width=32, vision_depth=2, vision_heads=2)


def named_vit(img_size=32, **over) -> ModelConfig:
    """A timm ViT by name; ``vision_depth`` etc. do not apply to named towers."""
    return replace(PRESET, image_encoder=TINY_VIT, img_size=img_size, **over)


class NotAWeight:
    """A pickled object of an arbitrary class: what ``weights_only=True`` exists to refuse."""


def tiny_timm_vit(img_size, num_classes=0, depth=2):
    return timm.create_model(TINY_VIT, pretrained=False, num_classes=num_classes, img_size=img_size, depth=depth)


@pytest.fixture(scope="module")
def vit2():
    """A 2-block timm vit_tiny tower at 32 px (the registry's depth overridden to stay cheap)."""
    torch.manual_seed(0)
    trunk = tiny_timm_vit(32)
    return VisionTransformer(trunk, mask_token=True, name=TINY_VIT).eval()


def test_preset_vit_is_a_timm_vision_transformer():
    tower = build_image_encoder(PRESET)
    assert isinstance(tower.trunk, timm.models.vision_transformer.VisionTransformer)
    assert tower.trunk.norm.eps == 1e-6  # timm's, not torch's 1e-5
    assert (tower.width, tower.patch_size, tower.grid_size, tower.num_patches, tower.num_heads) == (32, 16, 2, 4, 2)
    assert "pos_embed" in tower.trunk.state_dict()  # fixed sin-cos, but saved with the trunk
    assert not any("pos_embed" in n for n, _ in tower.named_parameters())
    # its trunk is a plain timm model: the same weights load into timm.create_model and give the same features
    ref = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=16,
                            embed_dim=32, depth=2, num_heads=2)
    ref.load_state_dict(tower.trunk.state_dict(), strict=True)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out, want = tower.eval()(images), ref.eval().forward_features(tower.normalize(images))
    assert torch.allclose(out["tokens"], want, atol=1e-5)


def test_vit_tower_shapes_with_and_without_masking(vit2):
    images = torch.rand(3, 3, 32, 32)
    full = vit2(images)
    assert full["tokens"].shape == (3, 5, 192) and full["cls"].shape == (3, 192)
    assert torch.equal(full["tokens"][:, 0], full["cls"])
    assert full["mask"].shape == (3, 4) and full["mask"].sum() == 0
    assert torch.equal(full["ids_restore"], torch.arange(4).expand(3, -1))

    masked = vit2(images, mask_ratio=0.5)  # MAE: half the patches dropped
    assert masked["tokens"].shape == (3, 1 + 2, 192)
    assert masked["mask"].sum(1).tolist() == [2, 2, 2]
    assert sorted(masked["ids_restore"][0].tolist()) == [0, 1, 2, 3]

    mask = torch.tensor([[True, False, False, True]] * 3)  # EVA: every position kept, two are [MASK]
    mim = vit2(images, mask=mask)
    assert mim["tokens"].shape == (3, 5, 192)
    assert torch.equal(mim["mask"], mask.float())
    with pytest.raises(ValueError, match="either mask_ratio"):
        vit2(images, mask_ratio=0.5, mask=mask)
    with pytest.raises(ValueError, match=r"\[3, 4\]"):
        vit2(images, mask=torch.zeros(3, 5, dtype=torch.bool))


def test_mask_token_replaces_exactly_the_masked_patches(vit2):
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        plain = vit2(images)["tokens"]
        nothing = vit2(images, mask=torch.zeros(2, 4, dtype=torch.bool))["tokens"]
        # patch 0 of the first image masked: its input becomes mask_token + position
        mask = torch.tensor([[True, False, False, False], [False] * 4])
        x = vit2._embed(images, mask)
        want0 = vit2.mask_token[0, 0] + vit2.trunk.pos_embed[0, 1]
        assert torch.allclose(x[0, 1], want0) and torch.allclose(x[1], vit2._embed(images)[1])
        hidden = vit2(images, mask=mask)["tokens"]
    assert torch.allclose(nothing, plain, atol=1e-6)
    assert not torch.allclose(hidden[0], plain[0]) and torch.allclose(hidden[1], plain[1], atol=1e-6)
    no_token = build_image_encoder(PRESET)
    with pytest.raises(ValueError, match="without a \\[MASK\\] token"):
        no_token(images, mask=mask)


def test_named_timm_vit_features_equal_timm(tmp_path):
    torch.manual_seed(2)
    src = timm.create_model(TINY_VIT, pretrained=False, num_classes=0, img_size=32)
    save_file(src.state_dict(), str(tmp_path / "vit.safetensors"))
    tower = build_image_encoder(named_vit(image_weights=str(tmp_path / "vit.safetensors"))).eval()
    assert len(tower.blocks) == 12 and tower.width == 192  # the registry's sizes, not vision_depth/width
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = tower(images)
        x = tower.normalize(images)
        want_tokens, want_cls = src.eval().forward_features(x), src(x)
    assert (out["tokens"][:, 1:] - want_tokens[:, 1:]).abs().max() < 1e-5
    assert (out["cls"] - want_cls).abs().max() < 1e-5


def test_partial_weights_warn_with_the_missing_keys(tmp_path):
    save_file(tiny_timm_vit(32, depth=2).state_dict(), str(tmp_path / "two_blocks.safetensors"))
    tower = build_image_encoder(named_vit(), load_weights=False)
    with pytest.warns(UserWarning, match=r"two_blocks.safetensors.*missing \(left as initialised\): \['blocks.10.attn.proj.bias'"):
        report = load_image_weights(tower, tmp_path / "two_blocks.safetensors")
    assert len(report["missing"]) == 10 * 12 and report["unexpected"] == []


def test_pos_embed_is_resampled_to_the_working_grid(tmp_path):
    torch.manual_seed(0)
    src = tiny_timm_vit(64, num_classes=5, depth=12)  # a 4x4 grid and a classifier head
    save_file(src.state_dict(), str(tmp_path / "vit64.safetensors"))
    tower = build_image_encoder(named_vit(img_size=32), load_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key fits once the head is dropped: nothing to warn about
        report = load_image_weights(tower, tmp_path / "vit64.safetensors")
    assert report["resampled"] == ["pos_embed"] and report["dropped"] == ["head.bias", "head.weight"]
    assert report["missing"] == [] and report["unexpected"] == []
    want = resample_abs_pos_embed(src.pos_embed.detach(), new_size=[2, 2], old_size=[4, 4], num_prefix_tokens=1)
    assert tower.trunk.pos_embed.shape == (1, 5, 192)
    assert torch.allclose(tower.trunk.pos_embed, want)
    assert torch.equal(tower.trunk.pos_embed[0, 0], src.pos_embed[0, 0].detach())  # the CLS entry is kept as is
    assert torch.equal(tower.trunk.blocks[3].attn.qkv.weight, src.blocks[3].attn.qkv.weight)


def test_retfound_style_pth_loads_with_weights_only(tmp_path):
    torch.manual_seed(0)
    src = tiny_timm_vit(32, depth=12)
    state = dict(src.state_dict())
    state["decoder_embed.weight"] = torch.zeros(8, 192)  # MAE decoder weights ride along in RETFound files
    state["mask_token"] = torch.zeros(1, 1, 8)
    path = tmp_path / "RETFound_cfp_weights.pth"
    torch.save({"model": state, "epoch": 3, "args": argparse.Namespace(model="vit_large_patch16")}, path)
    tower = build_image_encoder(named_vit(), load_weights=False)
    with pytest.warns(UserWarning, match=r"unexpected \(ignored\): \['decoder_embed.weight', 'mask_token'\]"):
        report = load_image_weights(tower, path)
    assert report["missing"] == []
    assert all(torch.equal(v, tower.trunk.state_dict()[k]) for k, v in src.state_dict().items())

    torch.save({"model": state, "payload": NotAWeight()}, tmp_path / "unsafe.pth")
    with pytest.raises(CheckpointError, match=r"unsafe.pth: torch.load\(weights_only=True\) refuses .*NotAWeight"):
        load_image_weights(tower, tmp_path / "unsafe.pth")


def test_bad_weight_files_raise_checkpoint_error_naming_them(tmp_path):
    tower = build_image_encoder(named_vit(), load_weights=False)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "junk.pth").write_bytes(b"not a zip either")
    (tmp_path / "weights.npz").write_bytes(b"")
    save_file({"text.embeddings.weight": torch.zeros(2, 2)}, str(tmp_path / "text.safetensors"))
    save_file({"pos_embed": torch.zeros(1, 7, 192)}, str(tmp_path / "odd.safetensors"))
    save_file({"patch_embed.proj.weight": torch.zeros(64, 3, 16, 16)}, str(tmp_path / "narrow.safetensors"))
    cases = {
        "missing.pth": "the file does not exist",
        "junk.safetensors": "cannot read",
        "junk.pth": "cannot read",
        "weights.npz": "neither .safetensors nor",
        "text.safetensors": "none of its 1 keys",
        "odd.safetensors": "not a square grid",
        "narrow.safetensors": r"shape mismatch patch_embed.proj.weight: file \[64, 3, 16, 16\] vs model \[192, 3, 16, 16\]",
    }
    for name, why in cases.items():
        with pytest.raises(CheckpointError, match=rf"{name}.*{why}"):
            load_image_weights(tower, tmp_path / name)
    # and through the config, as a user would meet it
    with pytest.raises(CheckpointError, match="junk.pth"):
        build_image_encoder(named_vit(image_weights=str(tmp_path / "junk.pth")))


def test_resnet50_tower_tokens_and_one_training_step():
    torch.manual_seed(0)
    tower = build_image_encoder(replace(PRESET, image_encoder="resnet50", img_size=64))
    assert isinstance(tower, ConvNetTower) and not tower.supports_masking
    assert (tower.width, tower.patch_size, tower.grid_size, tower.num_patches) == (2048, 32, 2, 4)
    images = torch.rand(2, 3, 64, 64)
    out = tower.train()(images)
    assert out["tokens"].shape == (2, 5, 2048) and out["cls"].shape == (2, 2048)
    assert out["mask"].shape == (2, 4) and out["ids_restore"].shape == (2, 4)
    # the pooled token is the global average of the feature-map tokens
    assert torch.allclose(out["cls"], out["tokens"][:, 1:].mean(1), atol=1e-5)
    assert torch.equal(out["tokens"][:, 0], out["cls"])

    head = torch.nn.Linear(2048, 3)
    params = [p for p in tower.parameters() if p.requires_grad] + list(head.parameters())
    before = tower.trunk.conv1.weight.detach().clone()
    loss = torch.nn.functional.cross_entropy(head(out["cls"]), torch.tensor([0, 2]))
    loss.backward()
    torch.optim.SGD(params, lr=0.1).step()
    assert torch.isfinite(loss) and not torch.equal(tower.trunk.conv1.weight, before)

    with pytest.raises(ValueError, match="'resnet50' is a CNN and cannot mask"):
        tower(images, mask_ratio=0.75)
    with pytest.raises(TypeError, match="'resnet50' is a CNN"):
        tower.attention_maps(images)
    with pytest.raises(ValueError, match="model.img_size=72 is not a multiple"):
        build_image_encoder(replace(PRESET, image_encoder="resnet50", img_size=72))


def test_unknown_timm_name_is_named():
    with pytest.raises(ValueError, match="model.image_encoder='vit_nonexistent_patch3'"):
        build_image_encoder(replace(PRESET, image_encoder="vit_nonexistent_patch3"))


def test_block_mask_ratio_shape_and_blocks():
    g = torch.Generator().manual_seed(0)
    masks = block_mask(64, 14, 0.4, g)
    assert masks.shape == (64, 196) and masks.dtype == torch.bool
    per_row = masks.sum(1).float()
    assert per_row.max() <= round(0.4 * 196)
    assert abs(per_row.mean().item() / 196 - 0.4) < 0.03
    # block-wise, not scattered: most masked patches have a masked 4-neighbour
    grid = masks.view(64, 14, 14)
    pad = torch.nn.functional.pad(grid.float(), (1, 1, 1, 1))
    neighbours = pad[:, :-2, 1:-1] + pad[:, 2:, 1:-1] + pad[:, 1:-1, :-2] + pad[:, 1:-1, 2:]
    assert (neighbours[grid] > 0).float().mean() > 0.9
    # repeatable from the generator; rectangular grids; ratio 0 masks nothing
    assert torch.equal(block_mask(4, (6, 8), 0.4, torch.Generator().manual_seed(3)),
                       block_mask(4, (6, 8), 0.4, torch.Generator().manual_seed(3)))
    assert block_mask(4, (6, 8), 0.4, g).shape == (4, 48)
    assert not block_mask(2, 4, 0.0, g).any()
    with pytest.raises(ValueError, match="ratio=1.0"):
        block_mask(2, 4, 1.0, g)


def test_layer_wise_lr_decay_reads_the_trunk_block_names():
    from fundus_lab.eval.fine_tune import FineTuneClassifier, param_groups
    from fundus_lab.models import MethodConfig, build_model

    mae = build_model(PRESET, MethodConfig(name="mae", contrastive_weight=0.0, caption_weight=0.0, cross_attention=False))
    groups = param_groups(FineTuneClassifier(mae, 3, 32), lr=1.0, layer_decay=0.5, weight_decay=0.05)
    layer_of = {id(p): g["layer"] for g in groups for p in g["params"]}
    trunk = mae.image_encoder.trunk
    assert layer_of[id(trunk.cls_token)] == layer_of[id(trunk.patch_embed.proj.weight)] == 0
    assert layer_of[id(trunk.blocks[0].attn.qkv.weight)] == 1 and layer_of[id(trunk.blocks[1].mlp.fc1.weight)] == 2
    assert layer_of[id(trunk.norm.weight)] == 3
