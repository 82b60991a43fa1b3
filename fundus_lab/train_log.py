"""What a pretraining run logs: ``metrics.csv``, the experiment tracker and the callbacks.

Why a module of its own: the log survives a resume (rows written after the checkpoint are
dropped, TensorBoard purges its later events) and talks to whichever tracker
``train.log_with`` names through accelerate; the loop in ``fundus_lab.train`` only hands
it one row per log step.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path
from typing import Callable, Sequence

from fundus_lab import checkpoint as ckpt
from fundus_lab.config import Config, ConfigError, to_dict

Callback = Callable[[int, dict], None]


# the package each tracker of ``train.log_with`` needs (tensorboard is a fundus_lab dependency)
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_tracker(log_with: str) -> None:
    """An uninstalled tracker is an error here: accelerate would silently log to nothing."""
    package = TRACKER_PACKAGES.get(log_with)
    if package is not None and importlib.util.find_spec(package) is None:
        raise ConfigError(
            f"train.log_with = {log_with!r} needs the {package!r} package, which is not installed: "
            f"pip install {package} (or choose train.log_with=tensorboard or none)"
        )


TRACKER_PROJECT = "fundus_lab"  # the wandb project / mlflow experiment; tensorboard/<this>/ in a run


def flat_config(cfg: Config) -> dict:
    """The run config as ``{"train.lr": 0.0005, ...}`` of scalars (lists as text), the shape
    every tracker takes as hyperparameters (TensorBoard's hparams refuse lists)."""
    flat = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else key, sub)
        else:
            flat[prefix] = str(value) if isinstance(value, (list, tuple)) else value

    walk("", to_dict(cfg))
    return flat


class MetricsLog:
    """``metrics.csv`` (one row per log step), the experiment tracker (``train.log_with``,
    through accelerate: ``init_trackers`` / ``log`` / each tracker's ``finish``), and the callbacks.

    On resume, rows written after the checkpoint (by the run that was killed) are dropped
    so the file reads as one uninterrupted run; TensorBoard purges its later events the same way.
    """

    def __init__(self, run_dir: Path, start_step: int, callbacks: Sequence[Callback], accelerator,
                 cfg: Config):
        self.path = run_dir / "metrics.csv"
        self.callbacks = list(callbacks)
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        self.fields: list[str] = []
        self.rows: list[dict] = []
        if not self.is_main:
            return
        if self.path.is_file() and start_step > 0:
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self.fields = list(reader.fieldnames or [])
                self.rows = [r for r in reader if r.get("step") and self._step(r, reader.line_num) <= start_step]
            self._rewrite()
        elif self.path.is_file():
            self.path.unlink()
        if cfg.train.log_with != "none":
            name = f"{cfg.method.name}-{cfg.preset}-seed{cfg.train.seed}"
            accelerator.init_trackers(TRACKER_PROJECT, config=flat_config(cfg), init_kwargs={
                "tensorboard": {"purge_step": start_step + 1 if start_step else None},
                "wandb": {"name": name, "dir": str(run_dir)},
                "mlflow": {"run_name": name},
            })

    def _step(self, row: dict, line: int) -> int:
        """A kept row's step; a damaged one is a CheckpointError naming the file and line."""
        try:
            return int(row["step"])
        except (TypeError, ValueError):
            raise ckpt.CheckpointError(
                f"{self.path} line {line}: step {row['step']!r} is not an integer, so the rows to keep on resume "
                "cannot be told; fix or delete that line and resume, or start over with resume=False "
                "(--no-resume)") from None

    def _rewrite(self) -> None:
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields, restval="")
            w.writeheader()
            w.writerows(self.rows)

    def log(self, step: int, logs: dict) -> None:
        if self.is_main:
            row = {k: v for k, v in logs.items()}
            new = [k for k in row if k not in self.fields]
            self.rows.append(row)
            if new:  # a term that appeared late: widen the header rather than drop it
                self.fields += new
                self._rewrite()
            else:
                with open(self.path, "a", newline="") as f:
                    csv.DictWriter(f, fieldnames=self.fields, restval="").writerow(row)
            if self.accelerator.trackers:
                self.accelerator.log({f"train/{k}": v for k, v in logs.items()
                                      if k not in ("step", "epoch") and isinstance(v, (int, float))}, step=step)
        for cb in self.callbacks:
            cb(step, dict(logs))

    def close(self) -> None:
        """``accelerator.end_training()`` without its ``destroy_process_group``: compare and the
        notebooks pretrain several methods in one process, each on the same process group."""
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers = []
