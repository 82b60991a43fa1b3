"""The part every outside CLIP-style wrapper shares: the evaluation-facing API of
:class:`ExternalModel` (preprocessing through the source's own resize and crop, mean/std
normalisation, ``encode_image`` / ``image_features`` / ``encode_patches``) and the
:class:`TowerView` that shows a source's ViT with timm's names for layer-wise lr decay.
Each source (``hf_clip``, ``open_clip_checkpoint``) provides its vision tokens and projection.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _to_pil(image: torch.Tensor):
    """[3, H, W] in [0, 1] -> an 8-bit RGB PIL image (rounded, as the file it came from)."""
    from PIL import Image

    array = (image.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array, "RGB")


def _resize_crop_transform(size: int, interpolation: str = "bicubic"):
    """Shorter side to ``size`` (PIL, antialiased), centre crop, to [0, 1]: CLIP's eval transform."""
    from torchvision import transforms as T

    mode = getattr(T.InterpolationMode, interpolation.upper(), T.InterpolationMode.BICUBIC)
    return T.Compose([T.Resize(size, interpolation=mode, antialias=True), T.CenterCrop(size),
                      T.Lambda(lambda im: im.convert("RGB")), T.ToTensor()])


class TowerView(nn.Module):
    """A ViT tower seen with timm's names, for fine-tuning's layer-wise lr decay.

    ``blocks`` are the tower's transformer layers; parameters registered before them
    (patch embedding, class and position embeddings, pre-norm) become ``patch_embed.*``
    (layer 0), those after them (final norm, pooling, projection) ``norm.*``.
    Built on access, never registered, so state dicts and fingerprints do not double.
    """

    def __init__(self, tower: nn.Module, blocks: nn.ModuleList, width: int):
        super().__init__()
        self.blocks = blocks
        in_blocks = {id(p) for p in blocks.parameters()}
        before, after, seen_blocks = [], [], False
        for _, p in tower.named_parameters():
            if id(p) in in_blocks:
                seen_blocks = True
            else:
                (after if seen_blocks else before).append(p)
        self.patch_embed = nn.ParameterList(before)
        self.norm = nn.ParameterList(after)
        self.num_features = width


class ExternalModel(nn.Module):
    """Common part of the wrappers: preprocessing, normalisation, the eval-facing API."""

    kind = "external"

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], source: str,
                 pixel_transform=None):
        super().__init__()
        self.image_size = int(image_size)
        self.source = source
        # PIL image -> [3, S, S] in [0, 1]: the source's resize and crop, without its normalisation
        self.pixel_transform = pixel_transform or _resize_crop_transform(self.image_size)
        self.use_contrastive = True  # CLIP-style models are aligned image-text spaces
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    # -- to be provided by each source
    def _vision_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised pixels -> (pooled feature before projection [N, W], patch tokens [N, L, W])."""
        raise NotImplementedError

    def _project(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- shared
    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def img_size(self) -> int:
        """``image_size`` under the name fundus_lab's own models use (the widget reads it)."""
        return self.image_size

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [0, 1] -> the source model's input: images of another size than
        ``image_size`` through :attr:`pixel_transform` (the source library's own resize and
        crop, on 8-bit PIL images as it reads photos), then mean/std normalisation."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W] in [0, 1], got {list(images.shape)}")
        s = self.image_size
        if tuple(images.shape[-2:]) != (s, s):
            images = torch.stack([self.pixel_transform(_to_pil(img)) for img in images.detach().cpu()])
        images = images.to(self.pixel_mean.device, self.pixel_mean.dtype)
        return (images - self.pixel_mean) / self.pixel_std

    def image_features(self, images: torch.Tensor, mask_ratio: float = 0.0) -> dict:
        """{"cls": pooled feature before projection [N, W], "tokens": patch tokens [N, L, W]}."""
        if mask_ratio:
            raise ValueError(f"{type(self).__name__} does not mask patches (mask_ratio={mask_ratio})")
        pooled, tokens = self._vision_tokens(self.preprocess(images))
        return {"cls": pooled, "tokens": tokens}

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        pooled, _ = self._vision_tokens(self.preprocess(images))
        return F.normalize(self._project(pooled), dim=-1)

    def encode_patches(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens through the image projection, L2-normalised (MaskCLIP)."""
        if "patch_embedding" not in self.capabilities:
            raise RuntimeError(f"{self.source}: patch read-out needs a ViT tower with per-token outputs")
        _, tokens = self._vision_tokens(self.preprocess(images))
        return F.normalize(self._project(tokens), dim=-1)

    def extra_repr(self) -> str:
        return f"source={self.source!r}, image_size={self.image_size}"
