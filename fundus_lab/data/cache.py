"""A pre-decoded image cache: every image of a dataset split, already FOV-cropped, squared
and resized, as one memory-mapped uint8 array ``[N, S, S, 3]``.

Decoding a PNG/JPEG and finding its field of view costs more than a small ViT's step
on a CPU; with the cache a training item is a slice of a file the OS keeps in memory,
then ``images.to_tensor`` and (training) ``images.augment`` as before, so cached and
uncached items are the same tensors.

The file name carries a key over everything that changes the pixels: the manifest (its
hash), the split, the image size, the FOV-crop setting, and each record's file (path,
size, modification time), so a regenerated dataset, another split or size never reads
a stale cache. A cache is written to a temporary file and renamed into place (atomic:
concurrent writers leave one complete file), with a JSON sidecar naming what it holds;
older caches of the same dataset/split/size are removed when a new one is written.

The sidecar also records the finished file's size and modification time: a cache file
truncated, overwritten (even at the same size) or with a damaged sidecar is rebuilt with
a warning instead of served. The file is written with ordinary writes into space
allocated up front, so a full disk is a :class:`CacheWriteError` (an ``OSError``) naming
the file and the bytes needed, with the temporary file removed; never a SIGBUS from a
memory map over a sparse file (issue 16, items 6 and 9).

    cache = ImageCache.build(ds, cache_dir)       # or FundusDataset.enable_cache()
    row = cache.row(ds.records[i]); cache.image(row) -> uint8 [S, S, 3]
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import re
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from fundus_lab.config import ConfigError
from fundus_lab.names import path_inside
from fundus_lab.data import images as img
from fundus_lab.data.images import DataError, ImageError

CACHE_VERSION = 1
SUFFIX = ".u8.npy"


class CacheWriteError(OSError, DataError):
    """The image cache could not be written (a full disk, a read-only folder); the message
    names the file and the bytes it needs. An ``OSError`` (with the errno) and a DataError."""


def record_id(rec) -> str:
    """A record's image: its path, plus the array index for images stored inside an npz."""
    return f"{rec.path}#{rec.meta['npz_index']}" if "npz_index" in rec.meta else str(rec.path)


def _stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, -1  # a missing file: its row is marked bad and the item raises as uncached


def manifest_digest(manifest) -> str:
    """sha256 of the manifest file (how the labels and images are read), else of its fields."""
    path = getattr(manifest, "path", None)
    if path is not None and Path(path).is_file():
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return hashlib.sha256(repr(manifest).encode()).hexdigest()


def cache_key(manifest, split: Optional[str], image_size: int, fov_crop: bool, records: Sequence) -> str:
    """Hex digest over everything that decides the cached pixels."""
    h = hashlib.sha256()
    head = {"version": CACHE_VERSION, "manifest": manifest_digest(manifest), "split": split,
            "image_size": int(image_size), "fov_crop": bool(fov_crop)}
    h.update(json.dumps(head, sort_keys=True).encode())
    for rec in records:
        size, mtime = _stat(rec.path)
        h.update(f"\n{record_id(rec)}|{size}|{mtime}".encode())
    return h.hexdigest()


def default_cache_dir(root: Union[str, Path]) -> Path:
    """``<dataset folder>/.cache/images`` when the folder is writable (the synthetic
    benchmark), else ``$FUNDUS_LAB_CACHE`` or ``~/.cache/fundus_lab/images``."""
    root = Path(root)
    if os.access(root, os.W_OK):
        return root / ".cache" / "images"
    return Path(os.environ.get("FUNDUS_LAB_CACHE", Path.home() / ".cache" / "fundus_lab")) / "images"


class ImageCache:
    """A read-only view of one cache file; opens its memory map lazily in each process
    (so a DataLoader worker maps the file instead of receiving a pickled copy)."""

    def __init__(self, path: Union[str, Path], ids: Sequence[str], ok: np.ndarray):
        self.path = Path(path)
        self.index = {r: i for i, r in enumerate(ids)}
        self.ok = np.asarray(ok, bool)
        self._array: Optional[np.ndarray] = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_array"] = None
        return state

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    def row(self, rec) -> Optional[int]:
        """Row of ``rec`` in the cache, or None when the image is not cached (unreadable)."""
        i = self.index.get(record_id(rec))
        return i if i is not None and self.ok[i] else None

    def image(self, row: int) -> np.ndarray:
        """uint8 [S, S, 3] of ``row`` (a copy: tensors must not alias the read-only map)."""
        return np.array(self.array[row])

    # -- building -------------------------------------------------------------------------
    @classmethod
    def build(cls, ds, cache_dir: Union[str, Path, None] = None, progress: bool = False) -> "ImageCache":
        """The cache of ``ds`` (a FundusDataset), written first if absent or stale."""
        fov = next((s.image.fov_crop for s in ds.manifest.sources), True)
        records = list(ds.records)
        key = cache_key(ds.manifest, ds.split, ds.image_size, fov, records)
        stem = f"{ds.manifest.name}-{ds.split or 'all'}-{ds.image_size}"
        folder = Path(cache_dir) if cache_dir is not None else default_cache_dir(ds.root)
        path = cache_path(folder, stem, key)
        meta_path = path.with_suffix(".json")
        ids = [record_id(r) for r in records]
        if path.is_file() or meta_path.is_file():
            damage = _damage(path, meta_path, key, ids, ds.image_size)
            if damage is None:
                return cls(path, ids, np.asarray(_read_meta(meta_path)["ok"], bool))
            warnings.warn(f"image cache {path}: {damage}; rebuilding it", UserWarning, stacklevel=3)
        folder.mkdir(parents=True, exist_ok=True)
        ok = _write(path, ds, records, fov, progress)
        st = path.stat()
        meta = {"key": key, "version": CACHE_VERSION, "dataset": ds.manifest.name, "split": ds.split,
                "image_size": ds.image_size, "fov_crop": fov, "root": str(ds.root), "n": len(records),
                "unreadable": int((~ok).sum()), "ids": ids, "ok": ok.tolist(),
                "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
        try:
            _atomic_text(meta_path, json.dumps(meta))
        except OSError as err:
            path.unlink(missing_ok=True)  # a cache without its sidecar would only be rebuilt
            raise _write_error(meta_path, len(json.dumps(meta)), err) from None
        for old in stale_caches(folder, stem, path):        # stale versions of this split
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)
        return cls(path, ids, ok)


def _damage(path: Path, meta_path: Path, key: str, ids: list, image_size: int) -> Optional[str]:
    """Why the cache at ``path`` cannot be served (None: it can): its sidecar missing or
    unreadable, or not matching the file on disk (size, modification time, header)."""
    if not meta_path.is_file():
        return f"its metadata {meta_path.name} is missing"
    meta = _read_meta(meta_path)
    if not meta:
        return f"its metadata {meta_path.name} is not a readable JSON object"
    if not path.is_file():
        return "the cache file is missing"
    ok = meta.get("ok")
    if meta.get("key") != key or meta.get("ids") != ids or not isinstance(ok, list) or len(ok) != len(ids):
        return f"its metadata {meta_path.name} does not describe this dataset split (damaged or shortened)"
    st = path.stat()
    if st.st_size != meta.get("bytes") or st.st_mtime_ns != meta.get("mtime_ns"):
        return (f"the file is {st.st_size} bytes modified at {st.st_mtime_ns} ns, its metadata recorded "
                f"{meta.get('bytes')} bytes at {meta.get('mtime_ns')} ns (truncated or overwritten)")
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        return f"the file cannot be read as .npy ({err})"
    if arr.dtype != np.uint8 or arr.shape != (len(ids), image_size, image_size, 3):
        return f"the file holds {arr.dtype} {arr.shape}, expected uint8 {(len(ids), image_size, image_size, 3)}"
    return None


def cache_path(folder: Path, stem: str, key: str) -> Path:
    """``folder/<stem>-<key>.u8.npy``, refused (:class:`DataError`) unless the stem (dataset
    name, split, size) is one safe file name that stays inside ``folder``."""
    try:
        return path_inside(folder, f"{stem}-{key[:20]}{SUFFIX}", "image cache file")
    except ConfigError as err:
        raise DataError(f"dataset {stem!r}: {err}") from None


def stale_caches(folder: Path, stem: str, keep: Path) -> list[Path]:
    """Older caches of one dataset/split/size: regular files directly in ``folder`` named
    exactly ``<stem>-<20 hex digits>.u8.npy`` (the stem taken literally, never as a glob),
    so the cleanup never deletes anything else, nor anything outside the cache folder."""
    pattern = re.compile(re.escape(stem) + r"-[0-9a-f]{20}" + re.escape(SUFFIX))
    root = folder.resolve()
    return [p for p in sorted(folder.iterdir())
            if p != keep and pattern.fullmatch(p.name) and p.is_file() and not p.is_symlink()
            and p.resolve().parent == root]


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
        return meta if isinstance(meta, dict) else {}
    except (OSError, ValueError):
        return {}


def _atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_error(path: Path, need: int, err: OSError) -> CacheWriteError:
    try:
        free = f"{shutil.disk_usage(path.parent).free} bytes are free there"
    except OSError:
        free = "the free space is unknown"
    full = err.errno in (errno.ENOSPC, errno.EDQUOT)
    return CacheWriteError(
        err.errno, f"cannot write the image cache {path}: {err.strerror or err} ({'the disk is full: ' if full else ''}"
        f"it needs {need} bytes, {need / 2**20:.1f} MiB; {free}); free some space or set data.image_cache_dir "
        "to a folder on another disk (or data.image_cache=false)", str(path))


def _write(path: Path, ds, records: Sequence, fov: bool, progress: bool) -> np.ndarray:
    """Decode every record into a temporary .npy, then rename it into place; returns the
    per-row ok flags (False: unreadable, left to the uncached path to report).

    The whole file is allocated first (``posix_fallocate``: a full disk fails here, before
    any decoding) and rows are written with ordinary writes, so a full disk raises
    :class:`CacheWriteError` instead of a SIGBUS, and the temporary file is removed."""
    s = ds.image_size
    shape = (len(records), s, s, 3)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    ok = np.ones(len(records), bool)
    need = len(records) * s * s * 3
    try:
        with os.fdopen(fd, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
            need += f.tell()
            _allocate(f.fileno(), need)
            it = range(len(records))
            if progress:
                from tqdm.auto import tqdm
                it = tqdm(it, desc=f"image cache {ds.manifest.name}/{ds.split}")
            blank = np.zeros((s, s, 3), np.uint8)
            for i in it:
                try:
                    source = ds._source(records[i])
                    rgb = img.as_rgb8(source, record_id(records[i])) if isinstance(source, np.ndarray) else img.read_image(source, draft_size=2 * s)
                    row = img.prepare(rgb, s, fov_crop=fov)
                except ImageError:
                    ok[i], row = False, blank
                f.write(np.ascontiguousarray(row, np.uint8).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise _write_error(path, need, err) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return ok


def _allocate(fd: int, size: int) -> None:
    """Reserve ``size`` bytes for the file on disk, so a full disk fails at once (ENOSPC).
    Filesystems without ``posix_fallocate`` are left to the ordinary writes that follow."""
    if not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return
        raise


__all__ = ["CACHE_VERSION", "CacheWriteError", "ImageCache", "cache_key", "default_cache_dir", "record_id", "DataError"]
