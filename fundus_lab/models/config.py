"""Model and method sections of a run config (sizes vs. switches and weights).

``ModelConfig`` says how big each module is; ``MethodConfig`` says which loss terms are on,
with which weights, and so which modules exist at all. A method (``configs/methods/*.yaml``)
is a ``method:`` section and, where it needs one, a few ``model:`` keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


@dataclass
class ModelConfig:
    """Sizes of the two branches, the fusion and the decoders.

    ``text_pretrained`` is a local Hugging Face checkpoint directory for the text encoder
    (its width then wins over ``text_width``/``text_depth``/``text_heads``);
    ``tokenizer`` a tokenizer directory (default: the checkpoint's own tokenizer, else one
    trained on the knowledge base with ``vocab_size`` tokens at most).
    """

    img_size: int = 224
    patch_size: int = 16
    vision_width: int = 192
    vision_depth: int = 12
    vision_heads: int = 3
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    text_width: int = 192
    text_depth: int = 4
    text_heads: int = 3
    text_max_length: int = 96
    text_pretrained: Optional[str] = None
    tokenizer: Optional[str] = None
    vocab_size: int = 4000
    embed_dim: int = 256
    fusion_depth: int = 1
    fusion_heads: int = 3
    decoder_width: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    text_decoder_depth: int = 1
    caption_depth: int = 2
    # image tower: "vit" (the ViT above, made by timm) or any timm model name ("vit_base_patch16_224",
    # "resnet50"); image_weights: a timm or RETFound .safetensors/.pth/.bin file loaded into it
    image_encoder: str = "vit"
    image_weights: Optional[str] = None


@dataclass
class MethodConfig:
    """What is learned: which loss terms, with which weights, and which modules exist.

    A weight of 0 switches a term off and its modules are not built (honest parameter
    counts and speed). ``L_total = contrastive_weight * L_con + image_gen_weight * L_img
    + caption_weight * L_cap`` (eq. 8).

    - ``contrastive_loss``: ``infonce`` (CLIP, eq. 2), ``label_aware`` (FLAIR: pairs that
      share a category are positives) or ``vilref`` (weighted similarity coupling with
      momentum encoders and a memory queue of ``queue_size``; needs ``num_labels``).
    - ``contrastive_view``: ``full`` images/texts feed the contrastive term (a second,
      masked pass feeds the decoders) or the ``masked`` passes feed both (FLIP; the
      report is the masked one only where masked captioning makes one).
    - ``image_gen_target``: ``pixels`` (MAE, eqs. 3-4) or ``teacher`` features (EVA-02)
      of a frozen image encoder from ``teacher_checkpoint`` (a saved CLIP model dir).
    - ``caption_mode``: ``masked`` (rebuild the ``text_mask_ratio`` masked tokens, eqs. 5-6)
      or ``autoregressive`` (CoCa captioner cross-attending to image tokens).
    - ``cross_attention``: fuse image and text tokens before the decoders (eq. 7).
    """

    name: str = "ours"
    contrastive_weight: float = 1.0
    contrastive_loss: Literal["infonce", "label_aware", "vilref"] = "infonce"
    contrastive_view: Literal["full", "masked"] = "full"
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    image_gen_weight: float = 1.0
    image_gen_target: Literal["pixels", "teacher"] = "pixels"
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    teacher_checkpoint: Optional[str] = None
    teacher_loss: Literal["cosine", "smooth_l1"] = "cosine"
    caption_weight: float = 1.0
    caption_mode: Literal["masked", "autoregressive"] = "masked"
    text_mask_ratio: float = 0.15
    cross_attention: bool = True
    momentum: float = 0.995
    queue_size: int = 1024
    num_labels: int = 8
