"""Building blocks: masking, patches, normalisation, attention maps, reconstruction, text masking."""

import pytest
import torch

from fundus_lab.data.tokenizer import train_tokenizer
from fundus_lab.models import MethodConfig, ModelConfig, build_model, patchify, random_masking, unpatchify
from fundus_lab.models.image import VisionTransformer
from fundus_lab.models.text import mask_tokens

TEXTS = ["hard exudates around the macula", "normal fundus", "enlarged cup and thin rim in glaucoma"]
TINY = dict(
    img_size=32, patch_size=16, vision_width=32, vision_depth=2, vision_heads=2, text_width=32, text_depth=2,
    text_heads=2, text_max_length=32, embed_dim=16, fusion_depth=2, fusion_heads=2, decoder_width=32,
    decoder_depth=1, decoder_heads=2,
)


@pytest.fixture(scope="module")
def ours():
    torch.manual_seed(0)
    return build_model(ModelConfig(**TINY), MethodConfig(name="ours"), train_tokenizer(TEXTS * 2, vocab_size=150)).eval()


def test_random_masking_keeps_a_random_subset_and_restores_order():
    torch.manual_seed(0)
    x = torch.arange(2 * 8 * 3, dtype=torch.float).view(2, 8, 3)
    x_masked, mask, ids_restore = random_masking(x, 0.75)
    assert x_masked.shape == (2, 2, 3) and mask.shape == (2, 8)
    assert mask.sum(1).tolist() == [6, 6]
    for n in range(2):
        kept = mask[n] == 0
        # the kept tokens are exactly the unmasked rows of x, in shuffled order
        assert sorted(x_masked[n, :, 0].tolist()) == sorted(x[n, kept, 0].tolist())
        # ids_restore un-shuffles: [kept..., removed...] gathered back gives the mask
        shuffled = torch.cat([torch.zeros(2), torch.ones(6)])
        assert torch.equal(shuffled[ids_restore[n]], mask[n])
    with pytest.raises(ValueError, match="no visible patch"):
        random_masking(x, 0.99)


def test_patchify_layout_and_round_trip():
    img = torch.rand(2, 3, 32, 32)
    p = patchify(img, 16)
    assert p.shape == (2, 4, 16 * 16 * 3)
    # patch 1 is the top-right block, flattened (row, col, channel)
    assert torch.equal(p[0, 1].view(16, 16, 3), img[0, :, :16, 16:].permute(1, 2, 0))
    assert torch.equal(unpatchify(p, 16), img)


def test_encoder_normalises_zero_one_images():
    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    img = torch.rand(1, 3, 32, 32)
    manual = (img - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.5]).view(1, 3, 1, 1)
    assert torch.allclose(vit.normalize(img), manual)
    with pytest.raises(ValueError, match=r"model.img_size=32"):
        vit(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        vit(torch.rand(3, 32, 32))


def test_attention_maps_equal_timm_attention(ours):
    images = torch.rand(2, 3, 32, 32)
    maps = ours.attention_maps(images)
    assert len(maps) == 2 and maps[0].shape == (2, 2, 5, 5)
    assert torch.allclose(maps[0].sum(-1), torch.ones(2, 2, 5), atol=1e-5)
    # reference: timm's own unfused path, whose attention passes through attn_drop
    seen = []

    class Record(torch.nn.Module):
        def forward(self, a):
            seen.append(a.detach())
            return a

    for blk in ours.image_encoder.blocks:
        blk.attn.fused_attn, blk.attn.attn_drop = False, Record()
    try:
        with torch.no_grad():
            ours.image_encoder(images)
    finally:
        for blk in ours.image_encoder.blocks:
            blk.attn.fused_attn, blk.attn.attn_drop = True, torch.nn.Dropout(0.0)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(maps, seen))


def test_cross_attention_maps_text_to_image(ours):
    out = ours.cross_attention_maps(torch.rand(3, 3, 32, 32), TEXTS)
    t = out["attention_mask"].shape[1]
    assert len(out["maps"]) == 2 and out["maps"][0].shape == (3, 2, t, 5)
    assert torch.allclose(out["maps"][0].sum(-1), torch.ones(3, 2, t), atol=1e-5)
    assert out["tokens"][1] == ["[CLS]", "normal", "fundus", "[SEP]"]


def test_reconstruct_pastes_prediction_into_masked_patches(ours):
    images = torch.rand(2, 3, 32, 32)
    rec = ours.reconstruct(images, mask_ratio=0.5)
    assert rec["pred_images"].shape == images.shape and rec["mask"].shape == (2, 4)
    assert rec["pred_images"].min() >= 0 and rec["pred_images"].max() <= 1
    visible = rec["mask_image"] == 0
    assert rec["mask"].sum().item() == 4 and rec["mask_image"].mean().item() == pytest.approx(0.5)
    assert torch.equal(rec["pasted"].masked_select(visible), images.masked_select(visible))
    assert torch.equal(rec["pasted"].masked_select(~visible), rec["pred_images"].masked_select(~visible))


def test_mask_tokens_masks_a_fixed_share_of_ordinary_tokens():
    torch.manual_seed(0)
    ids = torch.tensor([[2, 10, 11, 12, 13, 14, 15, 16, 17, 3], [2, 20, 21, 3, 0, 0, 0, 0, 0, 0]])
    attn = (ids != 0).long()
    masked, targets = mask_tokens(ids, attn, 0.25, mask_token_id=4, special_ids=[0, 1, 2, 3, 4])
    chosen = masked == 4
    assert chosen.sum(1).tolist() == [2, 1]  # round(8 * .25) = 2; a short text still gets one
    assert not chosen[:, 0].any() and not chosen[0, -1] and not chosen[1, 3:].any()  # specials and padding stay
    assert torch.equal(targets[chosen], ids[chosen]) and (targets[~chosen] == -100).all()
    assert torch.equal(masked[~chosen], ids[~chosen])


def test_masked_text_decoder_ignores_padding_keys():
    from fundus_lab.models.decoders import MaskedTextDecoder

    dec = MaskedTextDecoder(width=8, depth=2, num_heads=2, vocab_size=11).eval()
    x = torch.randn(1, 4, 8)
    attn = torch.tensor([[1, 1, 0, 0]])
    x2 = x.clone()
    x2[:, 2:] = torch.randn(1, 2, 8)  # change only the padding
    assert torch.allclose(dec(x2, attn)[:, :2], dec(x, attn)[:, :2], atol=1e-6)
    assert not torch.allclose(dec(x2, torch.ones_like(attn))[:, :2], dec(x, torch.ones_like(attn))[:, :2])


def test_captioner_is_causal():
    from fundus_lab.models.decoders import CaptionDecoder

    dec = CaptionDecoder(vocab_size=30, max_length=8, width=16, depth=2, num_heads=2, image_dim=12).eval()
    ids = torch.randint(5, 30, (1, 6))
    img = torch.randn(1, 5, 12)
    ids2 = ids.clone()
    ids2[0, 4:] = 7
    # positions before the change see the same logits
    assert torch.allclose(dec(ids, img)[:, :4], dec(ids2, img)[:, :4], atol=1e-6)
    assert not torch.allclose(dec(ids, img)[:, 4:], dec(ids2, img)[:, 4:])
