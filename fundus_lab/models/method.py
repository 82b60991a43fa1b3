"""Which switch combinations of a method (``MethodConfig``) can train: checked once, when a
``FundusVLM`` is built, each error naming the field. Kept apart from the model so the rules
read as one list, beside the config they judge rather than inside the module tree.
"""

from __future__ import annotations

from fundus_lab.config import MethodConfig


def validate_method(m: MethodConfig) -> None:
    """Reject switch combinations that cannot train, naming the field."""
    for name in ("contrastive_weight", "image_gen_weight", "caption_weight"):
        if getattr(m, name) < 0:
            raise ValueError(f"method.{name}={getattr(m, name)}: weights must be >= 0")
    if m.contrastive_weight == 0 and m.image_gen_weight == 0 and m.caption_weight == 0:
        raise ValueError(f"method {m.name!r}: every loss weight is 0, nothing would train")
    if not 0.0 <= m.mask_ratio < 1.0:
        raise ValueError(f"method.mask_ratio={m.mask_ratio}: expected 0 <= mask_ratio < 1")
    if not 0.0 <= m.contrastive_mask_ratio < 1.0:
        raise ValueError(f"method.contrastive_mask_ratio={m.contrastive_mask_ratio}: expected 0 <= ratio < 1")
    if not 0.0 < m.text_mask_ratio < 1.0 and m.uses_masked_caption:
        raise ValueError(f"method.text_mask_ratio={m.text_mask_ratio}: expected 0 < ratio < 1 for masked captioning")
    if m.uses_image_decoder and m.mask_ratio == 0:
        raise ValueError("method.mask_ratio=0 with image_gen_weight > 0: nothing would be masked to rebuild")
    if m.uses_contrastive and m.contrastive_view == "masked" and m.contrastive_mask_ratio == 0:
        raise ValueError("method.contrastive_view='masked' needs method.contrastive_mask_ratio > 0")
    if not 0.0 <= m.momentum < 1.0:
        raise ValueError(f"method.momentum={m.momentum}: expected 0 <= momentum < 1")
    if m.contrastive_loss == "vilref" and (m.queue_size < 0 or m.num_labels < 1):
        raise ValueError("method.contrastive_loss='vilref' needs method.queue_size >= 0 and method.num_labels >= 1")
    if m.init_temperature <= 0 or m.max_logit_scale <= 1:
        raise ValueError("method.init_temperature must be > 0 and method.max_logit_scale > 1")
    if m.mim_masking == "block" and m.image_gen_target != "teacher":
        raise ValueError("method.mim_masking='block' regresses teacher features (EVA); set method.image_gen_target='teacher'")
    if m.uses_teacher and m.mim_masking != "block":
        raise ValueError("method.image_gen_target='teacher' needs method.mim_masking='block' ([MASK] tokens, as EVA)")
    if not 0.0 <= m.stage1_fraction < 1.0:
        raise ValueError(f"method.stage1_fraction={m.stage1_fraction}: expected 0 <= fraction < 1")
    if m.stage1_fraction > 0 and (m.image_gen_weight == 0 or m.contrastive_weight == 0 or m.caption_weight > 0):
        raise ValueError("method.stage1_fraction > 0 (two stages) needs image_gen_weight > 0 (stage 1), "
                         "contrastive_weight > 0 (stage 2) and caption_weight = 0")
    if m.uses_coca and m.cross_attention:
        raise ValueError("method.caption_mode='autoregressive' (CoCa) cross-attends inside its decoder; set method.cross_attention=false")
    if m.uses_coca and m.coca_pool_queries < 1:
        raise ValueError(f"method.coca_pool_queries={m.coca_pool_queries}: expected >= 1")
    if m.text_init == "teacher" and not (m.uses_teacher and m.uses_contrastive):
        raise ValueError("method.text_init='teacher' copies the text tower of the teacher (EVA-CLIP); it needs "
                         "image_gen_target='teacher', image_gen_weight > 0 and contrastive_weight > 0")
