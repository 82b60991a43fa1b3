"""Issue 16, items 6 and 9 (caches): a full disk and a damaged image cache.

A full disk while the image cache is built used to kill the process with SIGBUS (a page
fault in a memory map over a sparse file) and leave the temp file behind; it is now a
CacheWriteError (an OSError and a DataError) naming the file and the bytes needed, with
no temp file left. A checkpoint save on a full disk is a CheckpointError saying the disk
is full, the previous checkpoint intact. A cache file truncated or overwritten (even at
the same size), or its metadata shortened or gone, is rebuilt with a warning.

The real-disk tests mount a 1.4 MB tmpfs and skip where mounting is not permitted.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fundus_lab import checkpoint as ckpt
from fundus_lab.data import cache as C
from fundus_lab.data import open_dataset, synth
from fundus_lab.data.images import DataError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds")
    return synth.generate(out / "synth-fives", "fives", n=8, seed=5, image_size=64, workers=1)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1.4 MB tmpfs at ``tmp_path/disk`` (root only; skipped elsewhere)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1400k", "tmpfs", str(disk)],
                                 capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        mounted = False
    if not mounted:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True, timeout=30)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_full_disk_at_allocation_is_a_cache_write_error_without_temp_file(manifest, tmp_path, monkeypatch):
    def no_space(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(C.CacheWriteError, match=r"cannot write the image cache .*synth-fives-all-300-.*\.u8\.npy: No space "
                       r"left on device \(the disk is full: it needs 216\d{4} bytes, 2\.1 MiB") as info:
        open_dataset(manifest, split=None, image_size=300, image_cache=True, image_cache_dir=tmp_path / "c")
    assert isinstance(info.value, OSError) and isinstance(info.value, DataError) and info.value.errno == errno.ENOSPC
    assert _leftovers(tmp_path / "c") == []


class _FullAfter:
    """A file whose disk fills after ``limit`` bytes: ``write`` raises ENOSPC, as a real one does."""

    def __init__(self, f, limit: int):
        self.f, self.left = f, limit

    def write(self, data) -> int:
        if len(data) > self.left:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.left -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_full_disk_during_ordinary_writes_is_a_cache_write_error_without_temp_file(manifest, tmp_path, monkeypatch):
    real_fdopen = os.fdopen
    monkeypatch.delattr(os, "posix_fallocate")  # a filesystem without it: the writes must fail cleanly
    monkeypatch.setattr(os, "fdopen", lambda fd, mode="r", *a, **k: _FullAfter(real_fdopen(fd, mode, *a, **k), 700_000)
                        if mode == "wb" else real_fdopen(fd, mode, *a, **k))
    with pytest.raises(C.CacheWriteError, match=r"synth-fives-all-300-.*\.u8\.npy: No space left on device \(the disk "
                       r"is full: it needs 216\d{4} bytes"):
        open_dataset(manifest, split=None, image_size=300, image_cache=True, image_cache_dir=tmp_path / "c")
    assert _leftovers(tmp_path / "c") == []


PROBE = textwrap.dedent("""
    import os, sys
    if sys.argv[3] == "no-fallocate":
        del os.posix_fallocate  # the ordinary writes must fail cleanly on their own
    from fundus_lab.data import open_dataset
    from fundus_lab.data.cache import CacheWriteError
    try:
        open_dataset(sys.argv[1], split=None, image_size=300, image_cache=True, image_cache_dir=sys.argv[2])
    except CacheWriteError as err:
        print("CacheWriteError", err.errno, err)
        sys.exit(3)
""")


@pytest.mark.parametrize("how", ["fallocate", "no-fallocate"])
def test_real_full_disk_never_sigbus_and_leaves_no_temp_file(manifest, tiny_disk, how):
    run = subprocess.run([sys.executable, "-c", PROBE, str(manifest), str(tiny_disk), how], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert run.returncode == 3, (run.returncode, run.stdout, run.stderr)  # was -7 (SIGBUS), exit 135 in a shell
    assert f"CacheWriteError {errno.ENOSPC} " in run.stdout and "the disk is full: it needs 216" in run.stdout
    assert str(tiny_disk) in run.stdout
    assert _leftovers(tiny_disk) == []


def _save(run_dir: Path, step: int, n: int) -> Path:
    weights = torch.nn.Parameter(torch.ones(n))
    opt = torch.optim.Adam([weights])
    weights.grad = torch.ones(n)
    opt.step()
    return ckpt.save_checkpoint(run_dir, step, save_model=lambda d: (d / "model.json").write_text("{}"),
                                optimizer=opt, trainer_state={"step": step})


def test_checkpoint_on_a_real_full_disk_is_a_checkpoint_error_old_one_intact(tiny_disk):
    first = _save(tiny_disk, 1, 1000)
    files = {p.name: p.read_bytes() for p in first.iterdir()}
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint-2: cannot save the checkpoint, the disk is full .*"
                       r"bytes are free .*previous checkpoint \(checkpoint-last\) is intact"):
        _save(tiny_disk, 2, 400_000)  # Adam's two moments: 3.2 MB on a 1.4 MB disk
    assert ckpt.last_checkpoint(tiny_disk).name == "checkpoint-1"
    assert {p.name: p.read_bytes() for p in first.iterdir()} == files
    assert _leftovers(tiny_disk) == ["checkpoint-1", "checkpoint-last"]
    assert ckpt.load_checkpoint(first)["step"] == 1


def test_checkpoint_disk_full_inside_safetensors_is_named(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    first = _save(tmp_path, 1, 10)

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(ckpt.CheckpointError, match=r"the disk is full \(SafetensorError"):
        _save(tmp_path, 2, 10)
    assert ckpt.last_checkpoint(tmp_path) == first and not list(tmp_path.glob(".tmp-*"))


# -- item 9: a damaged image cache is rebuilt with a warning ------------------------------


def _cache_files(folder: Path) -> tuple[Path, Path]:
    [npy] = folder.glob(f"*{C.SUFFIX}")
    return npy, npy.with_suffix(".json")


def _truncate(npy: Path, meta: Path) -> None:
    data = npy.read_bytes()
    npy.write_bytes(data[: len(data) // 2])


def _same_size_white(npy: Path, meta: Path) -> None:
    with open(npy, "r+b") as f:  # the header kept, every pixel 255, the size unchanged
        f.seek(128)
        f.write(b"\xff" * (npy.stat().st_size - 128))


def _shorten_meta(npy: Path, meta: Path) -> None:
    m = json.loads(meta.read_text())
    m["ok"] = m["ok"][:-1]
    meta.write_text(json.dumps(m))


def _cut_meta(npy: Path, meta: Path) -> None:
    meta.write_text(meta.read_text()[:40])


DAMAGE = {
    "cache file truncated": (_truncate, r"truncated or overwritten"),
    "cache file overwritten at the same size": (_same_size_white, r"truncated or overwritten"),
    "cache metadata shortened": (_shorten_meta, r"does not describe this dataset split"),
    "cache metadata cut mid-JSON": (_cut_meta, r"not a readable JSON object"),
    "cache metadata deleted": (lambda npy, meta: meta.unlink(), r"metadata .* is missing"),
}


@pytest.mark.parametrize("kind", list(DAMAGE), ids=list(DAMAGE))
def test_damaged_image_cache_is_rebuilt_with_a_warning(manifest, tmp_path, kind):
    damage, why = DAMAGE[kind]
    plain = open_dataset(manifest, split=None, image_size=32)
    open_dataset(manifest, split=None, image_size=32, image_cache=True, image_cache_dir=tmp_path)
    npy, meta = _cache_files(tmp_path)
    damage(npy, meta)
    with pytest.warns(UserWarning, match=rf"image cache .*\.u8\.npy: .*{why}.*; rebuilding it"):
        cached = open_dataset(manifest, split=None, image_size=32, image_cache=True, image_cache_dir=tmp_path)
    for i in range(len(plain)):  # the pixels served are the decoded ones, never white or stale
        assert cached.image_cache.row(cached.records[i]) is not None
        assert torch.equal(cached[i]["image"], plain[i]["image"])
    assert _leftovers(tmp_path) == sorted(p.name for p in _cache_files(tmp_path))
