"""Cross-modal fusion (eq. 7): image tokens query text tokens and text tokens query image tokens.

    z_img_update  = CA_img(z_img, z_text)
    z_text_update = CA_text(z_text, z_img)

Each ``CA`` is ``fusion_depth`` pre-norm blocks of cross-attention + MLP with residuals, so
with the attention weights at zero the tokens pass through unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from timm.layers import Mlp


class CrossAttentionBlock(nn.Module):
    """``x = x + Attn(LN(x), LN(context)); x = x + MLP(LN(x))``.

    Args:
        dim: width of the querying tokens.
        context_dim: width of the tokens attended to (may differ: image vs. text width).
        num_heads: attention heads (must divide ``dim``).
        mlp_ratio: MLP hidden width / ``dim``.
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"cross-attention width {dim} is not divisible by {num_heads} heads (model.fusion_heads)")
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(context_dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        context_padding_mask: torch.Tensor | None = None,
        return_attention: bool = False,
    ):
        """x ``[N, Tq, dim]``, context ``[N, Tk, context_dim]``, padding ``[N, Tk]`` (True = ignore).

        Returns x, or (x, attention ``[N, heads, Tq, Tk]``) with ``return_attention``.
        """
        kv = self.norm_kv(context)
        a, weights = self.attn(
            self.norm_q(x),
            kv,
            kv,
            key_padding_mask=context_padding_mask,
            need_weights=return_attention,
            average_attn_weights=False,
        )
        x = x + a
        x = x + self.mlp(self.norm2(x))
        return (x, weights) if return_attention else x


class CrossAttention(nn.Module):
    """One direction of eq. 7: ``depth`` blocks of queries attending to a fixed context."""

    def __init__(self, dim: int, context_dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        if depth < 1:
            raise ValueError(f"model.fusion_depth={depth}: cross-attention needs at least one block")
        self.blocks = nn.ModuleList(CrossAttentionBlock(dim, context_dim, num_heads, mlp_ratio) for _ in range(depth))

    def forward(self, x, context, context_padding_mask=None, return_attention: bool = False):
        maps = []
        for blk in self.blocks:
            if return_attention:
                x, w = blk(x, context, context_padding_mask, return_attention=True)
                maps.append(w)
            else:
                x = blk(x, context, context_padding_mask)
        return (x, maps) if return_attention else x
