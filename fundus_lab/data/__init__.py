"""Datasets: manifests, readers, images, splits, and the synthetic generator.

    from fundus_lab.data import open_dataset, collate
    ds = open_dataset("odir5k", root="/data/ODIR", split="test")

Names are imported on first use, so ``import fundus_lab.data`` (e.g. for ``load_manifest``)
does not pull in torch, pandas or the generator.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "open_dataset": "fundus_lab.data.dataset",
    "FundusDataset": "fundus_lab.data.dataset",
    "collate": "fundus_lab.data.dataset",
    "Record": "fundus_lab.data.records",
    "load_manifest": "fundus_lab.data.manifest",
    "available_manifests": "fundus_lab.data.manifest",
    "Manifest": "fundus_lab.data.manifest",
    "ManifestError": "fundus_lab.data.manifest",
    "DataError": "fundus_lab.data.images",
    "ImageError": "fundus_lab.data.images",
}
_SUBMODULES = ("synth", "images", "manifest", "records", "tables", "npz", "readers", "splits", "dataset", "tokenizer",
               "text_source")

__all__ = list(_LAZY) + list(_SUBMODULES)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
