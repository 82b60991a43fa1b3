"""Patch masks for masked image modelling.

MAE drops a uniformly random subset of patches (``image.random_masking``); BEiT and EVA
keep every patch in the encoder and replace a *block-wise* masked set by a learnt [MASK]
token. :func:`block_wise_mask` draws the latter. Masks are ``bool [N, L]``, True = masked.
"""

from __future__ import annotations

import math
import random

import torch


def block_wise_mask(n: int, grid: int, ratio: float, min_block: int = 4, max_aspect: float = 3.0,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """BEiT's block-wise masking: rectangles of random area and aspect until ``ratio`` of
    the ``grid x grid`` patches are masked (exactly ``round(ratio * L)`` per image).

    Each rectangle has an area in ``[min_block, remaining]`` and an aspect ratio drawn
    log-uniformly in ``[1 / max_aspect, max_aspect]``; rectangles may overlap. The last
    patches, when rectangles no longer fit, are taken at random among the unmasked ones so
    every image masks the same count (a steady loss scale). Random draws come from
    ``torch``'s generator, so ``torch.manual_seed`` repeats them.

    Returns:
        ``bool [n, grid * grid]``, True = masked.
    """
    length = grid * grid
    target = int(round(ratio * length))
    if not 0 < target < length:
        raise ValueError(f"method.mask_ratio={ratio}: block-wise masking of a {grid}x{grid} grid needs 0 < ratio * {length} < {length}")
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    rng = random.Random(seed)
    out = torch.zeros(n, grid, grid, dtype=torch.bool)
    lo_aspect, hi_aspect = math.log(1 / max_aspect), math.log(max_aspect)
    for i in range(n):
        m = out[i]
        for _ in range(100):  # attempts; blocks get rarer as the mask fills
            left = target - int(m.sum())
            if left <= 0:
                break
            area = rng.uniform(min(min_block, left), max(min(min_block, left), left))
            aspect = math.exp(rng.uniform(lo_aspect, hi_aspect))
            h = max(1, min(grid, int(round(math.sqrt(area * aspect)))))
            w = max(1, min(grid, int(round(math.sqrt(area / aspect)))))
            top, lft = rng.randint(0, grid - h), rng.randint(0, grid - w)
            block = m[top:top + h, lft:lft + w]
            if int(m.sum()) + int((~block).sum()) <= target:
                block.fill_(True)
        flat = m.view(-1)
        left = target - int(flat.sum())
        if left > 0:  # top up at random
            free = (~flat).nonzero().view(-1).tolist()
            flat[rng.sample(free, left)] = True
    return out.view(n, length).to(device)
