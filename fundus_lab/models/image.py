"""Image encoder E_img: a ViT from timm's blocks that accepts an MAE-style patch mask.

Shapes: images ``[N, 3, H, W]`` in [0, 1]; ``L = (H / p) * (W / p)`` patches; tokens carry a
CLS token first, so an unmasked pass gives ``[N, 1 + L, W]`` and a masked one
``[N, 1 + L_keep, W]`` with ``L_keep = int(L * (1 - mask_ratio))``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Block


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


class VisionTransformer(nn.Module):
    """ViT encoder with optional random patch masking (MAE's ``forward_encoder``).

    Images come in [0, 1] and are normalised inside with fixed ``mean``/``std``, so every
    caller (datasets, notebooks, widgets) hands over plain pixels.

    Args:
        img_size: square input size; must be a multiple of ``patch_size``.
        patch_size: patch side in pixels (16 in the paper).
        embed_dim: token width W.
        depth: number of timm ``Block`` layers.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width / W.
        drop_path_rate: stochastic depth, linearly increasing over blocks.
        mean, std: per-channel normalisation of [0, 1] images.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
    ):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"model.img_size={img_size} is not a multiple of model.patch_size={patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"model.vision_width={embed_dim} is not divisible by model.vision_heads={num_heads}")
        self.img_size, self.patch_size, self.embed_dim, self.num_heads = img_size, patch_size, embed_dim, num_heads
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=3, embed_dim=embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.grid_size = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed(embed_dim, self.grid_size), persistent=False)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=dpr[i]) for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self._init_weights()

    def _init_weights(self):
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear layer (MAE)
        nn.init.normal_(self.cls_token, std=0.02)
        self.blocks.apply(init_linear_layernorm)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels -> model input; checks the shape against the config."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got {list(images.shape)}")
        if images.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"images are {images.shape[-2]}x{images.shape[-1]} but the model was built for "
                f"model.img_size={self.img_size}; set data.image_size to match"
            )
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def add_mask_token(self) -> None:
        """A learnt [MASK] token for block-wise masked image modelling (BEiT / EVA stage 1)."""
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        trunc_normal_(self.mask_token, std=0.02)

    def embed(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """[0, 1] images -> patch tokens with position, ``[N, L, W]`` (no CLS); patches where
        ``mask`` (bool ``[N, L]``) is True are replaced by the [MASK] token first."""
        x = self.patch_embed(self.normalize(images))
        if mask is not None:
            if getattr(self, "mask_token", None) is None:
                raise RuntimeError("forward_features(mask=...) needs a [MASK] token: call add_mask_token() when building")
            w = mask.unsqueeze(-1).to(x.dtype)
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        return x + self.pos_embed[:, 1:].to(x.dtype)

    def prepend_cls(self, x: torch.Tensor) -> torch.Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1]).to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def forward_features(self, images: torch.Tensor, mask_ratio: float = 0.0, mask: torch.Tensor | None = None) -> dict:
        """Encode, masking first when ``mask_ratio > 0`` (masked patches dropped, MAE) or
        where ``mask`` (bool ``[N, L]``) is True (every patch kept, masked ones replaced by
        the [MASK] token, BEiT / EVA).

        Returns:
            dict(tokens ``[N, 1 + L_keep, W]`` after the final norm, mask ``[N, L]`` (0 keep,
            1 remove), ids_restore ``[N, L]``).
        """
        x = self.embed(images, mask)
        if mask is not None:
            if mask_ratio > 0:
                raise ValueError("forward_features: give mask_ratio (drop patches) or mask ([MASK] tokens), not both")
            ids_restore = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
            mask = mask.to(x.dtype)
        elif mask_ratio > 0:
            x, mask, ids_restore = random_masking(x, mask_ratio)
        else:
            n, length = x.shape[:2]
            mask = x.new_zeros(n, length)
            ids_restore = torch.arange(length, device=x.device).expand(n, -1)
        x = self.prepend_cls(x)
        for blk in self.blocks:
            x = blk(x)
        return {"tokens": self.norm(x), "mask": mask, "ids_restore": ids_restore}

    def forward(self, images: torch.Tensor, mask_ratio: float = 0.0) -> dict:
        out = self.forward_features(images, mask_ratio)
        out["cls"] = out["tokens"][:, 0]
        return out

    @torch.no_grad()
    def attention_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Softmax attention of every block, ``[N, heads, 1 + L, 1 + L]`` per layer.

        Recomputed from each block's own ``qkv`` projection (no hooks, no copy of the
        attention code path used in training), then the block runs as usual.
        """
        x = self.prepend_cls(self.embed(images))
        maps = []
        for blk in self.blocks:
            attn = blk.attn
            h = blk.norm1(x)
            n, t, _ = h.shape
            qkv = attn.qkv(h).reshape(n, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
            maps.append(((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
            x = blk(x)
        return maps


def init_linear_layernorm(module: nn.Module) -> None:
    """timm/MAE-style init: truncated-normal Linear weights, zero bias, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
