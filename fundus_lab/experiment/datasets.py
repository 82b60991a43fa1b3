"""Where an experiment's datasets live and how it opens their splits: the one rule for a
dataset's root folder (synthetic sets under the run's synthetic benchmark, real ones under
``data_root``), writing the synthetic benchmark when it is needed, and the split files
every method shares. Pretraining, evaluation and the notebooks all open data through here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from fundus_lab import config as C
from fundus_lab.data import DataError, open_dataset, synth
from fundus_lab.eval.honesty import write_split_file
from fundus_lab.eval.probe import holdout_indices
from fundus_lab.experiment.store import sha256_file, sha256_json


def dataset_root(cfg: "C.Config", name: str, data_root: str | None = None) -> str | None:
    """``<synth root>/<name>`` for synthetic sets, else ``data_root/<name>`` (or ``data_root``)."""
    if name.startswith("synth-"):
        return str(C.resolve_path(data_root or cfg.data.synth_root) / name)
    if data_root is None:
        return None
    return str(Path(data_root) / name) if (Path(data_root) / name).is_dir() else str(data_root)


def ensure_synthetic(cfg: "C.Config", names: Sequence[str] = (), data_root: str | None = None) -> Path:
    """Write the configured synthetic benchmark when any of ``names`` is synthetic (all when empty)."""
    root = C.resolve_path(data_root or cfg.data.synth_root)
    if names and not any(n.startswith("synth-") for n in names):
        return root
    synth.generate_benchmark(str(root), workers=None, **synth.benchmark_options(cfg.data))
    return root


def open_split(cfg: "C.Config", name: str, split: str, image_size: int, data_root=None, augment: bool = False,
               split_dir: str | Path | None = None):
    """One split of dataset ``name``; with ``split_dir`` the assignment is kept in
    ``split_dir/<name>.json`` so every method sees the same split. A split the reader does
    not name (``test_camera``) is taken from the records' own split column."""
    split_file = Path(split_dir) / f"{Path(name).stem}.json" if split_dir is not None else None
    kw = dict(root=dataset_root(cfg, name, data_root), image_size=image_size, augment=augment,
              skip_bad=cfg.data.skip_bad_images, split_file=split_file,
              image_cache=cfg.data.image_cache, image_cache_dir=cfg.data.image_cache_dir)
    try:
        return open_dataset(name, split=split, **kw)
    except ValueError as err:
        if f"split={split!r}" not in str(err):
            raise
    everything = open_dataset(name, split="all", **kw)
    keep = [i for i, r in enumerate(everything.records) if r.split == split]
    if not keep:
        raise DataError(f"dataset {name!r} has no {split!r} records")
    ds = everything.subset(keep)
    ds.split = split
    return ds


def split_names(cfg: "C.Config", name: str, data_root=None, split_dir=None) -> set[str]:
    """The split names dataset ``name`` holds (e.g. {train, val, test, test_camera})."""
    ds = open_split(cfg, name, "all", cfg.model.img_size, data_root, split_dir=split_dir)
    return {r.split for r in ds.records}


def validation_split(cfg, dataset: str, train, image_size: int, data_root, split_dir):
    """(val, train, carved): the dataset's own val split, or a patient-grouped 20 % of train."""
    try:
        return open_split(cfg, dataset, "val", image_size, data_root, split_dir=split_dir), train, False
    except DataError as err:
        if "no 'val' records" not in str(err):
            raise
    fit, hold = holdout_indices(train, fraction=0.2, seed=0)
    return train.subset(hold), train.subset(fit), True


def manifest_hash(ds) -> str:
    for c in (getattr(getattr(ds, "manifest", None), "path", None), getattr(ds, "root", None)):
        if c is not None:
            c = Path(c) if Path(c).is_file() else Path(c) / "manifest.yaml"
            if c.is_file():
                return sha256_file(c)
    return sha256_json(repr(getattr(ds, "manifest", None)))


def record_splits(datasets: Mapping[str, Any], folder: Path, name: str) -> dict:
    """Each split's sample list as ``folder/<name>-<split>.csv``; {split: {file, sha256, n}}."""
    out = {}
    for split in sorted(datasets):
        path = folder / f"{name}-{split}.csv"
        out[split] = {"file": str(path), "sha256": write_split_file(datasets[split], path), "n": len(datasets[split])}
    return out
