"""Decoders: the light MAE image decoder (eq. 3) and the two text decoders (eq. 5).

- :class:`MAEDecoder` puts mask tokens back in patch order and predicts, per patch, its
  pixels (MAE) or a teacher's feature (EVA-02).
- :class:`MaskedTextDecoder` predicts the original token at every position from the
  (fused) text tokens; the loss reads the masked positions only.
- :class:`CaptionDecoder` is CoCa's multimodal decoder: causal self-attention over the
  report, cross-attention to image tokens, next-token logits.
"""

from __future__ import annotations

import torch
from torch import nn
from timm.models.vision_transformer import Block

from fundus_lab.models.fusion import CrossAttentionBlock
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


class CaptionDecoder(nn.Module):
    """Autoregressive captioner (CoCa's multimodal text decoder).

    Reads the report's token ids (own embeddings, so no future token leaks in through the
    bidirectional text encoder) and attends to image tokens at every layer.

    Args:
        vocab_size, max_length: tokenizer size and longest report.
        width, depth, num_heads: decoder size; ``image_dim`` is the image token width.
    """

    def __init__(self, vocab_size: int, max_length: int, width: int, depth: int, num_heads: int, image_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_length, width))
        self.self_blocks = nn.ModuleList(Block(width, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True) for _ in range(depth))
        self.cross_blocks = nn.ModuleList(CrossAttentionBlock(width, image_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)
        self.apply(init_linear_layernorm)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)

    def forward(self, input_ids: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """input_ids ``[N, T]`` (teacher forcing), image tokens ``[N, 1 + L', W_img]`` -> ``[N, T, vocab]``."""
        t = input_ids.shape[1]
        if t > self.pos_embed.shape[1]:
            raise ValueError(f"caption of {t} tokens is longer than model.text_max_length={self.pos_embed.shape[1]}")
        x = self.token_embed(input_ids) + self.pos_embed[:, :t]
        for self_blk, cross_blk in zip(self.self_blocks, self.cross_blocks):
            x = self_blk(x, is_causal=True)
            x = cross_blk(x, image_tokens)
        return self.head(self.norm(x))
