"""Models: the image and text encoders, the fusion, the decoders and the model that joins them.

    model = build_model(cfg.model, cfg.method, tokenizer)   # a FundusVLM
    model.save_pretrained(out_dir); model = load_model(out_dir)
"""

from fundus_lab.checkpoint import CheckpointError
from fundus_lab.config import MethodConfig, ModelConfig
from fundus_lab.models.image import (
    VisionTransformer, block_mask, build_image_encoder, load_image_weights, patchify, random_masking, unpatchify,
)
from fundus_lab.models.factory import build_model, load_model
from fundus_lab.models.model import FundusVLM

__all__ = [
    "CheckpointError",
    "FundusVLM",
    "MethodConfig",
    "ModelConfig",
    "VisionTransformer",
    "block_mask",
    "build_image_encoder",
    "load_image_weights",
    "build_model",
    "load_model",
    "patchify",
    "random_masking",
    "unpatchify",
]
