"""Objective heads: each term of eq. 8 as one object that owns its whole term: the encoder
passes it reads, its targets, its loss call and its weight.

open_clip composes ``CoCaLoss`` from ``ClipLoss``; we compose a method from these heads
the same way: ``clip`` = [Contrastive], ``coca`` = [Contrastive, CoCaCaption], ``ours`` =
[ImageGeneration, Contrastive, MaskedCaption], ``eva`` = [TeacherMIM (stage 1),
Contrastive (stage 2)]. Each head registers in :data:`OBJECTIVES` and says from the
method config alone whether the method has it (:meth:`Objective.applies`);
:func:`objectives_for` builds a method's heads in registration order, the order their
terms are logged.

A head declares its passes (:class:`ImagePass`, :class:`TextPass`, built from its own
config: the mask ratio goes from the YAML into the head and nowhere else); the model runs
the union of the active heads' passes once each (``FundusVLM.encode_passes``), so two
heads that read the same view share it, and hands each head the outputs keyed by the
passes it declared. Heads hold no parameters: the modules stay on the model (one flat module
tree for checkpoints, eval and the optimizer), and the losses (``fundus_lab.losses``) do
any cross-process gathering.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fundus_lab import losses as L
from fundus_lab.config import MethodConfig
from fundus_lab.models.image import patchify
from fundus_lab.registry import Registry


@dataclass(frozen=True)
class ImagePass:
    """One pass of ``E_img``: ``ratio`` of the patches dropped MAE-style (0: the unmasked
    image, eq. 1; > 0: the masked image, eq. 3), or with ``mask_token`` every patch kept and
    a block-wise ``ratio`` of them replaced by the learnt [MASK] token (EVA)."""

    ratio: float = 0.0
    mask_token: bool = False


@dataclass(frozen=True)
class TextPass:
    """One pass of ``E_text`` on the whole text (eq. 1) or on its masked copy (eq. 5); the
    masked pass's output carries ``mlm_targets`` (the masked positions' ids, else -100)."""

    masked: bool = False


Pass = ImagePass | TextPass


def context_passes(m: MethodConfig) -> tuple[ImagePass, TextPass]:
    """The views the contrastive term and the cross-attention (eq. 7) read of each branch:
    the unmasked image and text (eq. 1), or under FLIP (``contrastive_view: masked``) the
    image masked at ``contrastive_mask_ratio`` and the masked text that captioning makes
    anyway (one text pass)."""
    flip = m.uses_contrastive and m.contrastive_view == "masked"
    return ImagePass(m.contrastive_mask_ratio if flip else 0.0), TextPass(masked=flip and m.uses_masked_caption)


class Objective:
    """One loss term. ``key`` is its name in the model output (``contrastive_loss`` ...),
    ``weight`` its ``w`` in eq. 8, ``stages`` the training stages it runs at (0: a one-stage
    method; 1 and 2: EVA-CLIP's two stages)."""

    key = ""
    stages: tuple[int, ...] = (0, 1, 2)

    def __init__(self, method: MethodConfig):
        self.method = method

    @staticmethod
    def applies(m: MethodConfig) -> bool:
        """Whether method ``m`` has this term."""
        raise NotImplementedError

    @property
    def weight(self) -> float:
        raise NotImplementedError

    def active(self, stage: int) -> bool:
        """Whether this term runs at training stage ``stage``."""
        return stage in self.stages

    def passes(self) -> list[Pass]:
        """The encoder passes this term reads."""
        raise NotImplementedError

    def __call__(self, model, enc: dict, batch: dict) -> torch.Tensor:
        """The unweighted term from the outputs of its passes (``enc[pass]``)."""
        raise NotImplementedError

    def after_step(self, model, enc: dict, batch: dict) -> None:
        """Called once every term of the step is computed (ViLReF fills its queue here)."""


OBJECTIVES: Registry[type[Objective]] = Registry("objective")


@OBJECTIVES.register("image_generation")
class ImageGeneration(Objective):
    """Eqs. 3-4 with eq. 7's ``CA_img``: the masked image's tokens query the text tokens of
    the contrastive view, and the MAE decoder rebuilds the masked patches."""

    key = "image_gen_loss"
    stages = (0, 1)

    @staticmethod
    def applies(m):
        return m.uses_image_decoder and not m.uses_teacher

    def __init__(self, method):
        super().__init__(method)
        self.masked_view = ImagePass(method.mask_ratio)
        self.text_view = context_passes(method)[1] if method.uses_cross_attention else None

    @property
    def weight(self):
        return self.method.image_gen_weight

    def passes(self):
        return [self.masked_view] + ([self.text_view] if self.text_view is not None else [])

    def __call__(self, model, enc, batch):
        masked = enc[self.masked_view]
        tokens = masked["tokens"]
        if self.text_view is not None:
            text = enc[self.text_view]
            tokens = model.fusion_image(tokens, text["tokens"], ~text["attention_mask"].bool())
        pred = model.image_decoder(tokens, masked["ids_restore"])  # [N, L, p*p*3]
        images = enc["images"]
        target = patchify(model.image_encoder.normalize(images), model.image_encoder.patch_size)
        return L.masked_image_loss(pred, target, masked["mask"], self.method.norm_pix_loss)


@OBJECTIVES.register("teacher_mim")
class TeacherMIM(Objective):
    """EVA stage 1: block-wise [MASK] tokens in the encoder, a linear head regressing the
    frozen teacher's patch features at the masked positions (cosine)."""

    key = "image_gen_loss"
    stages = (0, 1)

    @staticmethod
    def applies(m):
        return m.uses_teacher

    def __init__(self, method):
        super().__init__(method)
        self.view = ImagePass(method.mask_ratio, mask_token=True)

    @property
    def weight(self):
        return self.method.image_gen_weight

    def passes(self):
        return [self.view]

    def __call__(self, model, enc, batch):
        out = enc[self.view]
        pred = model.image_decoder(out["tokens"][:, 1:])  # [N, L, teacher width]
        with torch.no_grad():
            model.teacher.eval()
            target = model.teacher(enc["images"])["tokens"][:, 1:]
        return L.feature_regression_loss(pred, target, out["mask"], self.method.teacher_loss)


@OBJECTIVES.register("contrastive")
class Contrastive(Objective):
    """Eq. 2 (InfoNCE; FLAIR's label-aware or ViLReF's coupling variant) on the projected,
    L2-normalised pooled features of the contrastive view: the unmasked image and text
    (eq. 1), or FLIP's masked view (``ours-flip``). ViLReF's momentum features fill the
    model's memory queue after the step (:meth:`after_step`)."""

    key = "contrastive_loss"
    stages = (0, 2)

    @staticmethod
    def applies(m):
        return m.uses_contrastive

    def __init__(self, method):
        super().__init__(method)
        self.image_view, self.text_view = context_passes(method)

    @property
    def weight(self):
        return self.method.contrastive_weight

    def passes(self):
        return [self.image_view, self.text_view]

    def __call__(self, model, enc, batch):
        m = self.method
        image_feature = model.image_embedding_input(enc[self.image_view])
        text_feature = model.text_embedding_input(enc[self.text_view])
        z_img = F.normalize(model.image_proj(image_feature), dim=-1)
        z_txt = F.normalize(model.text_proj(text_feature), dim=-1)
        scale = model._scale()
        if m.contrastive_loss == "infonce":
            return L.contrastive_loss(z_img, z_txt, scale, directions=m.contrastive_directions)
        labels = batch.get("label")
        try:
            labels = None if labels is None else torch.as_tensor(labels).to(model.device)
        except (TypeError, ValueError, RuntimeError):
            labels = None
        if labels is None:
            raise ValueError(f"method {m.name!r} ({m.contrastive_loss}) needs batch['label'] (class ids or multi-hot) for every image")
        if m.contrastive_loss == "label_aware":
            return L.label_aware_contrastive_loss(z_img, z_txt, labels, scale)
        k = int(model.queue_count)
        return L.weighted_similarity_coupling_loss(
            z_img, z_txt, labels, scale, model.image_queue[:k].clone(), model.text_queue[:k].clone(), model.label_queue[:k].clone()
        )

    def after_step(self, model, enc, batch):
        if self.method.contrastive_loss == "vilref" and model.training:
            self._enqueue(model, enc["images"], enc["input_ids"], enc["attention_mask"], batch.get("label"))

    @torch.no_grad()
    def _enqueue(self, model, images, ids, attn, labels):
        """Push this (global) batch's momentum features and labels into the FIFO queue (ViLReF)."""
        k = self.method.queue_size
        if k == 0:
            return
        zi = F.normalize(model.momentum_image_proj(model.momentum_image_encoder(images)["cls"]), dim=-1)
        zt = F.normalize(model.momentum_text_proj(model.text_embedding_input(model.momentum_text_encoder(ids, attn))), dim=-1)
        y = L.labels_as_matrix(torch.as_tensor(labels).to(model.device), self.method.num_labels)
        zi, zt, y = L.gather_no_grad(zi), L.gather_no_grad(zt), L.gather_no_grad(y)
        n = zi.shape[0]
        idx = (int(model.queue_ptr) + torch.arange(n, device=zi.device)) % k
        if n > k:  # a batch larger than the queue: keep its last k entries
            idx, zi, zt, y = idx[-k:], zi[-k:], zt[-k:], y[-k:]
        model.image_queue[idx] = zi.to(model.image_queue.dtype)
        model.text_queue[idx] = zt.to(model.text_queue.dtype)
        model.label_queue[idx] = y.to(model.label_queue.dtype)
        model.queue_ptr.fill_((int(model.queue_ptr) + n) % k)
        model.queue_count.fill_(min(k, int(model.queue_count) + n))


@OBJECTIVES.register("masked_caption")
class MaskedCaption(Objective):
    """Eqs. 5-6 with eq. 7's ``CA_text``: the masked text's tokens query the image tokens of
    the contrastive view; a decoder rebuilds the sequence: all T tokens (eq. 6), or only
    the masked ones (``caption_targets: masked``, BERT/MLM-style)."""

    key = "caption_loss"
    stages = (0, 2)

    @staticmethod
    def applies(m):
        return m.uses_masked_caption

    def __init__(self, method):
        super().__init__(method)
        self.masked_view = TextPass(masked=True)
        self.image_view = context_passes(method)[0] if method.uses_cross_attention else None

    @property
    def weight(self):
        return self.method.caption_weight

    def passes(self):
        return [self.masked_view] + ([self.image_view] if self.image_view is not None else [])

    def targets(self, enc: dict) -> torch.Tensor:
        """``[N, T]`` token ids to rebuild, -100 where not scored."""
        if self.method.caption_targets == "masked":
            return enc[self.masked_view]["mlm_targets"]
        return enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)

    def __call__(self, model, enc, batch):
        tokens = enc[self.masked_view]["tokens"]
        if self.image_view is not None:
            tokens = model.fusion_text(tokens, enc[self.image_view]["tokens"])
        return L.caption_loss(model.text_decoder(tokens, enc["attention_mask"]), self.targets(enc))


@OBJECTIVES.register("coca_caption")
class CoCaCaption(Objective):
    """CoCa's captioning: the multimodal layers continue the causal text stack from its
    unimodal tokens, cross-attending to the attention-pooled image tokens; next-token CE."""

    key = "caption_loss"

    @staticmethod
    def applies(m):
        return m.uses_coca

    def __init__(self, method):
        super().__init__(method)
        self.image_view, self.text_view = ImagePass(0.0), TextPass()

    @property
    def weight(self):
        return self.method.caption_weight

    def passes(self):
        return [self.image_view, self.text_view]

    def teacher_forcing(self, enc: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As open_clip's ``CoCa.forward``: the text pass reads the whole text (its CLS feeds
        the contrastive term); the captioner reads the unimodal tokens of ``ids[:-1]`` and
        predicts ``ids[1:]``. Returns tokens ``[N, T-1, W]``, attention_mask ``[N, T-1]``
        and targets ``[N, T-1]`` (-100 at padding)."""
        ids, attn = enc["input_ids"], enc["attention_mask"]
        targets = ids[:, 1:].masked_fill(attn[:, 1:] == 0, -100)
        return enc[self.text_view]["tokens"][:, :-1], attn[:, :-1], targets

    def __call__(self, model, enc, batch):
        tokens, attn, targets = self.teacher_forcing(enc)
        image_tokens = model.caption_pooler(enc[self.image_view]["tokens"])
        return L.caption_loss(model.text_decoder(tokens, attn, image_tokens), targets)


def objectives_for(m: MethodConfig) -> list[Objective]:
    """The heads of method ``m`` in registration order (the order their terms are logged)."""
    return [head(m) for head in OBJECTIVES.values() if head.applies(m)]
