"""FundusVLM: the one model behind every method (ours, its variants and the baselines).

    L_total = w_con * L_contrastive + w_img * L_img_gen + w_cap * L_caption      (eq. 8)

A method (``MethodConfig``) switches terms on and off and picks their variants; modules a
method does not use are not built. The terms are objective heads
(``fundus_lab.models.objectives``: Contrastive, ImageGeneration / TeacherMIM,
MaskedCaption / CoCaCaption), each owning its whole term (the passes it reads, its targets,
its loss call); the model holds the modules and runs the towers. ``capabilities`` says what
the model can do. :mod:`fundus_lab.models.factory` builds and loads it. ``forward`` follows the paper (``docs/fidelity.md`` maps
each step to its equation and declares every deviation):

1. encode (eq. 1): ``E_img`` / ``E_text`` on the unmasked image and text, one pass each,
   for the contrastive term; ``E_img`` on the masked image (eq. 3) and ``E_text`` on the
   masked text (eq. 5) for the decoders. Only the passes the method reads are run
   (:meth:`FundusVLM.passes` says which);
2. contrastive (eq. 2, or FLAIR / ViLReF variants) on projected, normalised CLS features;
3. fuse (eq. 7): ``CA_img`` (masked image tokens query the text), ``CA_text`` (masked text
   tokens query the image), each reading the other branch's contrastive-pass tokens;
4. image generation (eqs. 3-4): MAE decoder on the fused image tokens -> masked patches;
   or EVA stage 1: [MASK]-token encoder regressing a frozen teacher's patch features;
5. captioning (eqs. 5-6): a decoder rebuilds the whole text from the fused masked-text
   tokens, or CoCa's multimodal layers continue the causal text stack.

``forward`` returns pre-weighted terms: ``loss == sum of the *_loss entries``.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from fundus_lab import losses as L
from fundus_lab.checkpoint import CheckpointError
from fundus_lab.config import MethodConfig, ModelConfig
from fundus_lab.schema import to_dict
from fundus_lab.models.card import write_model_card
from fundus_lab.models.coca import AttentionalPooler, CoCaTextEncoder, MultimodalDecoder
from fundus_lab.models.decoders import MAEDecoder, MaskedTextDecoder
from fundus_lab.models.fusion import CrossAttention
from fundus_lab.models.image import ImageTower, block_mask, build_image_encoder, patchify, unpatchify
from fundus_lab.models.method import validate_method
from fundus_lab.models.objectives import ImagePass, Pass, TextPass, context_passes, objectives_for
from fundus_lab.models.text import TextEncoder, mask_tokens, small_bert_config
from fundus_lab.registry import Registry

FORMAT = "fundus_lab.FundusVLM"
FORMAT_VERSION = 2
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TOKENIZER_DIR = "tokenizer"

# what a model can do, for eval / viz / widgets (no attribute probing): name -> what it gives
CAPABILITIES: Registry[str] = Registry("capability")
for _name, _gives in (
    ("image_embedding", "encode_image in a joint image-text space (else: the ViT's CLS)"),
    ("text_embedding", "encode_text: zero-shot and prompt heads"),
    ("patch_embedding", "encode_patches: where a prompt matches"),
    ("reconstruction", "reconstruct: pixels rebuilt from a masked image"),
    ("text_conditioned_reconstruction", "reconstruct(texts=...): through CA_img (eq. 7)"),
    ("cross_attention_maps", "cross_attention_maps: CA_text's text -> image attention"),
    ("captioning", "a caption / text-rebuilding term"),
    ("attention_maps", "attention_maps: the image tower's self-attention (ViTs)"),
    ("image_features", "image_features: pooled feature and patch tokens (probes)"),
    ("fine_tune", "image_encoder with .blocks: layer-wise lr decay fine-tuning"),
):
    CAPABILITIES.register(_name, _gives)


def build_vision_transformer(cfg: ModelConfig, mask_token: bool = False) -> ImageTower:
    """The image tower ``model.image_encoder`` names (any timm ViT or CNN), without outside
    weights: :func:`build_model` loads ``model.image_weights``; a restored checkpoint has its own."""
    return build_image_encoder(cfg, mask_token=mask_token, load_weights=False)


def code_revision(m: MethodConfig) -> int | None:
    """A revision of a method's code that changes what its pretraining learns where its config
    does not show it, or None. Part of the pretraining cache key
    (``experiment.pretraining._pretrain_inputs``), so runs cached before the change retrain; methods
    without one keep the keys they had.

    CoCa 2: the text CLS at the fixed-context position (issue 17); before, at the batch's
    padded length, a position the CLS of a new checkpoint is never trained at.
    """
    if m.uses_coca:
        return 2
    return None


def stage1_steps(fraction: float, total_steps: int) -> int:
    """Steps of stage 1 in a two-stage run of ``total_steps`` (EVA-CLIP); stage 2 takes the
    rest, so the images seen over both stages are exactly the run's budget."""
    return int(round(fraction * total_steps))


class FundusVLM(nn.Module):
    """Two-branch vision-language model with contrastive, image-generation and caption terms.

    Build it with :func:`build_model` (which also loads pretrained text weights and a
    teacher) or :func:`load_model`; the constructor itself only builds modules.

    Args:
        model_cfg: sizes (``ModelConfig``).
        method_cfg: terms, weights and switches (``MethodConfig``).
        tokenizer: a HF tokenizer with ``[PAD] [CLS] [MASK]``; required when the method
            has a text branch.
        text_config: the HF config of the text encoder (default: a small BERT).
        teacher_config: ``ModelConfig`` of the EVA teacher's image encoder.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        method_cfg: MethodConfig,
        tokenizer=None,
        text_config=None,
        teacher_config: ModelConfig | None = None,
    ):
        super().__init__()
        validate_method(method_cfg)
        self.model_cfg, self.method_cfg = model_cfg, method_cfg
        m = method_cfg
        self.use_contrastive = m.uses_contrastive
        self.use_image_gen = m.uses_image_decoder
        self.use_caption = m.uses_caption
        self.masked_caption = m.uses_masked_caption
        self.coca = m.uses_coca
        self.has_text = m.uses_text
        self.use_momentum = self.use_contrastive and m.contrastive_loss == "vilref"
        self.teacher_target = m.uses_teacher
        self.stage = 1 if m.stage1_fraction > 0 else 0  # 0: one stage (every term every step)
        self._truncation_warned = False

        self.image_encoder = build_vision_transformer(model_cfg, mask_token=self.teacher_target)
        vw = self.image_encoder.width
        self.tokenizer = tokenizer
        self.text_encoder = None
        vocab = len(tokenizer) if tokenizer is not None else 0
        if self.has_text:
            if tokenizer is None:
                raise ValueError(f"method {m.name!r} has a text branch: build_model needs a tokenizer")
            if self.coca:  # CoCa: one causal stack; these are its unimodal layers
                if model_cfg.text_pooling != "cls":
                    raise ValueError(f"model.text_pooling={model_cfg.text_pooling!r}: CoCa's contrastive text feature is "
                                     "its appended CLS token (method.caption_mode='autoregressive'); set model.text_pooling='cls'")
                self.text_encoder = CoCaTextEncoder(
                    vocab, model_cfg.text_max_length, model_cfg.text_width, model_cfg.text_depth,
                    model_cfg.text_heads, model_cfg.mlp_ratio,
                )
            else:
                if text_config is None:
                    text_config = small_bert_config(
                        vocab, model_cfg.text_width, model_cfg.text_depth, model_cfg.text_heads,
                        model_cfg.text_max_length, tokenizer.pad_token_id, dropout=model_cfg.text_dropout,
                    )
                if vocab > text_config.vocab_size:
                    raise ValueError(f"tokenizer has {vocab} tokens but the text encoder only {text_config.vocab_size}")
                self.text_encoder = TextEncoder(text_config)
        tw = self.text_encoder.width if self.text_encoder is not None else None

        # contrastive heads (eq. 2)
        if self.use_contrastive:
            self.image_proj = nn.Linear(vw, model_cfg.embed_dim, bias=False)
            self.text_proj = nn.Linear(tw, model_cfg.embed_dim, bias=False)
            nn.init.normal_(self.image_proj.weight, std=vw**-0.5)
            nn.init.normal_(self.text_proj.weight, std=tw**-0.5)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / m.init_temperature)))

        # cross-attention (eq. 7): each direction only where a decoder reads its output
        use_fusion = m.uses_cross_attention
        self.fusion_image = (
            CrossAttention(vw, tw, model_cfg.fusion_depth, model_cfg.fusion_heads, model_cfg.mlp_ratio)
            if use_fusion and self.use_image_gen and not self.teacher_target else None
        )
        self.fusion_text = (
            CrossAttention(tw, vw, model_cfg.fusion_depth, model_cfg.fusion_heads, model_cfg.mlp_ratio)
            if use_fusion and self.masked_caption else None
        )

        # image generation (eqs. 3-4) or teacher-feature regression (EVA stage 1)
        self.teacher = None
        self.teacher_config = None
        if self.use_image_gen:
            if self.teacher_target:
                self.teacher_config = teacher_config or model_cfg
                if (self.teacher_config.img_size, self.teacher_config.patch_size) != (model_cfg.img_size, model_cfg.patch_size):
                    raise ValueError("method.teacher_checkpoint: the teacher must use the same img_size and patch_size")
                self.teacher = build_vision_transformer(self.teacher_config)
                self.teacher.requires_grad_(False)
                # EVA: the encoder's own output tokens, through a linear head, regress the teacher
                self.image_decoder = nn.Linear(vw, self.teacher.width)
            else:
                self.image_decoder = MAEDecoder(
                    self.image_encoder.num_patches, vw, model_cfg.decoder_width, model_cfg.decoder_depth,
                    model_cfg.decoder_heads, self.image_encoder.patch_size**2 * 3, model_cfg.mlp_ratio,
                )

        # captioning (eqs. 5-6)
        if self.masked_caption:
            self.text_decoder = MaskedTextDecoder(tw, model_cfg.text_decoder_depth, model_cfg.text_heads, vocab, model_cfg.mlp_ratio)
        elif self.coca:
            self.text_decoder = MultimodalDecoder(tw, model_cfg.caption_depth, model_cfg.text_heads, vw, vocab, model_cfg.mlp_ratio)
            self.contrastive_pooler = AttentionalPooler(vw, vw, 1, model_cfg.vision_heads)
            self.caption_pooler = AttentionalPooler(vw, vw, m.coca_pool_queries, model_cfg.vision_heads)

        # ViLReF: momentum encoders and a memory queue
        if self.use_momentum:
            self.momentum_image_encoder = copy.deepcopy(self.image_encoder).requires_grad_(False)
            self.momentum_image_proj = copy.deepcopy(self.image_proj).requires_grad_(False)
            self.momentum_text_encoder = copy.deepcopy(self.text_encoder).requires_grad_(False)
            self.momentum_text_proj = copy.deepcopy(self.text_proj).requires_grad_(False)
            k, d = m.queue_size, model_cfg.embed_dim
            self.register_buffer("image_queue", torch.zeros(k, d))
            self.register_buffer("text_queue", torch.zeros(k, d))
            self.register_buffer("label_queue", torch.zeros(k, m.num_labels))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
            self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))

        self.objectives = objectives_for(m)  # the terms of eq. 8 this method trains

    # ------------------------------------------------------------------ what it can do
    @property
    def capabilities(self) -> frozenset[str]:
        """The subset of :data:`CAPABILITIES` this model supports (eval, viz and widgets read
        this instead of probing attributes)."""
        caps = {"image_embedding"} if self.use_contrastive else set()
        if self.use_contrastive:
            caps |= {"text_embedding", "patch_embedding"}
        if self.use_image_gen and not self.teacher_target:
            caps.add("reconstruction")
        if self.fusion_image is not None:
            caps.add("text_conditioned_reconstruction")
        if self.fusion_text is not None:
            caps.add("cross_attention_maps")
        if self.use_caption:
            caps.add("captioning")
        caps.add("image_features")
        if getattr(self.image_encoder, "supports_masking", False):  # a ViT: attention maps, per-block lr decay
            caps |= {"attention_maps", "fine_tune"}
        return frozenset(caps)

    def has(self, capability: str) -> bool:
        """Whether the model can do ``capability``, a :data:`CAPABILITIES` name (an unknown
        name is an error that suggests the close ones, never a silent False)."""
        CAPABILITIES.get(capability)
        return capability in self.capabilities

    def passes(self) -> list[Pass]:
        """The encoder passes one training step runs: the union of what the active
        objective heads declare (``fundus_lab.models.objectives``), each once, in the
        heads' order. The paper's ``ours`` runs one unmasked and one masked pass of each
        encoder."""
        plan: list[Pass] = []
        for head in self.objectives:
            if head.active(self.stage):
                plan += [p for p in head.passes() if p not in plan]
        return plan

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return next(self.image_encoder.parameters()).device  # any tower (a CNN has no cls_token)

    def _scale(self) -> torch.Tensor:
        """exp(t) clamped to ``max_logit_scale`` (CLIP: 100)."""
        return self.logit_scale.clamp(max=math.log(self.method_cfg.max_logit_scale)).exp()

    def _require(self, what: str, ok: bool, why: str):
        if not ok:
            raise RuntimeError(f"method {self.method_cfg.name!r} has no {what}: {why}")

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """list[str] -> input_ids, attention_mask ``[N, T]`` on the model's device.

        Texts longer than ``model.text_max_length`` tokens are cut; the first time that
        happens the model warns with the count (nothing is cut silently).
        """
        self._require("text encoder", self.text_encoder is not None, "its contrastive and caption weights are 0")
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise TypeError(f"texts must be a list of str, got {type(texts).__name__}")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"batch['text'][{i}] is {t!r}: method {self.method_cfg.name!r} needs a text for every image")
        cfg_max = getattr(getattr(self.text_encoder, "config", None), "max_position_embeddings", 10**9)
        max_length = min(self.model_cfg.text_max_length, cfg_max)
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                             return_tensors="pt", return_overflowing_tokens=False, return_length=False)
        if not self._truncation_warned and enc["attention_mask"].shape[1] >= max_length:
            lengths = [len(x) for x in self.tokenizer(list(texts), truncation=False)["input_ids"]]
            cut = sum(n > max_length for n in lengths)
            if cut:
                self._truncation_warned = True
                warnings.warn(
                    f"method {self.method_cfg.name!r}: {cut} of {len(texts)} texts in this batch are longer than "
                    f"model.text_max_length={max_length} tokens (longest {max(lengths)}) and were truncated; "
                    "raise model.text_max_length to keep them whole (warned once)", stacklevel=2)
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def _special_ids(self) -> list[int]:
        return [i for i in self.tokenizer.all_special_ids if i is not None]

    def set_progress(self, step: int, total_steps: int) -> int:
        """Tell a two-stage method (EVA-CLIP, ``stage1_fraction > 0``) where training is:
        steps ``[0, round(fraction * total))`` are stage 1, the rest stage 2. Returns the
        stage (0 for one-stage methods). Derived from the step, so resume is exact."""
        f = self.method_cfg.stage1_fraction
        if f > 0:
            self.stage = 1 if step < stage1_steps(f, total_steps) else 2
        return self.stage

    # ------------------------------------------------------------------ encoders (inference API)
    def image_features(self, images: torch.Tensor, mask_ratio: float = 0.0) -> dict:
        """Features for probes / fine-tuning: dict(cls ``[N, W]``, tokens ``[N, L', W]`` (patches
        only), mask ``[N, L]``, ids_restore ``[N, L]``).

        ``cls`` is the pooled image feature: the tower's CLS (or a CNN's pool), except for
        CoCa, whose image feature is its attentional pool through the image projection,
        what open_clip's ``CoCa.encode_image(normalize=False)`` returns (open_clip's
        visual tower projects the pooled token; there is no other pooled output).
        """
        out = self.image_encoder(images, mask_ratio)
        pooled = self.image_proj(self.image_embedding_input(out)) if self.coca and self.use_contrastive else out["cls"]
        return {"cls": pooled, "tokens": out["tokens"][:, 1:], "mask": out["mask"], "ids_restore": out["ids_restore"]}

    @property
    def image_feature_modules(self) -> tuple[str, ...]:
        """Top-level modules besides ``image_encoder`` that ``image_features`` reads, which
        fine-tuning trains with the encoder (CoCa: its contrastive pooler and projection)."""
        return ("contrastive_pooler", "image_proj") if self.coca and self.use_contrastive else ()

    def text_embedding_input(self, text: dict) -> torch.Tensor:
        """The pooled text feature the contrastive projection reads (``model.text_pooling``):
        the [CLS] / CoCa CLS token, or the mean of the non-padding tokens (FLAIR)."""
        if self.model_cfg.text_pooling == "mean" and not self.coca:
            keep = text["attention_mask"].unsqueeze(-1).to(text["tokens"].dtype)  # [N, T, 1]
            return (text["tokens"] * keep).sum(1) / keep.sum(1).clamp(min=1.0)
        return text["cls"]

    def image_embedding_input(self, enc: dict) -> torch.Tensor:
        """The pooled image feature the contrastive projection reads: the CLS token, or
        CoCa's one-query attentional pool over every token."""
        if self.coca:
            return self.contrastive_pooler(enc["tokens"])[:, 0]
        return enc["cls"]

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` in [0, 1] -> ``[N, D]`` L2-normalised (the ViT's CLS for ``mae``)."""
        enc = self.image_encoder(images)
        z = self.image_proj(self.image_embedding_input(enc)) if self.use_contrastive else enc["cls"]
        return F.normalize(z, dim=-1)

    def encode_text(self, texts: str | Sequence[str]) -> torch.Tensor:
        """list[str] -> ``[N, D]`` L2-normalised; one str is a list of one (open_clip's habit)."""
        self._require("text embedding", self.use_contrastive, "it learns no image-text alignment (contrastive_weight is 0)")
        ids, attn = self.tokenize([texts] if isinstance(texts, str) else texts)
        return F.normalize(self.text_proj(self.text_embedding_input(self.text_encoder(ids, attn))), dim=-1)

    def encode_patches(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens through the CLS projection, ``[N, L, D]`` L2-normalised.

        The dense read-out of MaskCLIP (no extra training): where in the image a prompt
        matches. Only meaningful for methods with a contrastive term.
        """
        self._require("joint embedding space", self.use_contrastive, "contrastive_weight is 0")
        tokens = self.image_encoder(images)["tokens"][:, 1:]
        return F.normalize(self.image_proj(tokens), dim=-1)

    @torch.no_grad()
    def attention_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Self-attention of every ViT block: list of float ``[N, heads, 1 + L, 1 + L]``."""
        return [a.float() for a in self.image_encoder.attention_maps(images)]

    @torch.no_grad()
    def cross_attention_maps(self, images: torch.Tensor, texts: Sequence[str], mask_text: bool = False) -> dict:
        """Text token -> image token attention of ``CA_text`` (eq. 7) on the inputs it is
        trained on: text tokens query the image view ``CA_text`` reads in training (the
        unmasked image for ``ours``, the contrastive masked view for ``ours-flip``). In
        training most text tokens (``1 - text_mask_ratio``) are unmasked, so the unmasked
        text is in-distribution; ``mask_text=True`` masks it as one training step would.

        Returns dict(maps: list per layer of ``[N, heads, T, 1 + L']`` (column 0 is the image
        CLS token), tokens: list of token strings per text, attention_mask ``[N, T]``).
        """
        self._require("text->image cross-attention", self.has("cross_attention_maps"),
                      "method.cross_attention is false or masked captioning is off")
        ids, attn = self.tokenize(texts)
        if mask_text:
            ids, _ = mask_tokens(ids, attn, self.method_cfg.text_mask_ratio, self.tokenizer.mask_token_id, self._special_ids())
        img = self.image_encoder(images, context_passes(self.method_cfg)[0].ratio)["tokens"]
        txt = self.text_encoder(ids, attn)["tokens"]
        _, maps = self.fusion_text(txt, img, return_attention=True)
        maps = [a.float() for a in maps]
        tokens = [self.tokenizer.convert_ids_to_tokens(row[mask.bool()].tolist()) for row, mask in zip(ids.cpu(), attn.cpu())]
        return {"maps": maps, "tokens": tokens, "attention_mask": attn}

    # ------------------------------------------------------------------ training step
    def forward(self, batch: dict) -> dict:
        """One training step's losses: run the passes the active heads declare, then each head.

        Args:
            batch: ``fl.data.collate`` output: "image" ``[N, 3, H, W]`` in [0, 1], "text"
                list[str] (methods with a text branch), "label" (FLAIR / ViLReF).
        Returns:
            dict with "loss" (eq. 8) = the sum of the pre-weighted ``*_loss`` terms,
            "logit_scale" (detached) where there is a contrastive term, and "stage" for
            two-stage methods.
        """
        if "image" not in batch:
            raise KeyError("batch has no 'image'")
        enc = self.encode_passes(batch, self.passes())
        heads = [head for head in self.objectives if head.active(self.stage)]
        terms = {head.key: head(self, enc, batch) for head in heads}
        logs: dict[str, Any] = {}
        if "contrastive_loss" in terms:
            logs["logit_scale"] = self._scale().detach()
        if self.stage:
            logs["stage"] = self.stage
        total, weighted = L.total_loss(terms, {head.key: head.weight for head in heads})
        for head in heads:
            head.after_step(self, enc, batch)
        return {"loss": total, **weighted, **logs}

    def encode_passes(self, batch: dict, passes: Sequence[Pass]) -> dict:
        """Eqs. 1, 3, 5: run each pass once. Returns ``{pass: encoder output}`` plus
        ``images`` and, where a text pass runs, the batch's ``input_ids`` and
        ``attention_mask`` ``[N, T]``. Image passes run in the order given, then the masked
        text pass (its output carries ``mlm_targets``), then the whole text."""
        images = batch["image"].to(self.device)
        enc: dict[Any, Any] = {"images": images}
        for p in passes:
            if not isinstance(p, ImagePass):
                continue
            if p.mask_token:
                mask = block_mask(images.shape[0], self.image_encoder.grid_size, p.ratio).to(images.device)
                out = self.image_encoder.forward_features(images, mask=mask)
                enc[p] = {**out, "mask": mask.to(out["tokens"].dtype)}
            else:
                enc[p] = self.image_encoder(images, p.ratio)
        text_passes = sorted((p for p in passes if isinstance(p, TextPass)), key=lambda p: not p.masked)
        if text_passes:
            if "text" not in batch or batch["text"] is None:
                raise KeyError(f"method {self.method_cfg.name!r} needs batch['text'] (one text per image)")
            ids, attn = self.tokenize(batch["text"])
            enc.update(input_ids=ids, attention_mask=attn)
            for p in text_passes:
                if p.masked:
                    masked_ids, targets = mask_tokens(ids, attn, self.method_cfg.text_mask_ratio,
                                                      self.tokenizer.mask_token_id, self._special_ids())
                    enc[p] = {**self.text_encoder(masked_ids, attn), "mlm_targets": targets}
                else:
                    enc[p] = self.text_encoder(ids, attn)
        return enc

    # ------------------------------------------------------------------ after the optimizer step
    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Call after every optimizer step: clamp the temperature (CLIP) and move the
        momentum encoders ``theta_m <- mu theta_m + (1 - mu) theta`` (ViLReF)."""
        if self.use_contrastive:
            self.logit_scale.clamp_(0, math.log(self.method_cfg.max_logit_scale))
        if self.use_momentum:
            mu = self.method_cfg.momentum
            for online, ema in (
                (self.image_encoder, self.momentum_image_encoder),
                (self.image_proj, self.momentum_image_proj),
                (self.text_encoder, self.momentum_text_encoder),
                (self.text_proj, self.momentum_text_proj),
            ):
                for p, q in zip(online.parameters(), ema.parameters()):
                    q.mul_(mu).add_(p.detach(), alpha=1 - mu)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:  # a frozen teacher stays in eval mode (no drop-path)
            self.teacher.eval()
        return self

    # ------------------------------------------------------------------ visualisation
    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, mask_ratio: float | None = None, texts: Sequence[str] | None = None) -> dict:
        """Rebuild masked patches for display (MAE figure), along the trained path.

        Where the method has ``CA_img`` (eq. 7) the masked image tokens query the texts'
        tokens first, as in training, so ``texts`` (one per image) are required then.

        Returns dict(pred_images ``[N, 3, H, W]`` in [0, 1] (the prediction everywhere),
        pasted ``[N, 3, H, W]`` (visible patches from the input, masked ones predicted),
        masked_images (input with masked patches zeroed), mask ``[N, L]``, mask_image
        ``[N, 1, H, W]`` (1 = masked)). With ``norm_pix_loss`` the per-patch normalised
        prediction is mapped back with each patch's true mean and variance, for display only.
        """
        self._require("pixel decoder", self.has("reconstruction"),
                      "it does not rebuild pixels (image_gen_weight is 0 or the target is teacher features)")
        ratio = self.method_cfg.mask_ratio if mask_ratio is None else mask_ratio
        enc = self.image_encoder(images, ratio)
        tokens = enc["tokens"]
        if self.fusion_image is not None:
            if texts is None:
                raise ValueError(f"method {self.method_cfg.name!r} rebuilds images through CA_img (eq. 7): "
                                 "reconstruct(images, texts=[...]) needs one text per image")
            if len(texts) != images.shape[0]:
                raise ValueError(f"reconstruct: {len(texts)} texts for {images.shape[0]} images")
            ids, attn = self.tokenize(list(texts))
            tokens = self.fusion_image(tokens, self.text_encoder(ids, attn)["tokens"], ~attn.bool())
        pred = self.image_decoder(tokens, enc["ids_restore"])
        p = self.image_encoder.patch_size
        target = patchify(self.image_encoder.normalize(images), p)
        if self.method_cfg.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            pred = pred * (var + 1.0e-6) ** 0.5 + mean
        enc_mean, enc_std = self.image_encoder.mean, self.image_encoder.std
        pred_images = (unpatchify(pred, p) * enc_std + enc_mean).clamp(0, 1)
        mask_image = unpatchify(enc["mask"].unsqueeze(-1).expand(-1, -1, p * p * 3), p)[:, :1]
        return {
            "pred_images": pred_images,
            "pasted": images * (1 - mask_image) + pred_images * mask_image,
            "masked_images": images * (1 - mask_image),
            "mask": enc["mask"],
            "mask_image": mask_image,
        }

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write ``model.safetensors``, ``config.json`` (model + method + text/teacher configs),
        ``tokenizer/`` and a model card ``README.md``. Loading needs nothing else (no original
        paths, no pickle): :meth:`from_pretrained` or ``fl.load_model``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
        model_dict = to_dict(self.model_cfg)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
            model_dict["tokenizer"] = TOKENIZER_DIR
        payload = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": model_dict,
            "method": to_dict(self.method_cfg),
            "text_config": self.text_encoder.config.to_dict() if isinstance(self.text_encoder, TextEncoder) else None,
            "teacher_model": to_dict(self.teacher_config) if self.teacher_config is not None else None,
        }
        (out / CONFIG_NAME).write_text(json.dumps(payload, indent=2, default=str))
        write_model_card(out)  # README.md: method, config, data and budget of the run it sits in
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "FundusVLM":
        """The model a :meth:`save_pretrained` folder holds (safetensors + JSON; no code runs,
        nothing is downloaded: a local folder only). Same as :func:`load_model` for our folders."""
        path = Path(path)
        if not (path / CONFIG_NAME).is_file():
            raise CheckpointError(f"{path}: no {CONFIG_NAME}; FundusVLM.from_pretrained reads a local folder written by "
                                  "save_pretrained (fl.load_model also reads open_clip and Hugging Face CLIP folders)")
        from fundus_lab.models.factory import load_model  # factory builds FundusVLM: a real cycle

        return load_model(path, map_location=map_location)
