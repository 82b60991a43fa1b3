"""Pretraining: one loop for every method, on Hugging Face ``accelerate``.

The same code runs on one CPU, one GPU, or several GPUs/nodes
(``accelerate launch -m fundus_lab.train --preset paper --method ours`` or ``torchrun``).
Each optimizer step is

    for each of grad_accum_steps micro-batches:   out = model(batch); backward(out["loss"] / accum)
    clip_grad_norm(clip_grad_norm); AdamW step; cosine lr step; model.after_optimizer_step()

``model(batch)`` returns the weighted total ``"loss"`` and every named term ending in
``_loss`` (open_clip's shape); the loop logs all of them and stops at the first term that is
NaN or Inf, naming the step and the term, without writing a checkpoint of the broken weights.

Batch size is per process: one optimizer step sees
``train.batch_size * train.grad_accum_steps * num_processes`` images.

Exact resume: a checkpoint holds the weights, the optimizer and scheduler, every process's
RNG state and the data position (epoch and batch within it). Data order is a function of
(seed, epoch) alone and each sample's augmentation a function of (seed, epoch, index), so
a run killed at any step and resumed from its last checkpoint ends with the same weights
as one that never stopped.

Nothing lost: one job at a time holds a run folder (an OS lock that dies with the process;
a second job is refused, naming the holder's pid); resuming with a config that differs
from the run's is refused, listing every difference; a NaN/Inf gradient stops the step
before ``optimizer.step()``, and non-finite weights are never saved.
"""

from __future__ import annotations

import argparse
import csv
import functools
import math
import random
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fundus_lab import checkpoint as ckpt
from fundus_lab.config import Config, ConfigError, TrainConfig, load_config, resolve_path, save_config, to_dict

Callback = Callable[[int, dict], None]

# parameters whose weight decay would only pull them towards zero for no regularising gain
NO_DECAY_NAMES = ("pos_embed", "position_embedding", "positional_embedding", "logit_scale",
                  "cls_token", "reg_token", "mask_token", "logit_bias")


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or Inf; training stopped before the broken step was applied."""


class NonFiniteGradientError(NonFiniteLossError):
    """A finite loss gave a NaN/Inf gradient; stopped before ``optimizer.step()`` wrote it into the weights."""


class RunFolderLockedError(RuntimeError):
    """Another live job is writing this run folder (its pid is in the message)."""


# ---------------------------------------------------------------------------------------
# the run folder: one writer at a time, leftovers of a killed save removed

LOCK_FILE = ".lock"


def lock_run_dir(run_dir: Path):
    """Take an exclusive OS lock on ``run_dir/.lock`` (dies with the process: no stale locks).

    Two jobs writing one folder would interleave ``metrics.csv`` and overwrite each other's
    checkpoints; the second gets :class:`RunFolderLockedError` naming the folder and the
    holder's pid. Returns the open lock file; :func:`unlock_run_dir` releases it.
    """
    import fcntl
    import os

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    handle = open(path, "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise RunFolderLockedError(
            f"run folder {run_dir} is in use by another job (pid {holder}, lock {path}); wait for it to finish, "
            "or set another train.output_dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def unlock_run_dir(handle) -> None:
    if handle is not None:
        import fcntl

        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        handle.close()


def check_gradients(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    """Raise :class:`NonFiniteGradientError` if any gradient is NaN/Inf, naming the step, the
    optimizer's parameter group and the first parameters affected. A finite loss can still
    give such a gradient (0 * inf in backward); ``optimizer.step()`` would spread it into
    every weight, so this runs before it."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads or bool(torch.isfinite(torch.stack([g.detach().float().norm() for g in grads])).all()):
        return
    names = {id(p): n for n, p in model.named_parameters()}
    for gi, group in enumerate(optimizer.param_groups):
        bad = [names.get(id(p), "?") for p in group["params"] if p.grad is not None and not torch.isfinite(p.grad).all()]
        if bad:
            decay = group.get("weight_decay")
            raise NonFiniteGradientError(
                f"step {step}: non-finite gradient in parameter group {gi} (weight_decay={decay}): "
                f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; the loss was finite, the weights were not updated"
            )
    raise NonFiniteGradientError(f"step {step}: non-finite gradient norm; the weights were not updated")


# ---------------------------------------------------------------------------------------
# optimisation


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


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    # a partial (not a lambda or closure) so the scheduler's state_dict stays JSON-safe
    factor = functools.partial(
        lr_factor, warmup_steps=train.warmup_steps, total_steps=train.steps,
        min_ratio=train.min_lr / train.lr if train.lr > 0 else 0.0,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def resolve_mixed_precision(choice: str) -> str:
    """``auto`` -> ``bf16`` on a GPU that has it, else ``no``; fp16 needs a GPU."""
    cuda = torch.cuda.is_available()
    if choice == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if choice == "fp16" and not cuda:
        raise ConfigError("train.mixed_precision = 'fp16' needs a CUDA GPU; use 'auto', 'bf16' or 'no'")
    if choice not in ("no", "fp16", "bf16"):
        raise ConfigError(f"train.mixed_precision = {choice!r}; expected one of auto, no, fp16, bf16")
    return choice


# the package each tracker of ``train.log_with`` needs (tensorboard is a fundus_lab dependency)
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_tracker(log_with: str) -> None:
    """An uninstalled tracker is an error here: accelerate would silently log to nothing."""
    import importlib.util

    package = TRACKER_PACKAGES.get(log_with)
    if package is not None and importlib.util.find_spec(package) is None:
        raise ConfigError(
            f"train.log_with = {log_with!r} needs the {package!r} package, which is not installed: "
            f"pip install {package} (or choose train.log_with=tensorboard or none)"
        )


def check_train_config(train: TrainConfig) -> None:
    """Reject settings the loop cannot honour, naming the field."""
    checks = [
        (train.steps >= 1, "train.steps", "an integer >= 1"),
        (train.batch_size >= 1, "train.batch_size", "an integer >= 1"),
        (train.grad_accum_steps >= 1, "train.grad_accum_steps", "an integer >= 1"),
        (train.lr >= 0, "train.lr", "a learning rate >= 0"),
        (0 <= train.min_lr <= max(train.lr, 0.0), "train.min_lr", "between 0 and train.lr"),
        (train.warmup_steps >= 0, "train.warmup_steps", "an integer >= 0"),
        (train.log_every >= 1, "train.log_every", "an integer >= 1"),
        (train.save_every >= 0, "train.save_every", "an integer >= 0 (0: only at the end)"),
        (train.clip_grad_norm is None or train.clip_grad_norm > 0, "train.clip_grad_norm", "None or > 0"),
    ]
    for ok, key, expected in checks:
        if not ok:
            raise ConfigError(f"{key} = {getattr(train, key.split('.')[1])!r}; expected {expected}")
    check_tracker(train.log_with)


# ---------------------------------------------------------------------------------------
# data: order from (seed, epoch), augmentation from (seed, epoch, index)


class ResumableBatchSampler(Sampler):
    """Per-process batches of a seeded permutation, able to start mid-epoch.

    Epoch ``e`` shuffles with ``torch.randperm(n, generator=seed(seed, e))``; process ``r``
    of ``w`` takes every ``w``-th index from ``r`` (equal shares, the tail dropped), cuts
    it into full batches and yields ``[(index, sample_seed), ...]`` from batch ``start``.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def batches_per_epoch(self) -> int:
        return (self.n // self.world_size) // self.batch_size

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        gen = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
        order = torch.randperm(self.n, generator=gen).tolist()
        share = self.n // self.world_size
        mine = order[self.rank::self.world_size][:share]
        for b in range(self.start, self.batches_per_epoch()):
            idx = mine[b * self.batch_size:(b + 1) * self.batch_size]
            yield [(i, sample_seed(self.seed, self.epoch, i)) for i in idx]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for (run seed, epoch, sample index)."""
    return int(np.random.SeedSequence([seed, epoch, index + 1]).generate_state(2, np.uint64)[0] >> np.uint64(1))


@contextmanager
def isolated_rng(seed: int):
    """Seed python/numpy/torch for one block, then put the outer states back.

    Why: augmentation draws from the global RNGs; isolating it makes each sample's
    augmentation independent of worker count, prefetching and resume, and leaves the
    model's own stream (masks, dropout) untouched.
    """
    py, nps, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(nps)
        torch.set_rng_state(th)


class SeededSamples(Dataset):
    """Wraps a dataset so that ``ds[(index, seed)]`` fetches ``index`` under :func:`isolated_rng`."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with isolated_rng(seed):
            return self.dataset[index]


def to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


# ---------------------------------------------------------------------------------------
# building the run's parts (the library's own data, tokenizer and model)


def run_dir_for(cfg: Config) -> Path:
    """``train.output_dir`` with ``{method}``, ``{preset}``, ``{seed}`` filled in."""
    return Path(cfg.train.output_dir.format(method=cfg.method.name, preset=cfg.preset, seed=cfg.train.seed))


def open_training_data(cfg: Config, is_main: bool = True, wait: Callable[[], None] = lambda: None):
    """The training split of ``cfg.data.dataset``, each image paired with the text of
    ``cfg.data.text_source`` (:class:`fundus_lab.data.text_source.PairedText`).

    A synthetic dataset (``synth-*``) with no ``data.root`` lives under ``data.synth_root``;
    the benchmark is (re)written there first unless it already holds exactly the
    configured one (``synth_n``, ``synth_seed``, ``synth_image_size``; a cheap check).
    """
    from fundus_lab import data as fl_data

    root = cfg.data.root
    name = cfg.data.dataset
    if root is None and name.startswith("synth-"):
        synth_root = resolve_path(cfg.data.synth_root)  # the one rule: relative to the working directory
        root = str(synth_root / name)
        if is_main:
            from fundus_lab.data import synth

            synth.generate_benchmark(str(synth_root), workers=None, **synth.benchmark_options(cfg.data))
        wait()
    ds = fl_data.open_dataset(
        name, root=root, split="train", image_size=cfg.model.img_size,
        augment=cfg.data.augment, skip_bad=cfg.data.skip_bad_images,
        image_cache=cfg.data.image_cache, image_cache_dir=cfg.data.image_cache_dir,
    )
    if not cfg.method.uses_text and cfg.method.labels_from == "ground_truth":
        return ds  # image-only (MAE): no text is read
    from fundus_lab.data.text_source import PairedText

    try:
        return PairedText(ds, cfg.data.text_source, cfg.data.text_per_image, cfg.method.labels_from)
    except ValueError as err:
        raise ConfigError(f"data.dataset {name!r}: {err}") from None


def tokenizer_texts(dataset) -> list[str]:
    """Tokenizer training text: the knowledge base plus every report of the training split."""
    from fundus_lab.data.tokenizer import default_corpus

    return default_corpus(r.text for r in getattr(dataset, "records", []) if r.text)


def collate(items: list[dict]) -> dict:
    """``fundus_lab.data.collate`` (tensors stacked, strings kept as lists)."""
    from fundus_lab.data import collate as data_collate

    return data_collate(items)


def prepare_tokenizer(cfg: Config, dataset, run_dir: Path, is_main: bool = True, wait: Callable[[], None] = lambda: None):
    """``cfg.model.tokenizer`` if given, else the teacher's where the text tower starts from it
    (``method.text_init: teacher``), else the run's own (trained once, kept in ``run_dir/tokenizer``)."""
    from fundus_lab.data.tokenizer import load_tokenizer, train_tokenizer

    if cfg.model.tokenizer:
        return load_tokenizer(cfg.model.tokenizer)
    if cfg.model.text_pretrained:  # a pretrained text encoder comes with its vocabulary
        return load_tokenizer(cfg.model.text_pretrained)
    if not cfg.method.uses_text:
        return None  # image-only (MAE): no text branch
    teacher = Path(cfg.method.teacher_checkpoint or "") / "tokenizer"
    if cfg.method.text_init == "teacher" and cfg.method.teacher_checkpoint and teacher.is_dir():
        return load_tokenizer(teacher)  # EVA-CLIP: the text tower starts from the teacher's, with its vocabulary
    out = run_dir / "tokenizer"
    if not out.is_dir():
        if is_main:
            train_tokenizer(tokenizer_texts(dataset), vocab_size=cfg.model.vocab_size, out_dir=out,
                            model_max_length=cfg.model.text_max_length)
        wait()
    return load_tokenizer(out)


def loader_options(num_workers: int, device: torch.device | str) -> dict:
    """DataLoader worker options: on a GPU, pinned host memory (asynchronous copies) and,
    with workers, persistent ones (not re-forked every epoch). Samples are seeded by
    position (:class:`SeededSamples`), so neither changes a batch."""
    cuda = torch.device(device).type == "cuda"
    return {"num_workers": num_workers, "pin_memory": cuda, "persistent_workers": cuda and num_workers > 0}


def channels_last_for(model: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """On a GPU, a CNN image tower's weights in ``channels_last`` (NHWC: cuDNN's tensor-core
    layout); its inputs follow in :meth:`ConvNetTower.forward_features`. The same values in
    another memory order; ViT towers (one patch convolution) are left as they are."""
    from fundus_lab.models.image import ConvNetTower

    tower = getattr(model, "image_encoder", None)
    if torch.device(device).type == "cuda" and isinstance(tower, ConvNetTower):
        tower.trunk.to(memory_format=torch.channels_last)
    return model


def compile_model(model: torch.nn.Module, train: TrainConfig) -> torch.nn.Module:
    """``train.compile``: compile the image encoder in place (``nn.Module.compile``, so the
    state-dict keys stay those of the eager model). Compiling every submodule measured slower
    still; on the 2-core CPU even this one is (results/benchmarks/compile.md), hence off by default."""
    if train.compile:
        model.image_encoder.compile()
    return model


def build_run_model(cfg: Config, tokenizer):
    from fundus_lab.models import build_model

    return build_model(cfg.model, cfg.method, tokenizer)


def load_run_model(checkpoint_dir: Path):
    from fundus_lab.models import load_model

    return load_model(checkpoint_dir, external=False)  # a run's checkpoint is ours, never an outside model


def save_split(dataset, path: Path) -> None:
    """The exact training records of this run, so evaluation can exclude them."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "path", "patient_id", "eye", "split"])
        for i, r in enumerate(getattr(dataset, "records", [])):
            writer.writerow([i, r.path, r.patient_id, r.eye, r.split])


_RESUME_SECTIONS = ("preset", "method", "model", "data", "train")
# change nothing that is learnt: always free on resume
_RESUME_FREE = {"data.num_workers", "data.skip_bad_images", "train.log_every", "train.save_every",
                "train.keep_checkpoints", "train.log_with", "train.tensorboard", "train.progress",
                "train.output_dir", "train.budget", "train.budget_method", "train.teacher_steps"}
# free only when named in allow_changes (--allow-change): the run stays sound, but is no
# longer the run the config describes (more steps change the cosine schedule's end)
RESUME_OVERRIDABLE = ("train.steps", "train.mixed_precision", "data.synth_root", "data.root")


def check_resumable(saved_config: Path, cfg: Config, allow_changes: Sequence[str] = ()) -> None:
    """Refuse to resume a run folder trained with a different method, model, data or budget
    (lr, seed, batch size, schedule...): the restored optimizer and scheduler would silently
    keep the old values while ``config.yaml`` claimed the new ones. Every difference is listed.
    ``allow_changes`` lets the keys of :data:`RESUME_OVERRIDABLE` differ."""
    import yaml

    unknown = [k for k in allow_changes if k not in RESUME_OVERRIDABLE]
    if unknown:
        raise ConfigError(f"allow_changes: {unknown} cannot be changed on resume; only {list(RESUME_OVERRIDABLE)}")
    if not saved_config.is_file():
        raise ConfigError(
            f"{saved_config.parent} holds checkpoints but no {saved_config.name}, so nothing shows they belong to "
            "this config; pass resume=False (--no-resume) to start over or set another train.output_dir"
        )
    try:
        saved = yaml.safe_load(saved_config.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{saved_config}: cannot be read to check the resumed run ({err})") from None
    if not isinstance(saved, dict):
        raise ConfigError(
            f"{saved_config}: expected a mapping of config sections, got a YAML {type(saved).__name__}, so nothing "
            "shows the checkpoints belong to this config; restore the file, or pass resume=False (--no-resume) to "
            "start over or set another train.output_dir")
    now = to_dict(cfg)
    diffs = []
    for section in _RESUME_SECTIONS:
        old, new = saved.get(section, {}), now.get(section, {})
        if not isinstance(old, dict) or not isinstance(new, dict):
            if old != new:
                diffs.append(f"{section}: run has {old!r}, config asks {new!r}")
            continue
        for key in sorted(set(old) | set(new)):
            name = f"{section}.{key}"
            if old.get(key) != new.get(key) and name not in _RESUME_FREE and name not in allow_changes:
                diffs.append(f"{name}: run has {old.get(key)!r}, config asks {new.get(key)!r}")
    if diffs:
        raise ConfigError(
            f"{saved_config}: cannot resume this run with a different config ({len(diffs)} difference(s): "
            + "; ".join(diffs) + "); pass resume=False (--no-resume) to start over, set another train.output_dir"
            + f", or allow one of {list(RESUME_OVERRIDABLE)} with --allow-change"
        )


# what a run folder is a run *of*: a folder whose config.yaml agrees on these is this run's
# (started again with other settings, e.g. another lr); one that differs holds another run
RUN_IDENTITY = ("preset", "method.name", "data.dataset", "train.seed")
# written into a run folder before training starts: the lock, and the pretraining key and
# training-split inputs that ``fundus_lab.experiment.pretrain_cached`` (compare, notebooks) keeps
RUN_BOOKKEEPING = (LOCK_FILE, "cache_key.json", "inputs")


def check_may_start_over(run_dir: Path, cfg: Config) -> None:
    """Refuse to start a run over in ``run_dir`` (``--no-resume``, or no checkpoint to resume)
    when the folder holds another run, since starting over deletes its checkpoints, tokenizer
    and TensorBoard logs and rewrites its config.yaml and metrics.csv.

    The folder is this run's when it is empty (:data:`RUN_BOOKKEEPING` aside) or its ``config.yaml`` agrees
    with ``cfg`` on :data:`RUN_IDENTITY` (preset, method, dataset, seed). Anything else is
    another run: a config.yaml naming another method/preset/dataset/seed, one that cannot be
    read, or files without a config.yaml. The error names the folder and what differs.
    """
    import yaml

    if not run_dir.is_dir():
        return
    contents = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_BOOKKEEPING)
    if not contents:
        return
    advice = "set another train.output_dir, or delete the folder yourself if it is no longer wanted"
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError(f"{run_dir}: refusing to start a run over in a folder that holds files but no config.yaml "
                          f"({', '.join(contents[:5])}{' ...' if len(contents) > 5 else ''}), so nothing shows they "
                          f"belong to this run; {advice}")
    try:
        saved = yaml.safe_load(saved_path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{saved_path}: cannot be read ({err}); refusing to start a run over in {run_dir}, which "
                          f"may hold another run; {advice}") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{saved_path}: expected a mapping of config sections, got {type(saved).__name__}; refusing "
                          f"to start a run over in {run_dir}; {advice}")
    now = to_dict(cfg)
    diffs = []
    for key in RUN_IDENTITY:
        old_value, new_value = saved, now
        for part in key.split("."):
            old_value = old_value.get(part) if isinstance(old_value, dict) else None
            new_value = new_value.get(part) if isinstance(new_value, dict) else None
        if old_value != new_value:
            diffs.append(f"{key}: folder has {old_value!r}, this run {new_value!r}")
    if diffs:
        raise ConfigError(f"{run_dir} holds another run ({'; '.join(diffs)}); refusing to start over there, which "
                          f"would delete its checkpoints and logs; {advice}")


def restore_trainer_state(last: Path, optimizer, scheduler, accelerator) -> tuple[int, int, int]:
    """Load ``last`` into the optimizer, scheduler, scaler and RNGs; -> (step, epoch, batch).
    Missing or malformed fields are a :class:`~fundus_lab.checkpoint.CheckpointError` naming the file."""
    state = ckpt.load_checkpoint(last, optimizer.optimizer)
    where = last / ckpt.STATE_FILE
    trainer = state["trainer"]
    missing = [k for k in ("epoch", "batch_in_epoch", "rng", "scheduler") if k not in trainer]
    if missing:
        raise ckpt.CheckpointError(f"{where}: trainer state lacks {missing}")
    try:
        scheduler.load_state_dict(trainer["scheduler"])
        if accelerator.scaler is not None and trainer.get("scaler"):
            accelerator.scaler.load_state_dict(trainer["scaler"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ckpt.CheckpointError(f"{where}: scheduler/scaler state is malformed ({err})") from None
    rng = trainer["rng"]
    if not isinstance(rng, list) or len(rng) != accelerator.num_processes:
        raise ckpt.CheckpointError(
            f"{last}: saved by {len(rng) if isinstance(rng, list) else '?'} processes, resumed with "
            f"{accelerator.num_processes}; exact resume needs the same number"
        )
    ckpt.set_rng_state(rng[accelerator.process_index], str(where))
    return state["step"], int(trainer["epoch"]), int(trainer["batch_in_epoch"])


# ---------------------------------------------------------------------------------------
# logging


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


def loss_terms(out: dict) -> dict[str, torch.Tensor]:
    """The total and the named ``*_loss`` terms of a forward output, total first."""
    if "loss" not in out:
        raise KeyError(f"model.forward returned no 'loss' (keys: {sorted(out)})")
    terms = {"loss": out["loss"]}
    terms.update({k: v for k, v in out.items() if k.endswith("_loss") and k != "loss"})
    return terms


def scalar_logs(out: dict) -> dict[str, float]:
    """Every scalar in a forward output as a float, checking loss terms are finite."""
    keys = [k for k, v in out.items() if isinstance(v, torch.Tensor) and v.numel() == 1]
    values = torch.stack([out[k].detach().float().reshape(()) for k in keys]).tolist() if keys else []
    logs = dict(zip(keys, values))
    logs.update({k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return logs


def check_finite(step: int, logs: dict[str, float]) -> None:
    """Raise naming the first non-finite named term (the total only if no term explains it)."""
    names = [k for k in logs if k.endswith("_loss") and k != "loss"] + (["loss"] if "loss" in logs else [])
    for name in names:
        if not math.isfinite(logs[name]):
            raise NonFiniteLossError(f"step {step}: {name} is {logs[name]}")


# ---------------------------------------------------------------------------------------
# the loop


def train_step(accelerator, model, optimizer, scheduler, batches: Iterator[dict], train: TrainConfig,
               step: int) -> tuple[list[dict], Optional[float], float]:
    """One optimizer step over ``train.grad_accum_steps`` micro-batches drawn from ``batches``.

    ``step`` (1-based) only names the step in a NaN/Inf error. Returns the scalar logs of
    each micro-batch, the gradient norm before clipping (None without clipping) and the
    learning rate this step used. The benchmark (benchmarks/train_throughput.py) times it.
    """
    logs = []
    progress = getattr(accelerator.unwrap_model(model), "set_progress", None)
    if progress is not None:  # two-stage methods (EVA-CLIP) pick their stage from the step
        progress(step - 1, train.steps)
    for micro in range(train.grad_accum_steps):
        batch = next(batches)
        # gradients are all-reduced once per step, on its last micro-batch
        last = micro == train.grad_accum_steps - 1
        with nullcontext() if last else accelerator.no_sync(model):
            out = model(batch)
            logs.append(scalar_logs(out))
            check_finite(step, logs[-1])  # before backward: broken gradients never reach the weights
            accelerator.backward(out["loss"] / train.grad_accum_steps)
    if getattr(accelerator, "scaler", None) is None:  # fp16's GradScaler skips overflow steps itself
        check_gradients(accelerator.unwrap_model(model), optimizer, step)
    grad_norm = None
    if train.clip_grad_norm is not None:
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), train.clip_grad_norm))
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    hook = getattr(accelerator.unwrap_model(model), "after_optimizer_step", None)
    if hook is not None:  # temperature clamp, momentum encoders
        hook()
    return logs, grad_norm, lr


def holding_run_lock(fn):
    """Run ``fn(cfg, ...)`` holding the lock of its run folder (main process only: RANK 0),
    after removing what a killed save left there; the lock is released however ``fn`` ends."""
    import os

    @functools.wraps(fn)
    def wrapper(cfg: Config, *args, **kwargs):
        if int(os.environ.get("RANK", "0")) != 0:
            return fn(cfg, *args, **kwargs)
        run_dir = run_dir_for(cfg)
        handle = lock_run_dir(run_dir)
        try:
            ckpt.clean_tmp(run_dir)
            return fn(cfg, *args, **kwargs)
        finally:
            unlock_run_dir(handle)

    return wrapper


@holding_run_lock
def pretrain(cfg: Config, callbacks: Iterable[Callback] = (), resume: bool = True,
             allow_changes: Sequence[str] = (), replace_run: bool = False) -> Path:
    """Pretrain ``cfg.method`` and return the run folder.

    The folder (``train.output_dir``, with ``{method}``/``{preset}``/``{seed}`` filled in)
    holds ``config.yaml``, ``split.csv`` (the training records), ``tokenizer/``,
    ``metrics.csv``, ``tensorboard/`` (``train.log_with=tensorboard``, the default) and
    ``checkpoint-<step>/`` folders with ``checkpoint-last`` pointing at the newest
    (``fl.load_model`` reads any of them). wandb and mlflow log where they are configured to.

    Args:
        cfg: the whole run config (``fundus_lab.config.load_config``).
        callbacks: ``cb(step, logs)`` called at every log step with the logged values
            (``loss``, each ``*_loss`` term, ``lr``, ``grad_norm``, ``images_per_s`` ...).
        resume: continue from ``checkpoint-last`` if the folder has one (exactly: same
            weights as an uninterrupted run); False starts over and removes old checkpoints,
            only in a folder of this same run (:func:`check_may_start_over`): another run's
            folder is refused, never cleared.
            Resuming with a config that differs from the run's is refused (:func:`check_resumable`).
        allow_changes: keys of :data:`RESUME_OVERRIDABLE` allowed to differ on resume.
        replace_run: the caller owns the folder and replaces whatever run it holds
            (``fundus_lab.experiment.pretrain_cached``, whose key file shows the folder is its
            cache); skips :func:`check_may_start_over`.

    Raises:
        NonFiniteLossError: a loss term became NaN/Inf ("step 17: image_gen_loss is nan"),
            or a gradient did (:class:`NonFiniteGradientError`); the last checkpoint written
            before it is kept.
        RunFolderLockedError: another job is writing the same run folder.
    """
    import shutil

    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    train = cfg.train
    check_train_config(train)
    run_dir = run_dir_for(cfg)
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(train.mixed_precision),
        log_with=None if train.log_with == "none" else train.log_with,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")),
    )
    is_main = accelerator.is_main_process
    wait = accelerator.wait_for_everyone

    # where to start
    last = ckpt.last_checkpoint(run_dir) if resume else None
    if last is not None:
        from fundus_lab.models.external import is_external

        if is_external(last):  # before any data or model work: only our own format is resumed
            raise ckpt.CheckpointError(f"{last}: holds an outside model (Hugging Face or open_clip files), not a "
                                       "checkpoint this trainer wrote; refusing to resume from it")
        check_resumable(run_dir / "config.yaml", cfg, allow_changes)
    if last is None and not replace_run:
        check_may_start_over(run_dir, cfg)
    if is_main:
        if last is None and run_dir.is_dir():
            stale = ckpt.list_checkpoints(run_dir) + [run_dir / ckpt.LAST, run_dir / "tensorboard", run_dir / "tokenizer"]
            for path in stale:
                if path.is_symlink() or path.is_file():
                    path.unlink()
                elif path.is_dir():
                    shutil.rmtree(path)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    wait()

    set_seed(train.seed)
    dataset = open_training_data(cfg, is_main, wait)
    if is_main:
        save_split(dataset, run_dir / "split.csv")
    if last is not None:
        model = load_run_model(last)
    else:
        tokenizer = prepare_tokenizer(cfg, dataset, run_dir, is_main, wait)
        set_seed(train.seed)  # the same initial weights whatever the tokenizer consumed
        model = build_run_model(cfg, tokenizer)
    model.train()
    channels_last_for(model, accelerator.device)
    compile_model(model, train)
    optimizer = build_optimizer(model, train, accelerator.device)
    scheduler = build_scheduler(optimizer, train)
    model, optimizer = accelerator.prepare(model, optimizer)
    # each process its own stream for masks/dropout; the data order is seeded separately
    set_seed(train.seed + accelerator.process_index)

    sampler = ResumableBatchSampler(len(dataset), train.batch_size, train.seed,
                                    accelerator.process_index, accelerator.num_processes)
    if sampler.batches_per_epoch() < 1:
        raise ConfigError(
            f"data.dataset {cfg.data.dataset!r}: {len(dataset)} training samples are fewer than one "
            f"batch (train.batch_size={train.batch_size} x {accelerator.num_processes} processes)"
        )
    loader = DataLoader(
        SeededSamples(dataset), batch_sampler=sampler, collate_fn=collate,
        **loader_options(cfg.data.num_workers, accelerator.device),
        generator=torch.Generator().manual_seed(train.seed),  # keeps the global RNG out of it
    )

    step, epoch, position = 0, 0, 0
    if last is not None:
        step, epoch, position = restore_trainer_state(last, optimizer, scheduler, accelerator)
        if is_main:
            print(f"fundus_lab: resuming {run_dir} from step {step} (epoch {epoch}, batch {position})")

    def batches() -> Iterator[dict]:
        nonlocal epoch, position
        while True:
            sampler.set_position(epoch, position)
            for batch in loader:
                position += 1
                yield to_device(batch, accelerator.device)
            epoch, position = epoch + 1, 0

    def save() -> None:
        rng = accelerate_gather(accelerator, ckpt.rng_state())
        if is_main:
            ckpt.check_finite_weights(accelerator.unwrap_model(model), f"step {step}")
            ckpt.save_checkpoint(
                run_dir, step, save_model=accelerator.unwrap_model(model).save_pretrained,
                optimizer=optimizer.optimizer, keep=train.keep_checkpoints,
                trainer_state={
                    "epoch": epoch, "batch_in_epoch": position, "rng": rng,
                    "scheduler": scheduler.state_dict(),
                    "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                    "images_seen": step * global_batch,
                },
            )
        wait()

    global_batch = train.batch_size * train.grad_accum_steps * accelerator.num_processes
    logger = MetricsLog(run_dir, step, tuple(callbacks), accelerator, cfg)
    bar = tqdm(total=train.steps, initial=step, disable=not (is_main and train.progress),
               desc=f"pretrain {cfg.method.name}", dynamic_ncols=True)
    data = batches()
    window: dict[str, list[float]] = {}
    window_start, window_images = time.perf_counter(), 0
    try:
        while step < train.steps:
            logs, grad_norm, lr = train_step(accelerator, model, optimizer, scheduler, data, train, step + 1)
            for micro_logs in logs:
                for key, value in micro_logs.items():
                    window.setdefault(key, []).append(value)
            logs = logs[-1]
            step += 1
            window_images += global_batch
            bar.update(1)
            if bar.disable is False:
                bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k == "loss" or k.endswith("_loss")})

            if step % train.log_every == 0 or step == train.steps:
                elapsed = time.perf_counter() - window_start
                row = {"step": step, "epoch": epoch, "lr": lr}
                row.update({k: float(np.mean(v)) for k, v in window.items()})
                if grad_norm is not None:  # the window's last step, before clipping
                    row["grad_norm"] = grad_norm
                row["images_per_s"] = window_images / elapsed if elapsed > 0 else float("nan")
                logger.log(step, row)
                window, window_start, window_images = {}, time.perf_counter(), 0
            if step == train.steps or (train.save_every and step % train.save_every == 0):
                save()
    finally:
        bar.close()
        logger.close()
    return run_dir


def accelerate_gather(accelerator, obj) -> list:
    """Every process's ``obj`` as a list on every process (a plain list on one process)."""
    if accelerator.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])


# ---------------------------------------------------------------------------------------
# command line: fundus-lab pretrain / python -m fundus_lab.train / accelerate launch -m fundus_lab.train


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fundus-lab pretrain",
        description="Pretrain a method on the configured data (accelerate: the same command on CPU or GPUs).",
    )
    parser.add_argument("--config", help="a YAML file of config sections (may name preset: and method:)")
    parser.add_argument("--preset", help="smoke | default | paper")
    parser.add_argument("--method", help="a method from configs/methods/")
    parser.add_argument("--no-resume", action="store_true", help="start over even if the run folder has checkpoints")
    parser.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                        help=f"on resume, let KEY differ from the run's config (one of {', '.join(RESUME_OVERRIDABLE)})")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. train.steps=100 model.img_size=128")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, preset=args.preset, method=args.method, overrides=args.overrides)
    except ConfigError as err:
        print(f"fundus-lab pretrain: {err}", file=sys.stderr)
        return 2
    try:
        run_dir = pretrain(cfg, resume=not args.no_resume, allow_changes=args.allow_change)
    except (ConfigError, RunFolderLockedError, ckpt.CheckpointError) as err:
        print(f"fundus-lab pretrain: {err}", file=sys.stderr)
        return 2
    print(run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
