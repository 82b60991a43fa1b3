"""The run folder's bookkeeping: one writer at a time, and when a run may resume or start over.

Why a module of its own: these rules decide what a job may do to a folder that holds
(or may hold) another run's checkpoints: the OS lock, the refusals to resume with a
different config or to start over in another run's folder, restoring the trainer's state
from a checkpoint, and the training split written beside it. The loop in
``fundus_lab.train`` calls them; none of them trains anything.
"""

from __future__ import annotations

import csv
import fcntl
import os
from pathlib import Path
from typing import Sequence

import yaml

from fundus_lab import checkpoint as ckpt
from fundus_lab.config import Config, ConfigError, to_dict


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
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        handle.close()


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
