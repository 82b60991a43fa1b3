"""Write a synthetic dataset folder: images, lesion masks, labels.csv and the manifest.

Layout (the contract DATA reads)::

    out_dir/manifest.yaml          copy of data_manifests/synth-<task>.yaml
    out_dir/labels.csv             one row per image, header LABEL_COLUMNS
    out_dir/images/<image_id>.png  RGB, image_size square
    out_dir/masks/<image_id>.npz   one bool [S, S] array per lesion key present
    out_dir/synth.json             the generation parameters (provenance, reuse)

Image i of a task is patient i // 2, right eye for even i, left for odd. Its pixels and
report come from ``SeedSequence([seed, task_id, i])`` only, so the output is
byte-identical whatever the number of workers; the patient (age, camera, split, both
eyes' labels) comes from ``SeedSequence([seed, task_id, patient, PATIENT_TAG])``, which
both eyes recompute identically.
"""

from __future__ import annotations

import contextlib
import csv
import json
import multiprocessing as mp
import os
import shutil
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
from PIL import Image

from fundus_lab.checkpoint import replace_dir
from fundus_lab.config import PACKAGE_ROOT

from .cameras import CAMERAS, HELD_OUT, TRAIN_CAMERAS
from .labels import ODIR_CODES, TASK_IDS, TASKS, sample_patient
from .render import calibration, render_eye
from .reports import definition_text, short_text, write_report

LABEL_COLUMNS = ("image_id", "image", "mask", "patient_id", "eye", "age", "camera", "split",
                 *ODIR_CODES, "dr_grade", "dme", "cdr", "fives_class", "text", "short_text", "definition_text",
                 "unseen_class")
DATASET_NAMES = {t: f"synth-{t}" for t in TASKS}
PATIENT_TAG = 0x50415431          # "PAT1": keeps patient streams apart from image streams
FORMAT_VERSION = 3  # 2: splits by patient slot (index*3 mod 7); 3: + in-domain test, test_camera, calibration


def manifest_template(task: str) -> Path:
    """The shipped ``data_manifests/synth-<task>.yaml`` (package data, found in any install)."""
    return PACKAGE_ROOT / "data_manifests" / f"{DATASET_NAMES[task]}.yaml"


def _check(task: str, cameras: Optional[Sequence[str]]) -> list[str]:
    if task not in TASKS:
        raise ValueError(f"synth.generate: task must be one of {list(TASKS)}, got {task!r}")
    if cameras is None:
        return list(TRAIN_CAMERAS) if task == "pretrain" else list(CAMERAS)
    cams = list(cameras)
    bad = [c for c in cams if c not in CAMERAS]
    if bad or not cams:
        raise ValueError(f"synth.generate: cameras must be a non-empty list from {sorted(CAMERAS)}, got {cams!r}")
    return cams


def sample_one(task: str, i: int, seed: int, cameras: Sequence[str], image_size: int, **calib):
    """Render image ``i`` of ``task``: (row dict without paths, image, masks).

    ``calib``: lesion_scale, lesion_contrast, camera_shift (``render.calibration``)."""
    tid = TASK_IDS[task]
    p = i // 2
    eye = "right" if i % 2 == 0 else "left"
    held = HELD_OUT if HELD_OUT in cameras else None
    patient = sample_patient(np.random.default_rng(np.random.SeedSequence([seed, tid, p, PATIENT_TAG])),
                             task, p, list(cameras), held)
    lab = patient.eyes[eye]
    r_img, r_txt = (np.random.default_rng(s) for s in np.random.SeedSequence([seed, tid, i]).spawn(2))
    out = render_eye(r_img, lab, patient.camera, image_size, eye, **calibration(**calib))
    codes = lab.odir()
    row = {
        "image_id": f"{patient.patient_id}-{'R' if eye == 'right' else 'L'}",
        "patient_id": patient.patient_id, "eye": eye, "age": patient.age, "camera": patient.camera,
        "split": patient.split, **codes, "dr_grade": lab.dr_grade, "dme": lab.dme, "cdr": lab.cdr,
        "fives_class": lab.fives_class(), "unseen_class": lab.unseen_class(),
        "text": write_report(r_txt, lab, out.findings, out.anatomy, eye),
        "short_text": short_text(lab), "definition_text": definition_text(lab),
    }
    return row, out.image, out.masks


def _work(args):
    """Worker: render one image and write its PNG and mask file; return the CSV row."""
    out_dir, task, i, seed, cameras, image_size, calib = args
    row, image, masks = sample_one(task, i, seed, cameras, image_size, **calib)
    img_rel = f"images/{row['image_id']}.png"
    mask_rel = f"masks/{row['image_id']}.npz"
    Image.fromarray(image).save(Path(out_dir) / img_rel, compress_level=4)
    np.savez_compressed(Path(out_dir) / mask_rel, **masks)
    row["image"], row["mask"] = img_rel, mask_rel
    return i, row


def _pool_context():
    """``fork`` where the OS has it (Linux): workers inherit the loaded modules and never
    re-run the caller's script, so a script without an ``if __name__ == "__main__":`` guard
    (the README example pasted into a file) works instead of every worker re-running it.
    The workers only use numpy, scipy and PIL (no torch, no threads of their own), which
    is what makes forking safe here. Elsewhere (macOS, Windows) ``spawn``, which needs the guard."""
    import sys

    method = "fork" if sys.platform.startswith("linux") else "spawn"
    return mp.get_context(method)


def _run(jobs: list, workers: int) -> Iterator:
    """Yield (index, row) as images finish, in any order; rows are sorted later."""
    if workers <= 1 or len(jobs) <= 1:
        yield from map(_work, jobs)
        return
    with _pool_context().Pool(workers) as pool:
        yield from pool.imap_unordered(_work, jobs, chunksize=max(1, min(16, len(jobs) // (8 * workers))))


def write_dataset(out_dir, task: str = "pretrain", n: int = 1000, seed: int = 0,
                  cameras: Optional[Sequence[str]] = None, image_size: int = 224,
                  workers: Optional[int] = None, progress: bool = False, **calib) -> Path:
    """Render ``n`` images of ``task`` into ``out_dir``; return the labels.csv path.

    Everything but the manifest copy (see ``generate``).
    """
    cams = _check(task, cameras)
    calib = calibration(**calib)
    if n < 1:
        raise ValueError(f"synth.generate: n must be >= 1, got {n}")
    if image_size < 32:
        raise ValueError(f"synth.generate: image_size must be >= 32, got {image_size}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    workers = (os.cpu_count() or 1) if workers is None else int(workers)
    jobs = [(str(out), task, i, int(seed), cams, int(image_size), calib) for i in range(n)]
    t0 = time.time()
    results = _run(jobs, min(workers, n))
    if progress:
        from tqdm.auto import tqdm
        results = tqdm(results, total=n, desc=f"synth-{task}")
    rows = dict(results)
    labels = out / "labels.csv"
    tmp = labels.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=LABEL_COLUMNS)
        w.writeheader()
        for i in range(n):
            w.writerow(rows[i])
    os.replace(tmp, labels)
    info = {"task": task, "n": n, "seed": int(seed), "cameras": cams, "image_size": int(image_size),
            "held_out_camera": HELD_OUT if HELD_OUT in cams else None, "format_version": FORMAT_VERSION, **calib,
            "seconds": round(time.time() - t0, 2)}
    (out / "synth.json").write_text(json.dumps(info, indent=2))
    return labels


class SynthSettingsError(ValueError):
    """A folder that already holds a dataset generated with other settings (or one that is
    not a synthetic dataset at all): refused rather than re-rendered under its users."""


def _wanted(task, n, seed, cams, image_size, calib) -> dict:
    return {"task": task, "n": n, "seed": int(seed), "cameras": cams, "image_size": int(image_size),
            "format_version": FORMAT_VERSION, **calib}


def _up_to_date(out: Path, task, n, seed, cams, image_size, calib) -> bool:
    try:
        info = json.loads((out / "synth.json").read_text())
    except (OSError, ValueError):
        return False
    want = _wanted(task, n, seed, cams, image_size, calib)
    return isinstance(info, dict) and all(info.get(k) == v for k, v in want.items()) and (out / "labels.csv").exists()


def _refuse_other_settings(out: Path, task, n, seed, cams, image_size, calib) -> None:
    """Raise :class:`SynthSettingsError` when ``out`` holds anything but the dataset asked for
    (issue 16, item 3): an open dataset must never change content under its user. An absent or
    empty folder, or one whose synth.json records these settings, passes."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    what_to_do = ("generate into another folder (data.synth_root=<folder> in a config), ask for the settings "
                  "on disk, or delete the folder (or pass overwrite=True) to re-render it")
    try:
        info = json.loads((out / "synth.json").read_text())
    except (OSError, ValueError):
        info = None
    if not isinstance(info, dict):
        raise SynthSettingsError(
            f"{out} is not empty and has no readable synth.json, so it is not a synthetic dataset this "
            f"generator wrote; refusing to replace it: {what_to_do}")
    want = _wanted(task, n, seed, cams, image_size, calib)
    differ = [f"{k} {info.get(k)!r} on disk, {v!r} asked" for k, v in want.items() if info.get(k) != v]
    if differ:
        raise SynthSettingsError(
            f"{out} holds a synthetic dataset generated with other settings ({'; '.join(differ)}); refusing "
            f"to overwrite it: {what_to_do}")


def _write_if_changed(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` atomically (temp file + rename) unless it already holds it:
    a reader never sees a half-written file, and an up-to-date folder is not touched."""
    try:
        if path.read_bytes() == data:
            return False
    except OSError:
        pass
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return True


@contextlib.contextmanager
def _generation_lock(out: Path):
    """An OS lock beside ``out`` (``.<name>.lock``): concurrent generators of one folder take
    turns, and the second then finds the folder up to date. Dies with the process."""
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove_leftovers(out: Path) -> None:
    """Temp and swapped-out folders of generators that were killed (we hold the lock)."""
    for pattern in (f".{out.name}.tmp-*", f".trash-{out.name}-*"):  # the latter: checkpoint.replace_dir
        for path in out.parent.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)


def generate(out_dir, task: str = "pretrain", n: int = 1000, seed: int = 0,
             cameras: Optional[Sequence[str]] = None, image_size: int = 224,
             workers: Optional[int] = None, overwrite: bool = False, progress: bool = False, **calib) -> Path:
    """Write a synthetic ``task`` dataset (pretrain | odir | fives | aptos | unseen) to ``out_dir``.

    Args:
        n: number of images (patients = ceil(n / 2), both eyes).
        cameras: camera profile names; default: the training cameras for pretrain, all
            profiles (the held-out one becomes the test split) for the other tasks.
        workers: processes (default ``os.cpu_count()``); the output does not depend on it.
        overwrite: re-render even if ``out_dir`` already holds this exact dataset, or one
            generated with other settings. Without it a folder holding another dataset (its
            synth.json records other settings, or it is not a synthetic dataset) is refused
            with :class:`SynthSettingsError` naming the settings that differ.
        **calib: ``lesion_scale``, ``lesion_contrast``, ``camera_shift`` (default 1.0, the
            realistic benchmark; a low-resolution budget raises the first two).

    Returns:
        The path of ``out_dir/manifest.yaml`` (a copy of ``data_manifests/synth-<task>.yaml``).
    """
    cams = _check(task, cameras)
    calib = calibration(**calib)
    template = manifest_template(task)
    if not template.is_file():
        raise FileNotFoundError(f"synth.generate: manifest template {template} is missing "
                                f"(expected fundus_lab/data_manifests/{DATASET_NAMES[task]}.yaml in the package)")
    out = Path(out_dir)
    full = Path(os.path.abspath(out))  # "." or "data/" still name a folder with a parent
    with _generation_lock(full):
        _remove_leftovers(full)
        if not overwrite:
            _refuse_other_settings(full, task, n, seed, cams, image_size, calib)
        if overwrite or not _up_to_date(out, task, n, seed, cams, image_size, calib):
            # render into a temp folder beside out_dir and rename it into place: a killed run
            # leaves out_dir as it was (complete, matching its synth.json) or absent, never mixed
            tmp = full.with_name(f".{full.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            write_dataset(tmp, task, n, seed, cams, image_size, workers, progress, **calib)
            shutil.copyfile(template, tmp / "manifest.yaml")
            replace_dir(tmp, full)  # the old folder is swapped out, then deleted
        manifest = out / "manifest.yaml"
        _write_if_changed(manifest, template.read_bytes())
    return manifest


def generate_benchmark(root, n_pretrain: int = 2000, n_eval: int = 600, seed: int = 0,
                       image_size: int = 224, workers: Optional[int] = None,
                       overwrite: bool = False, progress: bool = False, **calib) -> dict[str, Path]:
    """Every synthetic dataset (TASKS) under ``root/synth-<task>/``; returns {task: manifest path}.

    The unseen-disease set is only scored zero-shot (its test splits), so it has half ``n_eval``.
    A folder of ``root`` that holds a dataset generated with other settings is refused
    (:class:`SynthSettingsError`) before anything is written, unless ``overwrite``."""
    sizes = {"pretrain": n_pretrain, "odir": n_eval, "fives": n_eval, "aptos": n_eval,
             "unseen": max(1, n_eval // 2)}
    if not overwrite:  # every folder checked before any is written: all or none
        for t, n in sizes.items():
            out = Path(os.path.abspath(Path(root) / DATASET_NAMES[t]))
            _refuse_other_settings(out, t, n, seed, _check(t, None), image_size, calibration(**calib))
    return {t: generate(Path(root) / DATASET_NAMES[t], t, n, seed, None, image_size, workers, overwrite, progress, **calib)
            for t, n in sizes.items()}
