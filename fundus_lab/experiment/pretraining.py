"""Pretraining, cached and in parallel: a pretraining run is redone only when its inputs
change (:func:`pretrain_key`: the resolved config minus bookkeeping, the data manifest, the
split and the teacher's weights), and the (method, seed) runs of a table can be trained in
several processes at once (:func:`pretrain_in_processes`), each making exactly the
checkpoint a sequential run would.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import time
from pathlib import Path
from typing import Sequence

import torch

from fundus_lab import config as C
from fundus_lab import train
from fundus_lab.budget import counts_teacher
from fundus_lab.eval.honesty import write_split_file
from fundus_lab.experiment.datasets import manifest_hash, open_split
from fundus_lab.experiment.store import KEY_FILE, read_json, sha256_file, sha256_json, write_json
from fundus_lab.models.model import code_revision


def threads_per_job(jobs: int, cores: int | None = None) -> int:
    """``train.num_threads`` for ``jobs`` pretraining processes sharing ``cores`` (default: this
    process's CPUs): cores / jobs, at least one."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, jobs))


def jobs_overrides(jobs: int, overrides: Sequence[str]) -> list[str]:
    """``overrides`` plus ``train.num_threads=cores/jobs`` when ``jobs`` > 1 and the user set no
    thread count: every config of the run (and so every cache key) then says what ran."""
    if jobs < 1:
        raise C.ConfigError(f"--jobs {jobs}: expected 1 or more pretraining processes")
    if jobs == 1 or any(str(o).split("=", 1)[0].strip() == "train.num_threads" for o in overrides):
        return list(overrides)
    return [*overrides, f"train.num_threads={threads_per_job(jobs)}"]


def _pretrain_worker_init(slots, gpus: int, jobs: int) -> None:
    """A pretraining worker's place: with several GPUs, the one of its slot (before CUDA starts)."""
    slot = slots.get()
    if gpus > 1:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(slot % min(gpus, jobs))


def _pretrain_job(spec: dict, row: str, seed: int) -> tuple[str, int, str]:
    """One (row, seed) of :func:`pretrain_in_processes`, in its own process: a run like the
    caller's (``spec["run_class"]`` built from the same arguments) makes the checkpoint
    exactly as the caller would have."""
    run = spec["run_class"](spec["preset"], spec["run_dir"], spec["data_root"], spec["overrides"], spec["force"],
                            path=spec["path"])
    for key, path in spec.get("made", {}).items():
        name, _, made_seed = key.rpartition("|")
        run._checkpoints[(name, int(made_seed))] = Path(path)
    return row, seed, str(run.checkpoint(row, seed))


def pretrain_in_processes(spec: dict, waves: Sequence[Sequence[tuple[str, int]]], jobs: int,
                          checkpoints: dict) -> dict[tuple[str, int], Path]:
    """Make the checkpoints of ``waves`` (lists of (row, seed) that do not depend on each
    other) in ``jobs`` spawned processes, wave after wave; each goes into ``checkpoints`` (the
    caller's) as it finishes, and later waves reuse the ones made before (EVA's teacher).
    Returns the checkpoints made."""
    made: dict[tuple[str, int], Path] = {}
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked thread pools
    for wave in waves:
        slots = context.Queue()
        for slot in range(jobs):
            slots.put(slot)
        with concurrent.futures.ProcessPoolExecutor(min(jobs, len(wave)), mp_context=context,
                                                    initializer=_pretrain_worker_init,
                                                    initargs=(slots, gpus, jobs)) as pool:
            done = {f"{row}|{seed}": str(path) for (row, seed), path in made.items()}  # teachers, not redone
            futures = [pool.submit(_pretrain_job, {**spec, "made": done}, row, seed) for row, seed in wave]
            for future in futures:
                row, seed, path = future.result()
                made[(row, seed)] = checkpoints[(row, seed)] = Path(path)
    return made


def needs_teacher(mcfg: "C.Config") -> bool:
    return counts_teacher(mcfg)


def _pretrain_inputs(mcfg: "C.Config") -> dict:
    d = C.to_dict(mcfg)
    d.pop("eval", None)  # evaluation settings do not change what pretraining learns
    d["data"].pop("synth_root", None)  # where the data lives is not what it is (manifest hash below)
    for k in ("output_dir", "progress", "tensorboard", "log_with", "log_every", "save_every", "keep_checkpoints"):
        d["train"].pop(k, None)
    # how the steps were set is not what is learnt (train.steps is); the teacher is hashed itself
    for k in ("budget", "budget_method", "teacher_steps"):
        d["train"].pop(k, None)
    if not d["train"].get("compile"):  # eager runs keep the keys they had before the switch existed
        d["train"].pop("compile", None)
    # switches added for issue 17 enter a key only when set away from their default (eva,
    # flair), so the methods they do not touch keep their cached runs
    if d["model"].get("text_pooling") == "cls":
        d["model"].pop("text_pooling")
    if d["model"].get("text_dropout") == 0.1:
        d["model"].pop("text_dropout")
    if d["method"].get("text_init") == "random":
        d["method"].pop("text_init")
    revision = code_revision(mcfg.method)
    if revision is not None:  # a code change the config does not show (CoCa's CLS position): old runs retrain
        d["code_revision"] = revision
    return d


def pretrain_key(mcfg: "C.Config") -> tuple[str, dict]:
    """Key of a pretraining run: resolved config (minus bookkeeping) + data manifest + split."""
    name = mcfg.data.dataset
    ds = open_split(mcfg, name, "train", mcfg.model.img_size, mcfg.data.root or mcfg.data.synth_root)
    split_path = Path(mcfg.train.output_dir) / "inputs" / f"{Path(name).stem}-train.csv"
    split_sha = write_split_file(ds, split_path)
    teacher = mcfg.method.teacher_checkpoint
    inputs = {"config": _pretrain_inputs(mcfg), "manifest": manifest_hash(ds), "split": split_sha,
              "teacher": sha256_file(Path(teacher) / "model.safetensors") if teacher and
              (Path(teacher) / "model.safetensors").is_file() else None}
    if inputs["teacher"]:
        inputs["config"]["method"].pop("teacher_checkpoint", None)
    return sha256_json(inputs), {"split_file": str(split_path), "manifest": inputs["manifest"]}


def finished(run_dir: Path, key: str) -> bool:
    """``run_dir`` holds a finished checkpoint made from inputs with this ``key``."""
    saved = read_json(Path(run_dir) / KEY_FILE) or {}
    return saved.get("key") == key and bool(saved.get("complete")) and (Path(run_dir) / "checkpoint-last").exists()


def reference_key(name: str, mcfg: "C.Config") -> str:
    return sha256_json({"reference": name, "config": _pretrain_inputs(mcfg)})


def pretrain_cached(mcfg: "C.Config", force: bool = False, callbacks=()) -> Path:
    """Pretrain unless ``run_dir/cache_key.json`` says the same inputs already finished."""
    run_dir = train.run_dir_for(mcfg)
    key, info = pretrain_key(mcfg)
    saved = read_json(run_dir / KEY_FILE) or {}
    if not force and finished(run_dir, key):
        print(f"fundus_lab: {mcfg.method.name} seed {mcfg.train.seed}: pretraining unchanged, reusing {run_dir}")
        return run_dir
    resume = not force and saved.get("key") == key  # an interrupted run with the same inputs
    ours = bool(saved)  # our key file: the folder is this cache's, a run of other inputs is replaced
    write_json(run_dir / KEY_FILE, {"key": key, "complete": False, **info})
    start = time.time()
    run_dir = Path(train.pretrain(mcfg, callbacks=callbacks, resume=resume, replace_run=ours))
    write_json(run_dir / KEY_FILE, {"key": key, "complete": True, "seconds": time.time() - start, **info})
    return run_dir
