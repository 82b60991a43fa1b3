"""Evaluation section of a run config (``eval:`` in the presets)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class EvalConfig:
    """Which protocols run on which datasets, with how many seeds and how much training.

    Seeds: every method is pretrained once per ``pretrain_seeds`` entry; each pretrained
    model is then evaluated with ``seeds`` few-shot draws and ``fine_tune_seeds``
    fine-tuning runs. Table 1 reports mean ± std over all runs of a cell.
    """

    zero_shot_dataset: str = "synth-odir"
    few_shot_dataset: str = "synth-fives"
    fine_tune_dataset: str = "synth-aptos"
    shots: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    seeds: int = 5
    batch_size: int = 64
    bootstrap: int = 1000
    pretrain_seeds: list[int] = field(default_factory=lambda: [0])
    # few-shot
    few_shot_k: Optional[int] = None  # the k shown in Table 1 (None: the largest of `shots`)
    few_shot_features: Literal["cls", "embed"] = "cls"
    few_shot_head_steps: int = 100
    # fine-tuning
    fine_tune_seeds: int = 3
    fine_tune_epochs: int = 10
    fine_tune_lr: float = 5e-4
    fine_tune_layer_decay: float = 0.75
    fine_tune_weight_decay: float = 0.05
    fine_tune_batch_size: int = 32
    fine_tune_patience: int = 3
    fine_tune_class_balanced: bool = False
    fine_tune_augment: bool = True
    # bookkeeping
    output_dir: str = "runs/compare/{preset}"  # {preset} filled in: presets never share run folders
    cache_features: bool = True
