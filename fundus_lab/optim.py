"""The optimizer and learning-rate schedule that pretraining and fine-tuning share.

Why a module of its own: ``fundus_lab.train`` (pretraining) and ``fundus_lab.eval.fine_tune``
use the same no-weight-decay rule and the same warm-up + cosine schedule; here they depend on
torch alone, so the evaluation protocols need not import the trainer above them.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fundus_lab.config import TrainConfig

# parameters whose weight decay would only pull them towards zero for no regularising gain
NO_DECAY_NAMES = ("pos_embed", "position_embedding", "positional_embedding", "logit_scale",
                  "cls_token", "reg_token", "mask_token", "logit_bias")


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Norm scales, biases (ndim < 2), positional embeddings, class/mask tokens and the
    temperature are not decayed (as in MAE/timm and open_clip); pretraining and
    fine-tuning share this rule."""
    return param.ndim < 2 or any(key in name for key in NO_DECAY_NAMES)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices only (:func:`no_weight_decay`). Frozen
    parameters (an EVA teacher, momentum encoders) are left out of the optimizer altogether.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if no_weight_decay(name, param):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def fused_adamw(device: torch.device | str | None) -> bool:
    """Whether AdamW steps with torch's fused kernel on ``device`` (CUDA and CPU): one kernel
    per parameter tensor instead of about ten elementwise ops, each a launch on a GPU and a
    thread-pool round on a CPU (149 tensors at the default preset: 21 -> 6 ms of CPU time
    per step on one thread, results/benchmarks/train_throughput.md). The same update rule;
    the rounding of the last bit may differ from the for-loop implementation."""
    return device is not None and torch.device(device).type in ("cuda", "cpu")


def build_optimizer(model: torch.nn.Module, train: TrainConfig, device: torch.device | str | None = None) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; ``device`` (where training runs; the model may still be
    on the CPU when this is called) picks the fused kernel (:func:`fused_adamw`)."""
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(param_groups(model, train.weight_decay), lr=train.lr, betas=tuple(train.betas),
                             fused=True if fused_adamw(device) else None)


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based).

    Linear warm-up ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps, then
    half a cosine from 1 down to ``min_ratio = min_lr / lr`` at ``total_steps``:
    ``min_ratio + (1 - min_ratio) * (1 + cos(pi * t)) / 2``, ``t = (step - warmup) / (total - warmup)``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay (:func:`lr_factor`), stepped once per optimizer step.

    Kept by hand rather than transformers' ``get_cosine_schedule_with_warmup``: that one starts
    the warm-up at 0 (``step / warmup``, so the first step does not move the weights) where this
    one starts at ``1 / warmup``; its ``..._lr_rate`` variant has this warm-up but starts the
    cosine one step earlier. No choice of their arguments gives these rates
    (docs/fidelity.md, "Hand code kept"; tests/test_schedules.py).
    """
    # a partial (not a lambda or closure) so the scheduler's state_dict stays JSON-safe
    factor = functools.partial(lr_factor, warmup_steps=warmup_steps, total_steps=total_steps, min_ratio=min_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Pretraining's schedule: warm-up for ``train.warmup_steps``, cosine down to ``train.min_lr`` at ``train.steps``."""
    return cosine_schedule(optimizer, train.warmup_steps, train.steps,
                           min_ratio=train.min_lr / train.lr if train.lr > 0 else 0.0)
