"""Decoders: the light MAE image decoder (eq. 3) and the masked-text decoder (eq. 5).

- :class:`MAEDecoder` puts mask tokens back in patch order and predicts, per patch, its
  pixels (MAE).
- :class:`MaskedTextDecoder` predicts the original token at every position from the
  (fused) text tokens; the loss reads all of them (eq. 6) or the masked ones.

CoCa's multimodal decoder continues its causal text stack: ``fundus_lab.models.coca``.
"""

from __future__ import annotations

import torch
from torch import nn
from timm.models.vision_transformer import Block

from fundus_lab.models.image import init_linear_layernorm, sincos_pos_embed


class MAEDecoder(nn.Module):
    """MAE's ``forward_decoder``: ``[N, 1 + L_keep, in_dim]`` + ids_restore -> ``[N, L, out_dim]``.

    Args:
        num_patches: L (a square grid).
        in_dim: width of the encoder (or fused) tokens.
        width, depth, num_heads: decoder size (narrow and shallow: the encoder must do the work).
        out_dim: ``p*p*3`` for pixels, the teacher width for feature targets.
    """

    def __init__(self, num_patches: int, in_dim: int, width: int, depth: int, num_heads: int, out_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"model.decoder_width={width} is not divisible by model.decoder_heads={num_heads}")
        grid = int(round(num_patches**0.5))
        self.embed = nn.Linear(in_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.register_buffer("pos_embed", sincos_pos_embed(width, grid), persistent=False)
        self.blocks = nn.ModuleList(Block(width, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.pred = nn.Linear(width, out_dim)
        self.apply(init_linear_layernorm)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, tokens: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)  # [N, 1 + L_keep, D]
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.to(x.dtype).expand(n, length + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)  # shuffled order, visible first
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed.to(x.dtype)
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))[:, 1:]  # drop CLS: [N, L, out_dim]


class MaskedTextDecoder(nn.Module):
    """``[N, T, W]`` text tokens (+ padding mask) -> ``[N, T, vocab]`` logits.

    ``depth`` timm blocks (0 allowed: then only the LM head) with padding keys masked out.
    """

    def __init__(self, width: int, depth: int, num_heads: int, vocab_size: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)
        self.apply(init_linear_layernorm)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        keep = attention_mask.bool()[:, None, None, :]  # [N, 1, 1, T]: True = attend
        x = tokens
        for blk in self.blocks:
            x = blk(x, attn_mask=keep)
        return self.head(self.norm(x))
