"""What an experiment writes to disk and how it names it: content hashes (the cache keys of
pretraining runs and evaluations) and atomic JSON files, plus the checkout the code runs
from. Every module of :mod:`fundus_lab.experiment` stores through these, so a cache key and
a record are made one way.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np

from fundus_lab.config import PACKAGE_ROOT

KEY_FILE = "cache_key.json"  # fundus_lab.train.RUN_BOOKKEEPING names it too


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, np.integer)):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else str(obj)
    return obj


def write_json(path: Path, data) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")  # processes of one launch may write the same file
    tmp.write_text(json.dumps(_jsonable(data), indent=1))
    tmp.replace(path)


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def project_root() -> Path:
    """The checkout holding ``pyproject.toml`` (editable install), else the working directory.

    Only to name the code that ran (``reproduce.git_commit``) and to find its recorded
    benchmarks; relative run and data folders resolve against the working directory
    (:func:`fundus_lab.config.resolve_path`), never against the checkout."""
    root = PACKAGE_ROOT.parent
    if (root / "pyproject.toml").is_file() and (root / "fundus_lab").is_dir():
        return root
    return Path.cwd()


def external_fingerprint(path: str | Path) -> str:
    """SHA-256 over the files an outside model is read from, by name and content: every file
    of its folder (hidden ones aside), or a weights file and the JSON configs beside it.
    A changed file changes the key, so its evaluations are redone."""
    path = Path(path)
    root = path if path.is_dir() else path.parent
    files = ([f for f in sorted(path.rglob("*")) if f.is_file() and not any(
        part.startswith(".") for part in f.relative_to(root).parts)] if path.is_dir()
        else [path, *sorted(f for f in root.glob("*.json") if f.is_file())])
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(root)}\0{sha256_file(f)}\0".encode())
    return h.hexdigest()
