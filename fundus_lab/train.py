"""Pretraining: one loop for every method, on Hugging Face ``accelerate``.

The same code runs on one CPU, one GPU, or several GPUs/nodes
(``accelerate launch -m fundus_lab.cli pretrain --preset paper --method ours`` or ``torchrun``).
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

The loop's parts live beside it, one purpose each: ``fundus_lab.optim`` (AdamW groups and the
warm-up + cosine schedule, shared with fine-tuning), ``fundus_lab.sampling`` (the resumable,
seeded data order), ``fundus_lab.run_folder`` (the lock and the resume / start-over rules) and
``fundus_lab.train_log`` (``metrics.csv`` and the trackers). The command line is
``fundus_lab.cli.pretrain_main``.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from fundus_lab import checkpoint as ckpt
from fundus_lab import data as fl_data
from fundus_lab.config import Config, ConfigError, TrainConfig, resolve_path, save_config
from fundus_lab.data import collate, synth
from fundus_lab.data.text_source import PairedText
from fundus_lab.data.tokenizer import default_corpus, load_tokenizer, train_tokenizer
from fundus_lab.models import build_model, load_model
from fundus_lab.models.external import is_external
from fundus_lab.models.image import ConvNetTower
from fundus_lab.optim import build_optimizer, build_scheduler
from fundus_lab.run_folder import (check_may_start_over, check_resumable, lock_run_dir, restore_trainer_state,
                                   save_split, unlock_run_dir)
from fundus_lab.sampling import ResumableBatchSampler, SeededSamples, loader_options, to_device
from fundus_lab.train_log import Callback, MetricsLog, check_tracker


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or Inf; training stopped before the broken step was applied."""


class NonFiniteGradientError(NonFiniteLossError):
    """A finite loss gave a NaN/Inf gradient; stopped before ``optimizer.step()`` wrote it into the weights."""


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
# settings: what the loop can honour on this machine


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
    root = cfg.data.root
    name = cfg.data.dataset
    if root is None and name.startswith("synth-"):
        synth_root = resolve_path(cfg.data.synth_root)  # the one rule: relative to the working directory
        root = str(synth_root / name)
        if is_main:
            synth.generate_benchmark(str(synth_root), workers=None, **synth.benchmark_options(cfg.data))
        wait()
    ds = fl_data.open_dataset(
        name, root=root, split="train", image_size=cfg.model.img_size,
        augment=cfg.data.augment, skip_bad=cfg.data.skip_bad_images,
        image_cache=cfg.data.image_cache, image_cache_dir=cfg.data.image_cache_dir,
    )
    if not cfg.method.uses_text and cfg.method.labels_from == "ground_truth":
        return ds  # image-only (MAE): no text is read
    try:
        return PairedText(ds, cfg.data.text_source, cfg.data.text_per_image, cfg.method.labels_from)
    except ValueError as err:
        raise ConfigError(f"data.dataset {name!r}: {err}") from None


def tokenizer_texts(dataset) -> list[str]:
    """Tokenizer training text: the knowledge base plus every report of the training split."""
    return default_corpus(r.text for r in getattr(dataset, "records", []) if r.text)


def prepare_tokenizer(cfg: Config, dataset, run_dir: Path, is_main: bool = True, wait: Callable[[], None] = lambda: None):
    """``cfg.model.tokenizer`` if given, else the teacher's where the text tower starts from it
    (``method.text_init: teacher``), else the run's own (trained once, kept in ``run_dir/tokenizer``)."""
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


def channels_last_for(model: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """On a GPU, a CNN image tower's weights in ``channels_last`` (NHWC: cuDNN's tensor-core
    layout); its inputs follow in :meth:`ConvNetTower.forward_features`. The same values in
    another memory order; ViT towers (one patch convolution) are left as they are."""
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
    return build_model(cfg.model, cfg.method, tokenizer)


def load_run_model(checkpoint_dir: Path):
    return load_model(checkpoint_dir, external=False)  # a run's checkpoint is ours, never an outside model


# ---------------------------------------------------------------------------------------
# what one forward pass reports


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
