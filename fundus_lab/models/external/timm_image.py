"""timm and RETFound ViT image weights as an image-only outside model (:class:`TimmImageModel`):
a weights file whose sizes are read off its tensors, or a timm hub folder (``config.json``
with ``architecture``, ``model_args``, ``pretrained_cfg``). No text tower, so no zero-shot;
probes and fine-tuning read its class token.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from fundus_lab.checkpoint import CheckpointError
from fundus_lab.export import TIMM_SIZES, timm_architecture
from fundus_lab.models.external.safety import WEIGHT_SUFFIXES, ExternalModelError, check_timm_name, read_json
from fundus_lab.models.image import VisionTransformer, load_image_weights
from fundus_lab.models.image import read_state_dict as read_image_state

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _is_timm_vit(state: dict) -> bool:
    return "patch_embed.proj.weight" in state and any(k.startswith("blocks.0.") for k in state)


def _timm_vit_args(state: dict, path: Path) -> dict:
    """A timm ViT's sizes read off its weights. The head count is not in the weights: the
    registered size of that width (ViT-Ti/S/B/L: 3/6/12/16), else width / 64 (ViT's head width)."""
    width, _, patch, _ = state["patch_embed.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    prefix = 1 if "cls_token" in state else 0
    tokens = state["pos_embed"].shape[1] - prefix if "pos_embed" in state else None
    side = math.isqrt(tokens) if tokens else None
    if not side or side * side != tokens:
        raise ExternalModelError(f"{path}: pos_embed {list(state.get('pos_embed', torch.empty(0)).shape)} is not a "
                                 "square grid; pass a timm config.json beside the weights (architecture, model_args)")
    heads = {w: h for (w, h) in TIMM_SIZES}.get(int(width), max(1, int(width) // 64))
    return {"img_size": side * patch, "patch_size": int(patch), "embed_dim": int(width), "depth": depth,
            "num_heads": heads, "mlp_ratio": state["blocks.0.mlp.fc1.weight"].shape[0] / int(width),
            "class_token": bool(prefix), "global_pool": "token"}


class TimmImageModel(nn.Module):
    """An image-only outside model: timm or RETFound ViT weights behind the evaluation
    interface. It has no text tower, so zero-shot (and the few-shot prompt head) is n/a;
    few-shot probes, the linear probe and fine-tuning read its class token."""

    kind = "timm"

    def __init__(self, tower: nn.Module, source: str):
        super().__init__()
        self.image_encoder = tower  # fundus_lab's ViT tower around the timm model: normalises inside
        self.source = source
        self.img_size = self.image_size = int(tower.img_size)
        self.text_encoder = None
        self.use_contrastive = False
        self.capabilities = frozenset({"image_embedding", "image_features", "fine_tune"})

    def image_features(self, images: torch.Tensor, mask_ratio: float = 0.0) -> dict:
        out = self.image_encoder(images, mask_ratio)
        return {"cls": out["cls"], "tokens": out["tokens"][:, 1:]}

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """The class token, L2-normalised (no projection: the model learned none)."""
        return F.normalize(self.image_encoder(images)["cls"], dim=-1)

    def extra_repr(self) -> str:
        return f"source={self.source!r}, image_size={self.image_size}"


def load_timm_image(path: str | Path) -> TimmImageModel:
    """timm or RETFound ViT image weights: a weights file (its sizes read off the tensors;
    RETFound's ``{"model": ...}`` unwrapped, heads dropped) or a timm hub folder
    (``config.json`` with ``architecture``, ``model_args``, ``pretrained_cfg`` + weights)."""
    import timm
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    path = Path(path)
    mean, std = IMAGENET_MEAN, IMAGENET_STD  # timm's and RETFound's normalisation
    if path.is_dir():
        config = read_json(path / "config.json")
        weights = next((p for s in WEIGHT_SUFFIXES for p in sorted(path.glob(f"*{s}"))), None)
        if weights is None or "architecture" not in config:
            raise ExternalModelError(f"{path}: a timm folder needs config.json with 'architecture' and a weights file")
        arch, args = config["architecture"], dict(config.get("model_args") or {})
        check_timm_name({"timm_model_name": arch}, path / "config.json")  # no hf-hub: names
        fetching = sorted(k for k in args if k.startswith("pretrained") or k in ("checkpoint_path", "cache_dir"))
        if fetching:
            raise CheckpointError(f"{path / 'config.json'}: model_args {fetching} refused: a checkpoint's config never "
                                  "tells timm where to fetch or read weights; the folder's own weights file is read")
        pretrained = config.get("pretrained_cfg") or {}
        mean, std = tuple(pretrained.get("mean", mean)), tuple(pretrained.get("std", std))
    else:
        weights = path
        args = _timm_vit_args(read_image_state(path), path)
        arch = timm_architecture({**args})
    args.update(num_classes=0, pretrained=False)
    try:
        trunk = timm.create_model(arch, **args)
    except (RuntimeError, TypeError) as err:
        raise ExternalModelError(f"{path}: timm cannot build {arch!r} with {args} ({err})") from None
    if not isinstance(trunk, TimmViT):
        raise ExternalModelError(f"{path}: {arch!r} is a {type(trunk).__name__}; image-only outside models are timm ViTs")
    tower = VisionTransformer(trunk, mean=mean, std=std, name=arch)
    load_image_weights(tower, weights)
    return TimmImageModel(tower, source=str(path)).eval()


def weights_are_timm_vit(path: Path) -> bool:
    """Whether a weights file holds a timm ViT (``patch_embed.*``, ``blocks.*``; RETFound's too)
    rather than an open_clip model (``visual.*``); unreadable files are left to the loaders."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), "pt") as f:
                keys = list(f.keys())
        except Exception:  # not safetensors: the loader names the problem
            return False
        strip = next((p for p in ("module.", "image_encoder.trunk.", "trunk.") if keys and all(k.startswith(p) for k in keys)), "")
        return _is_timm_vit({k[len(strip):]: None for k in keys})
    try:
        return _is_timm_vit(read_image_state(path))
    except Exception:  # unreadable or pickled code: the loader that is tried next says so
        return False
