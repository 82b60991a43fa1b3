"""Frozen image features for probes and zero-shot, extracted once per (model, dataset).

Every protocol that keeps the encoder frozen (zero-shot, few-shot over 5 seeds x 5 shot
counts, linear probe) reads the same features; extracting them is the expensive part, so
they are cached: in memory by a fingerprint of the weights and the dataset, and on disk
under ``cache_dir`` when one is given (keyed by the same fingerprints, so a changed
checkpoint or split never reuses stale features).

Launched with several processes (``accelerate launch`` / ``torchrun``), extraction is
sharded: each rank encodes one contiguous block of the dataset and the blocks are gathered
(padded to one length, then trimmed) so every rank holds all features in dataset order,
the same array one process computes. One process never touches torch.distributed.
"""

from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from fundus_lab.models.conventions import model_image_size

FEATURE_KINDS = ("embed", "cls")
_MEMORY: "OrderedDict[str, tuple[np.ndarray, np.ndarray]]" = OrderedDict()
_MEMORY_SIZE = 16


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-1 over every parameter and buffer (names, shapes, values): equal iff same weights."""
    h = hashlib.sha1()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def dataset_fingerprint(ds) -> str:
    """Hash of what a dataset yields: its sample paths, labels, split and image size."""
    h = hashlib.sha1()
    h.update(type(ds).__name__.encode())
    for attr in ("root", "split", "image_size", "augment"):
        h.update(f"{attr}={getattr(ds, attr, None)}".encode())
    records = getattr(ds, "records", None)
    if records is None:
        h.update(f"id={id(ds)}".encode())  # an unknown dataset type: cache per object only
    else:
        for r in records:
            h.update(f"{r.path}|{r.label}".encode())
    h.update(f"n={len(ds)}".encode())
    return h.hexdigest()


def _image_label_collate(items: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([it["image"] for it in items])
    labels = torch.stack([torch.as_tensor(it["label"]) for it in items])
    return images, labels


def fit_to_model(model, images: torch.Tensor) -> torch.Tensor:
    """Resize ``[N, 3, H, W]`` images to the model's working size (bilinear, antialiased).

    A dataset opened at another size than the model was trained at (``open_dataset``'s
    default 224 px against a 128 px model) is then evaluated like open_clip's preprocessing
    would, instead of failing in the patch embedding."""
    if callable(getattr(model, "preprocess", None)):
        return images               # outside models resize and crop in their own preprocessing
    size = model_image_size(model)
    if size is None or tuple(images.shape[-2:]) == (size, size):
        return images
    return torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear",
                                           antialias=True, align_corners=False).clamp_(0, 1)


@torch.no_grad()
def encode_images(model, images: torch.Tensor, kind: str = "embed") -> torch.Tensor:
    """[N, 3, H, W] -> [N, D]: ``embed`` = model.encode_image (projected, L2-normalised,
    the space text lives in), ``cls`` = the ViT's class token before any projection."""
    images = fit_to_model(model, images)
    if kind == "embed":
        return model.encode_image(images)
    if kind == "cls":
        return model.image_features(images, mask_ratio=0.0)["cls"]
    raise ValueError(f"feature kind {kind!r}; expected one of {FEATURE_KINDS}")


def process_group() -> tuple[int, int]:
    """(rank, world size) of this evaluation: an initialised process group (the trainer's
    Accelerator), else accelerate's state when a launcher started several processes
    (``WORLD_SIZE`` > 1), else (0, 1) without importing torch.distributed's machinery."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env

        # initialises the process group the launcher describes (gloo on CPUs, as AcceleratorState does)
        state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
        return state.process_index, state.num_processes
    return 0, 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): where progress bars and prints belong."""
    return process_group()[0] == 0


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of ``rank``'s contiguous block of ``n`` samples: blocks of ceil(n / world),
    the last ones shorter (or empty) so that the blocks in rank order are the dataset in order."""
    per = -(-n // world)
    return min(n, rank * per), min(n, (rank + 1) * per)


def _gather_rows(local: np.ndarray, n_total: int, world: int, device: torch.device) -> np.ndarray:
    """Every rank's ``local`` rows (contiguous blocks, in rank order) on every rank: padded to
    the longest block for ``all_gather``, then trimmed back to ``n_total`` rows."""
    import torch.distributed as dist

    per = -(-n_total // world)
    t = torch.as_tensor(local).to(device)
    padded = torch.zeros((per, *t.shape[1:]), dtype=t.dtype, device=device)
    padded[: len(t)] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    rows = [p[: max(0, min(per, n_total - r * per))] for r, p in enumerate(parts)]
    return torch.cat(rows).cpu().numpy()


@torch.no_grad()
def _encode_all(model, ds, kind: str, batch_size: int, num_workers: int, progress: bool,
                desc: str) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of ``ds`` in order, one batch at a time (rank-local)."""
    from tqdm.auto import tqdm

    device = model_device(model)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_image_label_collate)
    feats, labels = [], []
    for images, y in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
        feats.append(encode_images(model, images.to(device), kind).float().cpu().numpy())
        labels.append(y.numpy())
    return np.concatenate(feats).astype(np.float32), np.concatenate(labels)


@torch.no_grad()
def extract_features(
    model,
    ds,
    kind: str = "embed",
    batch_size: int = 64,
    num_workers: int = 0,
    cache: bool = True,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Image features and labels of every sample of ``ds``, in dataset order.

    Returns:
        features: float32 [N, D]; labels: int64 [N] (or float32 [N, C] multi-hot).
    The model runs in eval mode without gradients and is put back in its previous mode.
    Under several processes each rank encodes its shard and every rank gets the whole
    array (see the module docstring). ``progress``: a per-batch bar on the main process.
    """
    if kind not in FEATURE_KINDS:
        raise ValueError(f"feature kind {kind!r}; expected one of {FEATURE_KINDS}")
    if len(ds) == 0:
        raise ValueError(f"dataset {getattr(ds, 'root', ds)!r} (split {getattr(ds, 'split', '?')}) is empty")
    key = None
    if cache:
        key = hashlib.sha1(f"{model_fingerprint(model)}|{dataset_fingerprint(ds)}|{kind}".encode()).hexdigest()
        if key in _MEMORY:
            _MEMORY.move_to_end(key)
            feats, labels = _MEMORY[key]
            return feats.copy(), labels.copy()
        if cache_dir is not None:
            path = Path(cache_dir) / f"features-{key[:20]}.npz"
            cached = _read_cached(path, len(ds)) if path.is_file() else None
            if cached is not None:
                feats, labels = cached
                _remember(key, feats, labels)
                return feats.copy(), labels.copy()

    rank, world = process_group()
    desc = f"features {getattr(ds, 'split', None) or type(ds).__name__}"
    was_training = model.training
    model.eval()
    try:
        if world == 1:
            feats, labels = _encode_all(model, ds, kind, batch_size, num_workers, progress, desc)
        else:
            feats, labels = _extract_sharded(model, ds, kind, batch_size, num_workers, progress and rank == 0,
                                             desc, rank, world)
    finally:
        model.train(was_training)
    labels = labels.astype(np.float32) if labels.ndim == 2 else labels.astype(np.int64)

    if key is not None:
        _remember(key, feats, labels)
        if cache_dir is not None and rank == 0:  # every rank holds the same array; one writes it
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            tmp = Path(cache_dir) / f"features-{key[:20]}.tmp.npz"
            np.savez(tmp, features=feats, labels=labels)
            tmp.replace(Path(cache_dir) / f"features-{key[:20]}.npz")
    return feats.copy(), labels.copy()


def _read_cached(path: Path, n: int):
    """(features, labels) of a feature-cache file, or None after a warning when the file is
    damaged (truncated, not an npz, arrays missing or of the wrong length): it is recomputed
    and rewritten, never a raw BadZipFile."""
    try:
        with np.load(path, allow_pickle=False) as z:
            feats, labels = np.asarray(z["features"]), np.asarray(z["labels"])
        if feats.ndim != 2 or len(feats) != n or len(labels) != n:
            raise ValueError(f"holds {feats.shape} features and {len(labels)} labels for {n} images")
        return feats, labels
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        warnings.warn(f"feature cache {path} is damaged ({type(err).__name__}: {err}); recomputing it",
                      UserWarning, stacklevel=3)
        return None


def _extract_sharded(model, ds, kind, batch_size, num_workers, progress, desc, rank, world):
    """This rank's contiguous block encoded, then all blocks gathered in rank (= dataset) order.

    A rank whose block is empty (fewer samples than ranks) encodes nothing but still joins
    the gathers; the feature width and label shape come from the ranks that encoded."""
    import torch.distributed as dist

    n = len(ds)
    start, stop = shard_bounds(n, rank, world)
    device = model_device(model) if dist.get_backend() == "nccl" else torch.device("cpu")
    feats = labels = None
    if stop > start:
        feats, labels = _encode_all(model, Subset(ds, range(start, stop)), kind, batch_size, num_workers,
                                    progress, f"{desc} [rank {rank}: {start}-{stop}]")
    # shapes of the first non-empty block: width, label columns (0 = class indices)
    shape = torch.tensor([feats.shape[1], labels.shape[1] if labels.ndim == 2 else 0] if feats is not None
                         else [-1, -1], device=device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    width, label_cols = next(s.tolist() for s in shapes if s[0] >= 0)
    if feats is None:
        feats = np.zeros((0, width), np.float32)
        labels = np.zeros((0, label_cols), np.float32) if label_cols else np.zeros(0, np.int64)
    labels = labels.astype(np.float32) if labels.ndim == 2 else labels.astype(np.int64)
    return _gather_rows(feats, n, world, device), _gather_rows(labels, n, world, device)


def _remember(key: str, feats: np.ndarray, labels: np.ndarray) -> None:
    _MEMORY[key] = (feats, labels)
    while len(_MEMORY) > _MEMORY_SIZE:
        _MEMORY.popitem(last=False)


def clear_cache() -> None:
    """Forget in-memory features (e.g. between tests)."""
    _MEMORY.clear()


def dataset_labels(ds) -> np.ndarray:
    """Labels without reading images: from ``ds.records`` (int [N] or multi-hot [N, C])."""
    records = getattr(ds, "records", None)
    if records is None:
        raise TypeError(f"{type(ds).__name__} has no .records; cannot read labels without images")
    labels = [r.label for r in records]
    if labels and isinstance(labels[0], (list, tuple, np.ndarray)):
        return np.asarray(labels, dtype=np.float32)
    return np.asarray(labels, dtype=np.int64)
