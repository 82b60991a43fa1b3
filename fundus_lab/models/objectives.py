"""Objective heads: each term of eq. 8 as one object that declares the encoder passes it
reads and returns its named, unweighted loss term.

open_clip composes ``CoCaLoss`` from ``ClipLoss``; we compose a method from these heads
the same way: ``clip`` = [Contrastive], ``coca`` = [Contrastive, CoCaCaption], ``ours`` =
[Contrastive, ImageGeneration, MaskedCaption], ``eva`` = [TeacherMIM (stage 1),
Contrastive (stage 2)]. The model runs the union of the declared passes once each, so two
heads that read the same view share it. Heads hold no weights: the modules stay on the
model (one flat module tree for checkpoints, eval and the optimizer), and the losses
(``fundus_lab.losses``) do any cross-process gathering.

A pass is ``("image", ratio)`` (ratio 0: unmasked; > 0: MAE-style dropped patches),
``("image", "mask_token")`` (every patch kept, block-wise [MASK] tokens: EVA) or
``("text", "full" | "masked")``.
"""

from __future__ import annotations

from typing import Any

import torch

from fundus_lab import losses as L
from fundus_lab.models.image import patchify


class Objective:
    """One loss term. ``key`` is its name in the model output (``contrastive_loss`` ...)."""

    key = ""

    def active(self, model) -> bool:
        """Whether this term runs at the model's current stage."""
        return True

    def needs(self, model) -> list[tuple[str, Any]]:
        raise NotImplementedError

    def __call__(self, model, enc: dict, batch: dict) -> torch.Tensor:
        raise NotImplementedError


class Contrastive(Objective):
    """Eq. 2 (InfoNCE; FLAIR's label-aware or ViLReF's coupling variant) on the contrastive
    view: the unmasked image and text (eq. 1), or FLIP's masked view (``ours-flip``)."""

    key = "contrastive_loss"

    def active(self, model) -> bool:
        return model.stage != 1

    def needs(self, model):
        return [("image", model.context_image_ratio()), ("text", model.context_text_view())]

    def __call__(self, model, enc, batch):
        image = enc[("image", model.context_image_ratio())]
        text = enc[("text", model.context_text_view())]
        return model.forward_contrastive(model.image_embedding_input(image), model.text_embedding_input(text), batch.get("label"))


class ImageGeneration(Objective):
    """Eqs. 3-4 with eq. 7's ``CA_img``: the masked image's tokens query the text tokens of
    the contrastive view, and the MAE decoder rebuilds the masked patches."""

    key = "image_gen_loss"

    def active(self, model) -> bool:
        return model.stage != 2

    def needs(self, model):
        out = [("image", model.method_cfg.mask_ratio)]
        if model.fusion_image is not None:
            out.append(("text", model.context_text_view()))
        return out

    def __call__(self, model, enc, batch):
        masked = enc[("image", model.method_cfg.mask_ratio)]
        tokens = masked["tokens"]
        if model.fusion_image is not None:
            text = enc[("text", model.context_text_view())]
            tokens = model.fusion_image(tokens, text["tokens"], ~enc["attention_mask"].bool())
        pred = model.image_decoder(tokens, masked["ids_restore"])  # [N, L, p*p*3]
        images = enc["images"]
        target = patchify(model.image_encoder.normalize(images), model.image_encoder.patch_size)
        return L.masked_image_loss(pred, target, masked["mask"], model.method_cfg.norm_pix_loss)


class TeacherMIM(Objective):
    """EVA stage 1: block-wise [MASK] tokens in the encoder, a linear head regressing the
    frozen teacher's patch features at the masked positions (cosine)."""

    key = "image_gen_loss"

    def active(self, model) -> bool:
        return model.stage != 2

    def needs(self, model):
        return [("image", "mask_token")]

    def __call__(self, model, enc, batch):
        out = enc[("image", "mask_token")]
        pred = model.image_decoder(out["tokens"][:, 1:])  # [N, L, teacher width]
        with torch.no_grad():
            model.teacher.eval()
            target = model.teacher(enc["images"])["tokens"][:, 1:]
        return L.feature_regression_loss(pred, target, out["mask"], model.method_cfg.teacher_loss)


class MaskedCaption(Objective):
    """Eqs. 5-6 with eq. 7's ``CA_text``: the masked text's tokens query the image tokens of
    the contrastive view; a decoder rebuilds the sequence (all T tokens, or the masked ones)."""

    key = "caption_loss"

    def active(self, model) -> bool:
        return model.stage != 1

    def needs(self, model):
        out = [("text", "masked")]
        if model.fusion_text is not None:
            out.append(("image", model.context_image_ratio()))
        return out

    def __call__(self, model, enc, batch):
        tokens = enc[("text", "masked")]["tokens"]
        if model.fusion_text is not None:
            tokens = model.fusion_text(tokens, enc[("image", model.context_image_ratio())]["tokens"])
        return L.caption_loss(model.text_decoder(tokens, enc["attention_mask"]), enc["text_targets"])


class CoCaCaption(Objective):
    """CoCa's captioning: the multimodal layers continue the causal text stack from its
    unimodal tokens, cross-attending to the attention-pooled image tokens; next-token CE."""

    key = "caption_loss"

    def needs(self, model):
        return [("image", 0.0), ("text", "full")]

    def __call__(self, model, enc, batch):
        image_tokens = model.caption_pooler(enc[("image", 0.0)]["tokens"])
        logits = model.text_decoder(enc[("text", "full")]["tokens"], enc["attention_mask"], image_tokens)
        return L.caption_loss(logits, enc["text_targets"])


def objectives_for(model) -> list[Objective]:
    """The heads of a built model, in the order their terms are logged."""
    heads: list[Objective] = []
    if model.use_image_gen:
        heads.append(TeacherMIM() if model.teacher_target else ImageGeneration())
    if model.use_contrastive:
        heads.append(Contrastive())
    if model.masked_caption:
        heads.append(MaskedCaption())
    elif model.coca:
        heads.append(CoCaCaption())
    return heads
