"""Issue 10, items 2 and 3: an interrupted regeneration never leaves a folder that mixes two
seeds and still passes as up to date (a two-process test: the generator is SIGKILLed
mid-write), and manifest.yaml is rewritten only when it changes, atomically."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fundus_lab.data.synth import generate
from fundus_lab.data.synth import writer as W

REPO = Path(__file__).resolve().parent.parent
N, SIZE = 120, 64


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file the dataset consists of (labels, images, masks, manifest; not the timing)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != "synth.json":
            out[p.relative_to(folder).as_posix()] = p.read_bytes()
    return out


def test_killed_regeneration_never_mixes_seeds(tmp_path):
    ref = tmp_path / "ref"
    generate(ref, "pretrain", n=N, seed=0, image_size=SIZE, workers=1)
    target = tmp_path / "D"
    generate(target, "pretrain", n=N, seed=0, image_size=SIZE, workers=1)
    assert snapshot(target) == snapshot(ref)

    start = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from fundus_lab.data.synth import generate; "
         f"generate(sys.argv[1], 'pretrain', n={N}, seed=1, image_size={SIZE}, workers=1, overwrite=True)", str(target)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    try:  # kill it once it has written some seed-1 images, wherever it writes them
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            fresh = [p for p in tmp_path.rglob("*.png") if p.stat().st_mtime >= start and "ref" not in p.parts]
            if len(fresh) >= 10:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the generator finished before it could be killed; raise N"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    # the folder the killed run left is still the complete seed-0 dataset ...
    assert snapshot(target) == snapshot(ref)
    # ... and asking for seed 0 again keeps it, without any seed-1 image
    generate(target, "pretrain", n=N, seed=0, image_size=SIZE, workers=1)
    assert snapshot(target) == snapshot(ref)
    assert not list(tmp_path.glob(".D.tmp-*"))  # the killed run's temp folder is gone


def test_manifest_is_rewritten_only_when_it_changes_and_atomically(tmp_path, monkeypatch):
    out = tmp_path / "D"
    manifest = generate(out, "pretrain", n=4, seed=0, image_size=32, workers=1)
    before = manifest.stat()
    time.sleep(0.02)
    generate(out, "pretrain", n=4, seed=0, image_size=32, workers=1)
    after = manifest.stat()
    assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)  # untouched

    changed = tmp_path / "synth-pretrain.yaml"
    changed.write_bytes(W.manifest_template("pretrain").read_bytes() + b"\n# a new comment\n")
    monkeypatch.setattr(W, "manifest_template", lambda task: changed)
    generate(out, "pretrain", n=4, seed=0, image_size=32, workers=1)
    assert manifest.read_bytes() == changed.read_bytes()
    assert manifest.stat().st_ino != before.st_ino  # a new file renamed over the old: no half-written reads
