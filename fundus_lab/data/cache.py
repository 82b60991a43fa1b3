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

    cache = ImageCache.build(ds, cache_dir)       # or FundusDataset.enable_cache()
    row = cache.row(ds.records[i]); cache.image(row) -> uint8 [S, S, 3]
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from fundus_lab.data import images as img
from fundus_lab.data.images import DataError, ImageError

CACHE_VERSION = 1
SUFFIX = ".u8.npy"


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
        meta = _read_meta(meta_path)
        if path.is_file() and meta.get("key") == key and meta.get("ids") == ids:
            return cls(path, ids, np.asarray(meta["ok"], bool))
        folder.mkdir(parents=True, exist_ok=True)
        ok = _write(path, ds, records, fov, progress)
        meta = {"key": key, "version": CACHE_VERSION, "dataset": ds.manifest.name, "split": ds.split,
                "image_size": ds.image_size, "fov_crop": fov, "root": str(ds.root), "n": len(records),
                "unreadable": int((~ok).sum()), "ids": ids, "ok": ok.tolist()}
        _atomic_text(meta_path, json.dumps(meta))
        for old in stale_caches(folder, stem, path):        # stale versions of this split
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)
        return cls(path, ids, ok)


def cache_path(folder: Path, stem: str, key: str) -> Path:
    """``folder/<stem>-<key>.u8.npy``, refused (:class:`DataError`) unless the stem (dataset
    name, split, size) is one safe file name that stays inside ``folder``."""
    from fundus_lab.config import ConfigError, path_inside

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


def _write(path: Path, ds, records: Sequence, fov: bool, progress: bool) -> np.ndarray:
    """Decode every record into a temporary .npy, then rename it into place; returns the
    per-row ok flags (False: unreadable, left to the uncached path to report)."""
    s = ds.image_size
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    ok = np.ones(len(records), bool)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(records), s, s, 3))
        it = range(len(records))
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(it, desc=f"image cache {ds.manifest.name}/{ds.split}")
        for i in it:
            try:
                source = ds._source(records[i])
                rgb = img.as_rgb8(source) if isinstance(source, np.ndarray) else img.read_image(source, draft_size=2 * s)
                out[i] = img.prepare(rgb, s, fov_crop=fov)
            except ImageError:
                ok[i] = False
        out.flush()
        del out
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return ok


__all__ = ["CACHE_VERSION", "ImageCache", "cache_key", "default_cache_dir", "record_id", "DataError"]
