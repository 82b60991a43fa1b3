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
    text_max_length: int = 192  # fits the longest synthetic "both" text (definitions + report, 154 tokens measured)
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
    + caption_weight * L_cap`` (eq. 8). ``docs/fidelity.md`` maps every switch to the
    paper or baseline it follows.

    - ``contrastive_loss``: ``infonce`` (CLIP, eq. 2), ``label_aware`` (FLAIR: pairs that
      share a category are positives) or ``vilref`` (weighted similarity coupling with
      momentum encoders and a memory queue of ``queue_size``; needs ``num_labels``).
    - ``contrastive_view``: ``full`` (the paper's eq. 1: one unmasked pass of each encoder
      feeds the contrastive term; masked passes feed the decoders) or ``masked`` (FLIP: the
      image masked at ``contrastive_mask_ratio`` feeds it; the ``ours-flip`` variant).
    - ``contrastive_directions``: ``symmetric`` (CLIP) or ``image_to_text`` (eq. 2 as written).
    - ``image_gen_target``: ``pixels`` (MAE, eqs. 3-4) or ``teacher`` features (EVA) of a
      frozen image encoder from ``teacher_checkpoint`` (a saved CLIP model dir).
    - ``mim_masking``: ``random`` (MAE: masked patches are dropped from the encoder) or
      ``block`` (BEiT/EVA: block-wise masks, masked patches replaced by a learnt [MASK]
      token inside the encoder).
    - ``stage1_fraction``: > 0 splits the run in two stages (EVA-CLIP): the first
      ``stage1_fraction`` of the steps train masked image modelling only, the rest the
      contrastive term only, from the same encoder. The total images seen stay the budget.
    - ``caption_mode``: ``masked`` (eqs. 5-6: the masked text through ``E_text``, a decoder
      rebuilds the sequence) or ``autoregressive`` (CoCa: one causal text stack, unimodal
      then multimodal layers cross-attending to attention-pooled image tokens).
    - ``caption_targets``: ``all`` (eq. 6: cross-entropy over all T tokens) or ``masked``
      (only the masked positions, BERT/MLM-style).
    - ``cross_attention``: fuse image and text tokens before the decoders (eq. 7).
    - ``labels_from``: which labels the label-aware losses read: ``ground_truth`` (the
      dataset's) or ``report_keywords`` (ViLReF: extracted from each report by the
      knowledge base's keyword rules).
    """

    name: str = "ours"
    contrastive_weight: float = 1.0
    contrastive_loss: Literal["infonce", "label_aware", "vilref"] = "infonce"
    contrastive_view: Literal["full", "masked"] = "full"
    contrastive_mask_ratio: float = 0.5
    contrastive_directions: Literal["symmetric", "image_to_text"] = "symmetric"
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    image_gen_weight: float = 1.0
    image_gen_target: Literal["pixels", "teacher"] = "pixels"
    mask_ratio: float = 0.75
    mim_masking: Literal["random", "block"] = "random"
    norm_pix_loss: bool = True
    teacher_checkpoint: Optional[str] = None
    teacher_loss: Literal["cosine", "smooth_l1"] = "cosine"
    stage1_fraction: float = 0.0
    caption_weight: float = 1.0
    caption_mode: Literal["masked", "autoregressive"] = "masked"
    caption_targets: Literal["all", "masked"] = "all"
    text_mask_ratio: float = 0.15
    cross_attention: bool = True
    momentum: float = 0.995
    queue_size: int = 1024
    num_labels: int = 8
    labels_from: Literal["ground_truth", "report_keywords"] = "ground_truth"
    coca_pool_queries: int = 16
