"""The reference rows of every table: the floor (untrained encoders), the ceiling (the
same encoder trained on labels with the pretraining budget) and a linear probe on pixels,
measured by the same protocols as the methods. Each is a :class:`Reference` in
:data:`REFERENCES`: how its checkpoint is made and which protocols apply to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from accelerate.utils import set_seed

from fundus_lab import config as C
from fundus_lab.eval.fine_tune import fine_tune
from fundus_lab.eval.probe import holdout_indices
from fundus_lab.experiment.datasets import open_split
from fundus_lab.experiment.protocols import PROTOCOLS
from fundus_lab.experiment.store import write_json
from fundus_lab.registry import Registry
from fundus_lab.train import build_run_model, open_training_data, prepare_tokenizer

if TYPE_CHECKING:
    from fundus_lab.experiment.run import Run


class PixelFeatures(torch.nn.Module):
    """Downsampled pixels as features: ``image_features`` / ``encode_image`` of a model with no
    weights (area-averaged to ``side`` x ``side``), so the probes run on it unchanged."""

    def __init__(self, side: int = 16):
        super().__init__()
        self.register_buffer("side", torch.tensor(int(side)))  # in the fingerprint: the cache key

    def image_features(self, images: torch.Tensor, mask_ratio: float = 0.0) -> dict:
        s = int(self.side)
        x = torch.nn.functional.adaptive_avg_pool2d(images, (s, s)).flatten(1)  # [N, 3*s*s]
        return {"cls": x}

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.image_features(images)["cls"], dim=-1)


def _initial_model(mcfg: "C.Config"):
    """(model at the seeded initial weights pretraining starts from, the pretraining split)."""
    run_dir = Path(mcfg.train.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    set_seed(mcfg.train.seed)
    dataset = open_training_data(mcfg)
    tokenizer = prepare_tokenizer(mcfg, dataset, run_dir)
    set_seed(mcfg.train.seed)
    return build_run_model(mcfg, tokenizer), dataset


def _build_random_init(run: "Run", mcfg: "C.Config", out: Path) -> None:
    model, dataset = _initial_model(mcfg)
    model.save_pretrained(out)


def _build_supervised(run: "Run", mcfg: "C.Config", out: Path) -> None:
    """The same image encoder from random init, trained on the pretraining images' labels for
    the pretraining budget of images seen (epochs = steps x batch / training images)."""
    model, dataset = _initial_model(mcfg)
    root = mcfg.data.root or run.data_root
    # the pretraining set's own val split, halved by patient: one half picks the epoch, the
    # other is scored (fine_tune wants a test set; no evaluation test split is touched)
    val = open_split(mcfg, mcfg.data.dataset, "val", mcfg.model.img_size, root)
    pick, score = holdout_indices(val, fraction=0.5, seed=mcfg.train.seed)
    if len(pick) == 0 or len(score) == 0:
        raise ValueError(f"the supervised reference picks its epoch and scores on halves of {mcfg.data.dataset}'s val "
                         f"split by patient, which needs at least 2 patients there (found {len(val)} images of one); "
                         "use a larger data.synth_n")
    val, score = val.subset(pick), val.subset(score)
    seen = mcfg.train.steps * mcfg.train.batch_size * mcfg.train.grad_accum_steps
    epochs = max(1, math.ceil(seen / len(dataset)))
    r = fine_tune(model, dataset, val, score, epochs=epochs, lr=mcfg.train.lr, layer_decay=1.0,
                  weight_decay=mcfg.train.weight_decay, batch_size=mcfg.train.batch_size, patience=epochs,
                  seed=mcfg.train.seed, return_model=True)
    model = r["model"].backbone
    model.save_pretrained(out)
    write_json(Path(mcfg.train.output_dir) / "supervised.json",
               {"epochs": epochs, "images_seen": epochs * len(dataset), "budget_images": seen,
                "best_epoch": r["best_epoch"], "val": r["best_val"], "selection_metric": r["selection_metric"],
                "history": r["history"]})


@dataclass(frozen=True)
class Reference:
    """A reference row: how its checkpoint is made and which protocols apply to it."""

    name: str
    architecture: str | None  # the method whose model it builds (None: no model, pixels)
    build: Callable[["Run", "C.Config", Path], None] | None
    protocols: tuple[str, ...]  # where a protocol is missing the cell is n/a
    note: str
    trains: bool = True  # building it trains a model (False: it only saves initial weights, seconds)


REFERENCES: Registry[Reference] = Registry("reference row")
for _reference in (
    Reference("random-init", "clip", _build_random_init, tuple(PROTOCOLS),
              "untrained encoders (the floor)", trains=False),
    Reference("supervised", "clip", _build_supervised, ("few_shot", "fine_tune", "linear_probe", "linear_probe_full"),
              "the same image encoder trained on the pretraining images' labels, same images seen; no text tower"),
    Reference("pixels", None, None, ("linear_probe", "linear_probe_full"),
              "a linear probe on 16 x 16 area-averaged pixels"),
):
    REFERENCES.register(_reference.name, _reference)
