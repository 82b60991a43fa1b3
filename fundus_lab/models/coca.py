"""CoCa's text stack and image poolers, as open_clip builds them (``coca_model.py``).

One causal text Transformer is split in two: the *unimodal* layers (a CLS token appended
after the text gives the contrastive embedding) and the *multimodal* layers, which go on
from the unimodal tokens with cross-attention to the image. The caption loss therefore
trains the unimodal layers too. On the image side, attentional poolers: one query for
the contrastive embedding, ``n_queries`` tokens for the captioner.

Shapes: ``input_ids``/``attention_mask`` ``[N, T]``; text tokens ``[N, T, W]``; image
tokens ``[N, 1 + L, W_img]``.
"""

from __future__ import annotations

import torch
from torch import nn
from timm.models.vision_transformer import Block

from fundus_lab.models.fusion import CrossAttentionBlock
from fundus_lab.models.image import init_linear_layernorm


def causal_mask(attention_mask: torch.Tensor, extra: int = 0) -> torch.Tensor:
    """``[N, T]`` padding mask -> ``bool [N, 1, T + extra, T + extra]``, True = may attend.

    Each position sees itself and earlier non-padding positions; ``extra`` trailing
    positions (CoCa's CLS) see every non-padding token before them.
    """
    n, t = attention_mask.shape
    keep = torch.cat([attention_mask.bool(), attention_mask.new_ones(n, extra).bool()], dim=1)  # [N, T + e]
    size = t + extra
    tri = torch.ones(size, size, dtype=torch.bool, device=attention_mask.device).tril()
    return (tri[None] & keep[:, None, :])[:, None]


class CoCaTextEncoder(nn.Module):
    """CoCa's unimodal text layers: ``forward(ids, mask) -> dict(tokens, cls, attention_mask)``.

    A text's CLS embedding does not depend on its batch-mates. open_clip pads every text to
    a fixed ``context_length`` and appends the CLS after it (position ``context_length``);
    the CLS attends to the real tokens only (its padding mask), and the causal mask keeps
    real tokens from seeing the padding after them. We pad to the batch's longest text
    instead (cheaper) and give the CLS the same fixed slot, position ``max_length``, so the
    CLS reads exactly what open_clip's reads: the text's own tokens at positions 0..len-1
    and itself at the end of the context. (Appending it at the batch's padded length, as
    before, made its position, hence its embedding, change with the other texts.)

    Args:
        vocab_size, max_length: tokenizer size and longest text (the CLS takes one more position).
        width, depth, num_heads, mlp_ratio: the unimodal layers.
    """

    def __init__(self, vocab_size: int, max_length: int, width: int, depth: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"model.text_width={width} is not divisible by model.text_heads={num_heads}")
        self.width, self.max_length = width, max_length
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_length + 1, width))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.ModuleList(Block(width, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.apply(init_linear_layernorm)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        n, t = input_ids.shape
        if t > self.max_length:
            raise ValueError(f"text of {t} tokens is longer than model.text_max_length={self.max_length}")
        x = self.token_embed(input_ids)
        x = x + self.pos_embed[:, :t].to(x.dtype)
        # the CLS sits at the fixed-context slot (position max_length) whatever the batch's
        # padded length t, as open_clip's CLS after its fixed context_length
        cls = self.cls_token + self.pos_embed[:, self.max_length : self.max_length + 1]
        x = torch.cat([x, cls.to(x.dtype).expand(n, -1, -1)], dim=1)
        mask = causal_mask(attention_mask, extra=1)
        for blk in self.blocks:
            x = blk(x, attn_mask=mask)
        x = self.norm(x)
        return {"tokens": x[:, :t], "cls": x[:, t], "attention_mask": attention_mask}


class MultimodalDecoder(nn.Module):
    """CoCa's multimodal layers: causal self-attention over the unimodal text tokens, then
    cross-attention to the (pooled) image tokens, per layer; next-token logits."""

    def __init__(self, width: int, depth: int, num_heads: int, image_dim: int, vocab_size: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.self_blocks = nn.ModuleList(Block(width, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True) for _ in range(depth))
        self.cross_blocks = nn.ModuleList(CrossAttentionBlock(width, image_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)
        self.apply(init_linear_layernorm)

    def forward(self, text_tokens: torch.Tensor, attention_mask: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """text tokens ``[N, T, W]``, padding ``[N, T]``, image tokens ``[N, Q, W_img]`` -> ``[N, T, vocab]``."""
        mask = causal_mask(attention_mask)
        x = text_tokens
        for self_blk, cross_blk in zip(self.self_blocks, self.cross_blocks):
            x = self_blk(x, attn_mask=mask)
            x = cross_blk(x, image_tokens)
        return self.head(self.norm(x))


class AttentionalPooler(nn.Module):
    """``n_queries`` learnt queries attend to the image tokens (open_clip ``AttentionalPooler``)."""

    def __init__(self, width: int, context_dim: int, n_queries: int, num_heads: int):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"attentional pooler width {width} is not divisible by {num_heads} heads")
        self.query = nn.Parameter(torch.randn(n_queries, width) * 0.02)
        self.norm_k = nn.LayerNorm(context_dim)
        self.attn = nn.MultiheadAttention(width, num_heads, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.norm_q = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[N, L, C]`` -> ``[N, n_queries, width]``."""
        kv = self.norm_k(tokens)
        q = self.norm_q(self.query.to(kv.dtype)).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        return self.attn(q, kv, kv, need_weights=False)[0]
