"""Image encoder E_img: any timm ViT or CNN behind one interface, with patch masking on ViTs.

``build_image_encoder(model_cfg)`` turns ``model.image_encoder`` into a tower: ``"vit"`` (the
preset's ViT, made by ``timm.create_model`` with the preset's sizes and MAE's fixed sin-cos
position table) or any timm model name (``vit_base_patch16_224``, ``resnet50``, ...).
``model.image_weights`` loads timm or RETFound weights into it (:func:`load_image_weights`).

Every tower takes images ``[N, 3, H, W]`` in [0, 1] and returns from ``forward_features``
(and ``forward``, the same call) a dict:

    tokens       [N, 1 + L', W]  the pooled token first, then the patch tokens (L' = L unmasked)
    cls          [N, W]          the pooled feature (a ViT's CLS token; a CNN's global average)
    mask         [N, L]          0 keep, 1 removed (MAE) or replaced by the [MASK] token (EVA)
    ids_restore  [N, L]          the permutation that puts shuffled patch tokens back in order

ViTs mask in two ways: MAE's random dropping (``mask_ratio``; ``L' = int(L * (1 - ratio))``)
and BEiT/EVA's [MASK] token (``mask=bool[N, L]``, every position kept; see :func:`block_mask`).
CNNs read the final feature map as ``h * w`` tokens and cannot mask.
"""

from __future__ import annotations

import argparse
import math
import re
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn
from timm.layers import trunc_normal_

from fundus_lab.checkpoint import CheckpointError
from fundus_lab.registry import did_you_mean


def sincos_pos_embed(width: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (MAE), ``[1, (1 +) grid_size**2, width]``.

    Fixed rather than learnt so that the decoder and encoder share one notion of position
    and so that checkpoints carry no position table.
    """
    if width % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {width}")
    coords = np.arange(grid_size, dtype=np.float64)
    grid_w, grid_h = np.meshgrid(coords, coords)  # w varies fastest, as patches are flattened row-major
    omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width / 4.0))

    def embed_1d(pos):
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([embed_1d(grid_h), embed_1d(grid_w)], axis=1)  # [L, width]
    if cls_token:
        emb = np.concatenate([np.zeros([1, width]), emb], axis=0)
    return torch.from_numpy(emb).float().unsqueeze(0)


def random_masking(x: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a random ``1 - mask_ratio`` of the tokens of each sample (MAE).

    Args:
        x: ``[N, L, D]`` patch tokens (no CLS).
    Returns:
        x_masked ``[N, L_keep, D]``, mask ``[N, L]`` (0 keep, 1 remove), ids_restore ``[N, L]``
        (the permutation that puts the shuffled tokens back in patch order).
    """
    n, length, dim = x.shape
    len_keep = int(length * (1 - mask_ratio))
    if len_keep < 1:
        raise ValueError(f"mask_ratio={mask_ratio} leaves no visible patch out of {length}")
    noise = torch.rand(n, length, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
    mask = torch.ones(n, length, device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_masked, mask, ids_restore


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[N, 3, H, W]`` -> ``[N, L, p*p*3]`` (row-major patches, channels last in a patch)."""
    n, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    x = images.reshape(n, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    """``[N, L, p*p*3]`` -> ``[N, 3, H, W]`` for a square grid (inverse of :func:`patchify`)."""
    n, length, _ = x.shape
    p = patch_size
    g = int(round(length**0.5))
    if g * g != length:
        raise ValueError(f"unpatchify needs a square number of patches, got {length}")
    x = x.reshape(n, g, g, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, channels, g * p, g * p)


def block_mask(n: int, grid: int | tuple[int, int], ratio: float, generator: Optional[torch.Generator] = None,
               min_patches: int = 4, min_aspect: float = 0.3) -> torch.Tensor:
    """BEiT-style block-wise masks, ``bool[n, gh * gw]`` (True = masked), about ``ratio`` of each row.

    Rectangles of random area (``min_patches`` up to what is left to mask) and log-uniform
    aspect ratio in ``[min_aspect, 1 / min_aspect]`` are added until ``round(ratio * L)``
    patches are masked (BEiT's ``MaskingGenerator``; EVA masks about 40% this way). Blocks
    rather than scattered patches stop the encoder from filling a gap by copying neighbours.
    """
    gh, gw = (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"block_mask: ratio={ratio}, expected 0 <= ratio < 1")
    if gh < 1 or gw < 1 or n < 0:
        raise ValueError(f"block_mask: n={n}, grid=({gh}, {gw}) must be positive")
    target = int(round(ratio * gh * gw))
    log_aspect = (math.log(min_aspect), -math.log(min_aspect))

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand((), generator=generator).item()

    def randint(hi: int) -> int:  # 0..hi inclusive
        return int(torch.randint(0, hi + 1, (), generator=generator).item())

    out = torch.zeros(n, gh, gw, dtype=torch.bool)
    for i in range(n):
        mask = out[i]
        count = 0
        while count < target:
            budget = target - count
            added = 0
            for _ in range(10):  # a few tries to place one block that adds 1..budget patches
                area = uniform(min(min_patches, budget), budget)
                aspect = math.exp(uniform(*log_aspect))
                h = int(round(math.sqrt(area * aspect)))
                w = int(round(math.sqrt(area / aspect)))
                if 1 <= h <= gh and 1 <= w <= gw:
                    top, left = randint(gh - h), randint(gw - w)
                    new = h * w - int(mask[top:top + h, left:left + w].sum())
                    if 0 < new <= budget:
                        mask[top:top + h, left:left + w] = True
                        added = new
                        break
            if added == 0:
                break  # BEiT stops here too: the mask ends slightly under the ratio
            count += added
    return out.reshape(n, gh * gw)


class ImageTower(nn.Module):
    """What every image tower shares: the timm ``trunk``, pixel normalisation, sizes.

    ``trunk`` is the module ``timm.create_model`` made, kept whole so that its parameter
    names are timm's (``trunk.state_dict()`` loads into ``timm.create_model(name)``).

    Attributes:
        name: the ``model.image_encoder`` value it was built from.
        img_size: the square input side it accepts.
        patch_size: pixels per token side (a CNN's total stride).
        grid_size: tokens per side; ``num_patches = grid_size ** 2``.
        width (= embed_dim): token width W.
        supports_masking: whether ``forward_features`` accepts ``mask_ratio`` / ``mask``.
    """

    supports_masking = False

    def __init__(self, trunk: nn.Module, name: str, img_size: int, patch_size: int, width: int,
                 mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"model.img_size={img_size} is not a multiple of the {name!r} tower's patch size / stride {patch_size}")
        self.trunk = trunk
        self.name = name
        self.img_size, self.patch_size = int(img_size), int(patch_size)
        self.grid_size = self.img_size // self.patch_size
        self.num_patches = self.grid_size**2
        self.width = self.embed_dim = int(width)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels -> model input ``(x - mean) / std``; checks the shape against the config."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got {list(images.shape)}")
        if images.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"images are {images.shape[-2]}x{images.shape[-1]} but the model was built for "
                f"model.img_size={self.img_size}; set data.image_size to match"
            )
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def forward(self, images: torch.Tensor, mask_ratio: float = 0.0, mask: Optional[torch.Tensor] = None) -> dict:
        return self.forward_features(images, mask_ratio, mask)

    def _unmasked(self, x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """mask (all zeros) and ids_restore (identity) for a pass that keeps every patch."""
        mask = x.new_zeros(n, self.num_patches)
        ids_restore = torch.arange(self.num_patches, device=x.device).expand(n, -1)
        return mask, ids_restore


class VisionTransformer(ImageTower):
    """A timm ``VisionTransformer`` with MAE random masking and BEiT/EVA [MASK]-token masking.

    Built either around a given timm ViT (``trunk``, e.g. ``timm.create_model("vit_base_patch16_224")``;
    its sizes and learnt position table are kept) or, without one, as the fundus_lab preset
    ViT from the size arguments: ``timm.create_model`` with those sizes, MAE's init and a fixed
    sin-cos position table (not trained, as in MAE).

    Args:
        trunk: a timm ``VisionTransformer`` built with ``num_classes=0``; None for the preset ViT.
        img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, drop_path_rate: preset
            sizes (ignored with a ``trunk``, except ``img_size`` which must match it).
        mean, std: per-channel normalisation of [0, 1] images.
        mask_token: add a learnt [MASK] token so that ``forward_features(mask=...)`` works (EVA).
        name: what ``model.image_encoder`` called it.
    """

    supports_masking = True

    def __init__(
        self,
        trunk: Optional[nn.Module] = None,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        mask_token: bool = False,
        name: str = "vit",
    ):
        import timm
        from timm.models.vision_transformer import VisionTransformer as TimmViT

        preset = trunk is None
        if preset:
            if img_size % patch_size:
                raise ValueError(f"model.img_size={img_size} is not a multiple of model.patch_size={patch_size}")
            if embed_dim % num_heads:
                raise ValueError(f"model.vision_width={embed_dim} is not divisible by model.vision_heads={num_heads}")
            # any registered ViT name works as the template: every size below overrides it
            trunk = timm.create_model(
                "vit_base_patch16_224", pretrained=False, num_classes=0, img_size=img_size, patch_size=patch_size,
                embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate,
            )
        elif not isinstance(trunk, TimmViT):
            raise TypeError(f"image tower {name!r}: expected a timm VisionTransformer, got {type(trunk).__name__}")
        pe = trunk.patch_embed
        if pe.grid_size[0] != pe.grid_size[1] or pe.patch_size[0] != pe.patch_size[1]:
            raise ValueError(f"image tower {name!r}: only square images and patches are supported, got grid {pe.grid_size}")
        if getattr(trunk, "dynamic_img_size", False):
            raise ValueError(f"image tower {name!r}: timm's dynamic_img_size is not supported; build it for model.img_size")
        super().__init__(trunk, name, pe.img_size[0], pe.patch_size[0], trunk.embed_dim, mean, std)
        self.num_heads = trunk.blocks[0].attn.num_heads if len(trunk.blocks) else 0
        self.num_prefix_tokens = trunk.num_prefix_tokens  # CLS + register tokens
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.width)) if mask_token else None
        if preset:
            self._init_mae()
        if self.mask_token is not None:
            trunc_normal_(self.mask_token, std=0.02)  # BEiT

    def _init_mae(self):
        """MAE's init on top of timm's: fixed sin-cos positions, patch projection as a Linear, CLS std 0.02."""
        t = self.trunk
        # a (persistent) buffer, not a frozen Parameter: fixed like MAE's, saved so that the
        # trunk's state dict still loads into timm.create_model
        del t.pos_embed
        t.register_buffer("pos_embed", sincos_pos_embed(self.width, self.grid_size, cls_token=True))
        w = t.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(t.cls_token, std=0.02)

    @property
    def blocks(self) -> nn.Sequential:
        return self.trunk.blocks

    @property
    def cls_token(self) -> Optional[nn.Parameter]:
        return self.trunk.cls_token

    def _check_mask(self, mask: torch.Tensor, n: int) -> torch.Tensor:
        if self.mask_token is None:
            raise ValueError(f"image tower {self.name!r} was built without a [MASK] token; build it with mask_token=True "
                             "(EVA stage 1) to pass mask=")
        if mask.shape != (n, self.num_patches):
            raise ValueError(f"mask must be bool [N, L] = [{n}, {self.num_patches}], got {list(mask.shape)}")
        return mask.to(device=self.mask_token.device, dtype=torch.bool)

    def _embed(self, images: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[0, 1] images -> ``[N, P + L, W]``: prefix tokens (CLS, registers) and patches, with positions.

        Masked patches become the [MASK] token before the position is added (BEiT)."""
        x = self.trunk.patch_embed(self.normalize(images))  # [N, L, W]
        if mask is not None:
            w = mask.unsqueeze(-1).to(x.dtype)
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        return self.trunk._pos_embed(x)

    def forward_features(self, images: torch.Tensor, mask_ratio: float = 0.0, mask: Optional[torch.Tensor] = None) -> dict:
        """Encode, masking first when asked: MAE drops ``mask_ratio`` of the patches at random;
        ``mask`` (bool ``[N, L]``, True = masked) swaps those patches for the [MASK] token."""
        if mask is not None and mask_ratio > 0:
            raise ValueError("pass either mask_ratio (MAE dropping) or mask ([MASK] tokens), not both")
        n = images.shape[0]
        if mask is not None:
            mask = self._check_mask(mask, n)
        x = self._embed(images, mask)
        p = self.num_prefix_tokens
        prefix, patches = x[:, :p], x[:, p:]
        if mask_ratio > 0:
            patches, mask_out, ids_restore = random_masking(patches, mask_ratio)
        else:
            mask_out, ids_restore = self._unmasked(patches, n)
            if mask is not None:
                mask_out = mask.to(patches.dtype)
        x = torch.cat([prefix, patches], dim=1)
        t = self.trunk
        x = t.norm(t.blocks(t.norm_pre(t.patch_drop(x))))
        cls = t.forward_head(x, pre_logits=True)  # the model's own pooling: CLS token, average or attention pool
        tokens = torch.cat([cls.unsqueeze(1), x[:, p:]], dim=1)
        return {"tokens": tokens, "cls": cls, "mask": mask_out, "ids_restore": ids_restore}

    @torch.no_grad()
    def attention_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Softmax attention of every block, ``[N, heads, 1 + L, 1 + L]`` per layer (CLS, patches).

        Recomputed from each block's own ``qkv`` projection (no hooks, no copy of the
        attention code used in training), then the block runs as usual. Register tokens
        are left out of the maps and each row renormalised over CLS and patches.
        """
        t = self.trunk
        if t.cls_token is None:
            raise ValueError(f"image tower {self.name!r} has no CLS token; attention maps are read from the CLS row")
        x = t.norm_pre(t.patch_drop(self._embed(images)))
        p = self.num_prefix_tokens
        keep = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(p, p + self.num_patches)]).to(x.device)
        maps = []
        for i, blk in enumerate(t.blocks):
            attn = blk.attn
            if not all(hasattr(attn, a) for a in ("qkv", "q_norm", "k_norm", "scale")):
                raise TypeError(f"image tower {self.name!r}: block {i} attention ({type(attn).__name__}) has no timm qkv "
                                "projection to read attention from")
            h = blk.norm1(x)
            n, length, _ = h.shape
            qkv = attn.qkv(h).reshape(n, length, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
            a = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            if p > 1:
                a = a.index_select(2, keep).index_select(3, keep)
                a = a / a.sum(-1, keepdim=True)
            maps.append(a)
            x = blk(x)
        return maps


class ConvNetTower(ImageTower):
    """A timm CNN (ResNet-50, ...): the final feature map as ``h * w`` tokens, global average first.

    Args:
        trunk: a timm CNN built with ``num_classes=0`` (its ``forward_head(pre_logits=True)``
            is the global pool).
        name: the timm model name.
        img_size: square input side; a multiple of the network's total stride.
        mean, std: per-channel normalisation of [0, 1] images.
    """

    supports_masking = False

    def __init__(self, trunk: nn.Module, name: str, img_size: int, mean: Sequence[float], std: Sequence[float]):
        info = getattr(trunk, "feature_info", None)
        if not info:
            raise TypeError(f"image tower {name!r}: timm model {type(trunk).__name__} has no feature_info to read its stride")
        super().__init__(trunk, name, img_size, info[-1]["reduction"], trunk.num_features, mean, std)

    def forward_features(self, images: torch.Tensor, mask_ratio: float = 0.0, mask: Optional[torch.Tensor] = None) -> dict:
        if mask_ratio > 0 or mask is not None:
            raise ValueError(f"image tower {self.name!r} is a CNN and cannot mask patches (supports_masking=False); "
                             "use a ViT for methods with masked image modelling")
        x = self.normalize(images)
        if self.channels_last:  # NHWC input for NHWC weights (fundus_lab.train.channels_last_for)
            x = x.contiguous(memory_format=torch.channels_last)
        fmap = self.trunk.forward_features(x)  # [N, C, h, w]
        n = fmap.shape[0]
        patches = fmap.flatten(2).transpose(1, 2)  # [N, h * w, C]
        if patches.shape[1] != self.num_patches:
            raise RuntimeError(f"image tower {self.name!r}: feature map {list(fmap.shape[-2:])} has {patches.shape[1]} "
                               f"positions, expected {self.grid_size}x{self.grid_size}")
        cls = self.trunk.forward_head(fmap, pre_logits=True)  # [N, C] global average
        mask_out, ids_restore = self._unmasked(patches, n)
        return {"tokens": torch.cat([cls.unsqueeze(1), patches], dim=1), "cls": cls, "mask": mask_out, "ids_restore": ids_restore}

    @property
    def channels_last(self) -> bool:
        """Whether the trunk's first 4-D weight is stored ``channels_last``."""
        weight = next((p for p in self.trunk.parameters() if p.ndim == 4), None)
        return weight is not None and weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()

    def attention_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        raise TypeError(f"image tower {self.name!r} is a CNN: it has no self-attention maps (use a ViT image encoder)")


def create_timm_model(name: str, img_size: int, drop_path: float = 0.0) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=0)`` at ``img_size`` where the
    family takes one (ViTs), never downloading anything."""
    import timm

    kwargs = dict(pretrained=False, num_classes=0)
    if drop_path:
        kwargs["drop_path_rate"] = drop_path
    try:
        try:
            return timm.create_model(name, img_size=img_size, **kwargs)
        except TypeError as err:
            if "img_size" not in str(err):
                raise
            return timm.create_model(name, **kwargs)  # CNNs take any size and no img_size argument
    except RuntimeError as err:
        if "Unknown model" in str(err):
            close = did_you_mean(name, timm.list_models())
            raise ValueError(f"model.image_encoder={name!r} is neither 'vit' nor a timm model name{close} "
                             f"(timm.list_models('{name.split('_')[0]}*') lists the names)") from None
        raise


def build_image_encoder(model_cfg, *, mask_token: bool = False, load_weights: bool = True) -> ImageTower:
    """The image tower ``model.image_encoder`` names, with ``model.image_weights`` loaded.

    Args:
        model_cfg: a ``ModelConfig``: ``image_encoder`` ("vit" = the preset ViT from
            ``img_size``, ``patch_size``, ``vision_width``, ``vision_depth``, ``vision_heads``,
            ``mlp_ratio``, ``drop_path``; anything else a timm model name), ``image_weights``,
            ``image_mean`` / ``image_std``.
        mask_token: give a ViT a learnt [MASK] token (EVA stage 1).
        load_weights: read ``model.image_weights``; a checkpoint being restored passes False
            (its own weights replace these anyway, and the file may be gone).
    """
    name = model_cfg.image_encoder
    mean, std = model_cfg.image_mean, model_cfg.image_std
    if name == "vit":
        tower = VisionTransformer(
            img_size=model_cfg.img_size, patch_size=model_cfg.patch_size, embed_dim=model_cfg.vision_width,
            depth=model_cfg.vision_depth, num_heads=model_cfg.vision_heads, mlp_ratio=model_cfg.mlp_ratio,
            drop_path_rate=model_cfg.drop_path, mean=mean, std=std, mask_token=mask_token,
        )
    else:
        from timm.models.vision_transformer import VisionTransformer as TimmViT

        trunk = create_timm_model(name, model_cfg.img_size, model_cfg.drop_path)
        if isinstance(trunk, TimmViT):
            tower = VisionTransformer(trunk, mean=mean, std=std, mask_token=mask_token, name=name)
        elif getattr(trunk, "feature_info", None) and len(trunk.feature_info) and "reduction" in trunk.feature_info[-1]:
            if mask_token:
                raise ValueError(f"model.image_encoder={name!r} is a CNN: it has no [MASK] token (EVA needs a ViT)")
            tower = ConvNetTower(trunk, name, model_cfg.img_size, mean, std)
        else:
            raise ValueError(f"model.image_encoder={name!r}: timm family {type(trunk).__name__} is not supported; "
                             "use a timm VisionTransformer (vit_*, deit_*) or a CNN (resnet*, convnext*, ...)")
    if load_weights and model_cfg.image_weights:
        load_image_weights(tower, model_cfg.image_weights)
    return tower


# ---------------------------------------------------------------------- outside weights

_WRAPPER_KEYS = ("model", "state_dict")
_PREFIXES = ("module.", "image_encoder.trunk.", "trunk.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a ``.pth``/``.pt``/``.bin`` read with ``weights_only=True``.

    A top-level ``model``/``state_dict`` entry is unwrapped (RETFound, MAE and DeiT checkpoints
    keep the weights there); ``module.`` (DDP) and fundus_lab's ``image_encoder.trunk.``
    prefixes are stripped. Any problem is a :class:`CheckpointError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model.image_weights={path}: the file does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif suffix in (".pth", ".pt", ".bin"):
            # MAE/RETFound checkpoints also pickle their argparse.Namespace of arguments: a plain
            # record, allowed; anything else that is not a tensor container is refused
            with torch.serialization.safe_globals([argparse.Namespace]):
                state = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            raise CheckpointError(f"model.image_weights={path}: neither .safetensors nor .pth/.pt/.bin")
    except CheckpointError:
        raise
    except Exception as err:  # safetensors, pickle and zip errors have many types
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if refused:
            raise CheckpointError(f"model.image_weights={path}: torch.load(weights_only=True) refuses the pickled object "
                                  f"{refused.group(1)}; save only tensors (a state dict) or use .safetensors") from None
        raise CheckpointError(f"model.image_weights={path}: cannot read it ({type(err).__name__}: {err})") from None
    if isinstance(state, dict):
        for key in _WRAPPER_KEYS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"model.image_weights={path}: holds no state dict (a mapping of names to tensors)")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"model.image_weights={path}: entries {bad[:5]} are not tensors; expected a state dict")
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_image_weights(tower: ImageTower, path: str | Path) -> dict:
    """Load timm or RETFound weights into ``tower.trunk``.

    The position table is resampled to the working grid (timm's ``resample_abs_pos_embed``),
    classifier heads are dropped, and missing/unexpected keys are listed in a warning; a file
    sharing no key with the tower, or one with a mis-shaped key, is a :class:`CheckpointError`.

    Returns:
        dict(missing, unexpected, dropped, resampled) lists of key names.
    """
    from timm.layers import resample_abs_pos_embed

    path = Path(path)
    state = read_state_dict(path)
    trunk = tower.trunk
    expected = trunk.state_dict()
    head_names = {"head", "head_dist", "fc", "classifier", "last_linear"}
    head_names.add(str(getattr(trunk, "pretrained_cfg", {}).get("classifier", "head")).split(".")[0])
    dropped = sorted(k for k in state if k.split(".")[0] in head_names and k not in expected)
    state = {k: v for k, v in state.items() if k not in dropped}
    resampled = []
    if "pos_embed" in state and "pos_embed" in expected and state["pos_embed"].shape != expected["pos_embed"].shape:
        prefix = 0 if getattr(trunk, "no_embed_class", False) else getattr(trunk, "num_prefix_tokens", 1)
        old = state["pos_embed"]
        side = math.isqrt(old.shape[1] - prefix)
        if side * side != old.shape[1] - prefix or old.shape[-1] != expected["pos_embed"].shape[-1]:
            raise CheckpointError(f"{path}: pos_embed {list(old.shape)} is not a square grid of width "
                                  f"{expected['pos_embed'].shape[-1]} with {prefix} prefix token(s)")
        state["pos_embed"] = resample_abs_pos_embed(old, new_size=list(trunk.patch_embed.grid_size), old_size=[side, side],
                                                    num_prefix_tokens=prefix)
        resampled.append("pos_embed")
    matched = sorted(set(state) & set(expected))
    if not matched:
        raise CheckpointError(f"{path}: none of its {len(state)} keys (e.g. {sorted(state)[:3]}) fits image tower "
                              f"{tower.name!r} (e.g. {sorted(expected)[:3]}); wrong model.image_encoder?")
    wrong = [k for k in matched if state[k].shape != expected[k].shape]
    if wrong:
        raise CheckpointError(f"{path} does not fit image tower {tower.name!r}: shape mismatch " + ", ".join(
            f"{k}: file {list(state[k].shape)} vs model {list(expected[k].shape)}" for k in wrong[:8]))
    result = trunk.load_state_dict(state, strict=False)
    report = {"missing": sorted(result.missing_keys), "unexpected": sorted(result.unexpected_keys),
              "dropped": dropped, "resampled": resampled}
    if report["missing"] or report["unexpected"]:
        def show(keys):
            return f"{keys[:12]}{f' and {len(keys) - 12} more' if len(keys) > 12 else ''}"

        warnings.warn(f"model.image_weights={path}: loaded {len(matched)} of {len(expected)} tensors into {tower.name!r}; "
                      f"missing (left as initialised): {show(report['missing'])}; unexpected (ignored): {show(report['unexpected'])}",
                      stacklevel=2)
    return report


def init_linear_layernorm(module: nn.Module) -> None:
    """timm/MAE-style init: truncated-normal Linear weights, zero bias, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
