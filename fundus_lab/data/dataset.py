"""``open_dataset``: any manifest + dataset folder -> a torch Dataset of fundus images.

    ds = open_dataset("aptos2019", root="/data/aptos", split="train", image_size=224)
    ds.classes, ds.task, ds.metric, ds.records[0]
    ds[0] -> {"image": FloatTensor[3, S, S] in [0, 1], "label": ..., "text": ..., ...}

One code path for every dataset: the manifest says how to read it (``manifest.py``),
``readers.py`` turns rows into records, ``splits.py`` assigns splits, ``images.py``
turns files into tensors.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from fundus_lab import knowledge
from fundus_lab.data import images as img
from fundus_lab.data.cache import ImageCache
from fundus_lab.data.images import DataError, ImageError
from fundus_lab.data.manifest import MANIFEST_DIR, SPLIT_VALUES, Manifest, load_manifest
from fundus_lab.data.readers import read_records
from fundus_lab.data.records import LoadReport, Record
from fundus_lab.data.splits import check_patient_disjoint, make_splits, split_counts
from fundus_lab.data.tabular import table_manifest

SYNTH_ROOT = Path("data/synth")


class FundusDataset(Dataset):
    """Records of one split of one dataset, read through its manifest.

    Attributes: ``classes`` (names in label order), ``class_keys`` (knowledge keys or None),
    ``task`` (multiclass | multilabel | ordinal | binary), ``metric`` (the primary metric),
    ``metrics``, ``manifest``, ``root``, ``split``, ``records``, ``skipped`` (bad inputs
    skipped under ``skip_bad``, each a message naming the file) and ``excluded`` (rows the
    manifest excludes, e.g. ungradable images).
    """

    def __init__(
        self,
        manifest: Manifest,
        root: Union[str, Path],
        records: Sequence[Record],
        split: Optional[str] = None,
        image_size: int = 224,
        augment: bool = False,
        skip_bad: bool = False,
        report: Optional[LoadReport] = None,
        task: Optional[str] = None,
        text_field: str = "text",
    ):
        self.manifest = manifest
        self.root = Path(root)
        self.records = list(records)
        self.split = split
        self.image_size = int(image_size)
        self.augment = bool(augment)
        self.skip_bad = bool(skip_bad)
        report = report or LoadReport()
        self.skipped: list[str] = list(report.skipped)
        self.excluded: list[str] = list(report.excluded)
        self.task = task or manifest.task
        self.text_field = text_field
        self._arrays: dict[tuple[str, str], np.ndarray] = {}
        self.image_cache = None  # fundus_lab.data.cache.ImageCache once enable_cache() ran

    def enable_cache(self, cache_dir: Union[str, Path, None] = None, progress: bool = False) -> "FundusDataset":
        """Serve images from a pre-decoded, pre-resized uint8 memory map (``data.cache``),
        written on first use; augmentation still runs on every item. Returns self."""
        self.image_cache = ImageCache.build(self, cache_dir, progress=progress)
        return self

    # -- description ------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def classes(self) -> list[str]:
        return self.manifest.class_names

    @property
    def class_keys(self) -> list[Optional[str]]:
        return [c.key for c in self.manifest.classes]

    @property
    def metrics(self) -> list[str]:
        return self.manifest.metrics if self.task == self.manifest.task else ["accuracy"]

    @property
    def metric(self) -> str:
        return self.metrics[0]

    @property
    def labels(self) -> np.ndarray:
        """All labels: int64 [N] (single-label) or int64 [N, C] (multi-hot)."""
        return np.asarray([r.label for r in self.records], dtype=np.int64)

    def class_counts(self) -> dict[str, int]:
        """Records per class (for multi-label data, records where the class is present)."""
        labels = self.labels
        if labels.ndim == 2:
            counts = labels.sum(axis=0)
        else:
            counts = np.bincount(labels, minlength=len(self.classes))
        return {c: int(n) for c, n in zip(self.classes, counts)}

    def class_prompts(self) -> list[list[str]]:
        """Per class: the knowledge base's prompts for its key, then the manifest's own."""
        out = []
        for c in self.manifest.classes:
            prompts = list(knowledge.class_prompts(c.key)) if c.key else []
            prompts += [p for p in c.prompts if p not in prompts]
            out.append(prompts)
        return out

    def __repr__(self) -> str:
        return (
            f"FundusDataset({self.name!r}, split={self.split!r}, n={len(self)}, task={self.task!r}, "
            f"classes={len(self.classes)}, root={str(self.root)!r})"
        )

    # -- subsets ----------------------------------------------------------------------------
    def _derive(self, records: Sequence[Record], task: Optional[str] = None) -> "FundusDataset":
        new = copy.copy(self)
        new.records = list(records)
        new.task = task or self.task
        new.skipped, new.excluded = list(self.skipped), list(self.excluded)
        new._arrays = {}
        return new

    def subset(self, indices: Sequence[int]) -> "FundusDataset":
        """The same dataset restricted to ``indices`` (few-shot samples, folds)."""
        return self._derive([self.records[i] for i in indices])

    def single_label(self) -> "FundusDataset":
        """Multi-label data -> the records with exactly one class, as a multiclass dataset
        (labels become class indices). Zero-shot papers report ODIR accuracy on these."""
        if self.task != "multilabel":
            return self
        recs = []
        for r in self.records:
            if sum(r.label) == 1:
                recs.append(Record(**{**r.__dict__, "label": int(np.argmax(r.label))}))
        return self._derive(recs, task="multiclass")

    # -- items ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def _source(self, rec: Record) -> Union[str, np.ndarray]:
        if "npz_index" in rec.meta:
            key = (rec.path, rec.meta["npz_images"])
            if key not in self._arrays:
                with np.load(rec.path, allow_pickle=False) as data:
                    self._arrays[key] = np.asarray(data[rec.meta["npz_images"]])
            return self._arrays[key][rec.meta["npz_index"]]
        return rec.path

    def load_image(self, i: int, augment: Optional[bool] = None) -> torch.Tensor:
        """Image of record ``i`` as float [3, S, S] in [0, 1]."""
        rec = self.records[i]
        aug = self.augment if augment is None else augment
        row = self.image_cache.row(rec) if self.image_cache is not None else None
        if row is not None:
            x = img.to_tensor(self.image_cache.image(row))
            return img.augment(x) if aug else x
        fov = next((s.image.fov_crop for s in self.manifest.sources), True)
        return img.load_tensor(self._source(rec), self.image_size, fov_crop=fov, train_augment=aug,
                               where=_source_name(rec))

    def text_of(self, rec: Record) -> Optional[str]:
        """The record's report (``text_field="text"``) or another text column kept in meta
        (the synthetic sets' ``short_text`` / ``definition_text``)."""
        if self.text_field == "text":
            return rec.text
        value = rec.meta.get(self.text_field)
        return None if value is None else str(value)

    def _label_tensor(self, rec: Record) -> torch.Tensor:
        if isinstance(rec.label, list):
            return torch.tensor(rec.label, dtype=torch.float32)
        return torch.tensor(rec.label, dtype=torch.long)

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self.records)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {self!r}")
        i = i % n
        for attempt in range(n):
            j = (i + attempt) % n
            try:
                image = self.load_image(j)
            except ImageError as err:
                if not self.skip_bad:
                    raise
                self.skipped.append(str(err))
                warnings.warn(f"{self.name}: skipped unreadable image ({len(self.skipped)} skipped so far): {err}", stacklevel=2)
                continue
            rec = self.records[j]
            return {
                "image": image,
                "label": self._label_tensor(rec),
                "text": self.text_of(rec),
                "patient_id": rec.patient_id,
                "eye": rec.eye,
                "path": rec.path,
                "index": j,
            }
        raise DataError(f"{self.name}: every image of the {self.split!r} split is unreadable ({len(self.skipped)} skipped)")

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """A DataLoader batch (torch calls this instead of one ``__getitem__`` per index).

        Per-image work runs on one intra-op thread, restored afterwards: a 128 px image's
        augmentation gains nothing from more, and on a busy CPU the hand-off between
        threads cost ~100 ms per item instead of ~1.5 ms (benchmarks/data_loading.py)."""
        n = torch.get_num_threads()
        if n > 1:
            torch.set_num_threads(1)
        try:
            return [self[i] for i in indices]
        finally:
            if n > 1:
                torch.set_num_threads(n)

    def verify(self) -> list[str]:
        """Decode every image once; with ``skip_bad`` drop the unreadable ones (returned and
        added to ``skipped``), else raise on the first. Worth running before long training,
        as DataLoader workers cannot report skips back to this object."""
        bad, keep = [], []
        for j, rec in enumerate(self.records):
            try:
                self.load_image(j, augment=False)
                keep.append(rec)
            except ImageError as err:
                if not self.skip_bad:
                    raise
                bad.append(str(err))
        if bad:
            self.records = keep
            self.skipped.extend(bad)
            warnings.warn(f"{self.name}: {len(bad)} unreadable image(s) removed, e.g. {bad[0]}", stacklevel=2)
        return bad


def _source_name(rec: Record) -> str:
    """How errors name a record's image: its file, or ``file[array][index]`` inside an npz."""
    if "npz_index" in rec.meta:
        return f"{rec.path}[{rec.meta['npz_images']}][{rec.meta['npz_index']}]"
    return str(rec.path)


def _default_root(name_or_path: Union[str, Path], manifest: Manifest) -> Path:
    """Synthetic datasets default to ``data/synth/<name>``; a manifest inside a dataset
    folder (as the generator writes it) defaults to its own folder."""
    manifest_path = manifest.path.resolve() if manifest.path else None
    from_repo = manifest_path is not None and manifest_path.parent == MANIFEST_DIR.resolve()
    if not from_repo and manifest_path is not None:
        return manifest_path.parent
    if manifest.synthetic or manifest.name.startswith("synth"):
        # relative to the working directory, the rule of every command (never the checkout)
        if (SYNTH_ROOT / manifest.name).is_dir():
            return SYNTH_ROOT / manifest.name
        raise DataError(
            f"synthetic dataset {manifest.name!r} not found under {SYNTH_ROOT / manifest.name}; generate it with "
            f"fundus_lab.data.synth.generate_benchmark('{SYNTH_ROOT}', ...) or pass root="
        )
    raise DataError(
        f"dataset {manifest.name!r} needs root= (the folder you downloaded it to); manifest {manifest.path}"
    )


def open_dataset(
    name_or_path: Union[str, Path, Manifest],
    root: Union[str, Path, None] = None,
    split: Optional[str] = "train",
    image_size: int = 224,
    augment: bool = False,
    skip_bad: bool = False,
    split_file: Union[str, Path, None] = None,
    subset: Optional[str] = None,
    text_field: str = "text",
    image_cache: bool = False,
    image_cache_dir: Union[str, Path, None] = None,
    image_column: Optional[str] = None,
    label_column: Optional[str] = None,
    table_options: Optional[dict] = None,
) -> FundusDataset:
    """Open one split of a dataset described by a manifest.

    Args:
        name_or_path: a manifest name from ``data_manifests/`` (``"odir5k"``), a path to a
            manifest YAML (or to a folder holding ``manifest.yaml``), or a parsed Manifest.
        root: the dataset folder; defaults to ``data/synth/<name>`` for synthetic datasets
            and to the manifest's folder for a manifest inside a dataset folder.
        split: ``train`` | ``val`` | ``test`` (| ``test_camera``, the synthetic benchmark's
            held-out camera), or ``None``/``"all"`` for every record.
        image_size: side S of the square images returned.
        augment: random fundus-preserving augmentation (training).
        skip_bad: skip (count, report, warn) rows and images that cannot be read, instead
            of raising.
        split_file: JSON file of the split; read if it exists, else written after splitting.
        subset: ``"single_label"`` keeps multi-label records with exactly one class.
        text_field: what ``ds[i]["text"]`` holds: ``"text"`` (the report) or a meta column
            such as ``"short_text"`` (``DataConfig.text_field``).
        image_cache: serve pre-decoded, pre-resized images from a memory-mapped cache
            (``data.cache``; written on first use, keyed by manifest, split, size, crop and
            files) instead of decoding each file every epoch (``DataConfig.image_cache``).
        image_cache_dir: where the cache lives (default ``<root>/.cache/images``).
        image_column, label_column: for a plain labelled ``.csv``/``.tsv`` (no manifest
            written): which columns hold the image path and the label; ``root`` then
            defaults to the CSV's folder. A folder of class sub-folders needs neither.
        table_options: further :func:`fundus_lab.data.tabular.manifest_from_csv` /
            ``manifest_from_folder`` arguments (``task``, ``label_separator``, ``patient_column``...).
    """
    if not isinstance(name_or_path, Manifest):  # a plain CSV or class-per-folder tree
        name_or_path = table_manifest(name_or_path, image_column, label_column, root, **(table_options or {})) or name_or_path
    manifest = name_or_path if isinstance(name_or_path, Manifest) else load_manifest(name_or_path)
    if split not in (None, "all", *SPLIT_VALUES):
        raise ValueError(f"split={split!r}; expected train, val or test (or test_camera), all or None")
    if subset not in (None, "single_label"):
        raise ValueError(f"subset={subset!r}; expected None or 'single_label'")
    if text_field != "text":
        known = {k for s in manifest.sources for k in s.meta}
        if text_field not in known:
            raise ValueError(f"text_field={text_field!r}: not a meta column of {manifest.name!r}; expected 'text' or one of {sorted(known)}")
    root = Path(root).expanduser() if root is not None else _default_root(name_or_path, manifest)
    records, report = read_records(manifest, root, skip_bad=skip_bad)
    root = root.resolve()
    info = {"dataset": manifest.name, "manifest": str(manifest.path)}
    make_splits(
        records, manifest.split.fractions, manifest.split.seed, manifest.split.stratify, root,
        split_file=split_file, info=info, where=f"{manifest.name} ({manifest.path})",
    )
    if report.skipped:
        warnings.warn(
            f"{manifest.name}: skipped {len(report.skipped)} bad row(s)/image(s) (skip_bad=True), "
            f"e.g. {report.skipped[0]}; see ds.skipped",
            stacklevel=2,
        )
    if report.excluded:
        warnings.warn(
            f"{manifest.name}: excluded {len(report.excluded)} row(s) as the manifest says "
            f"(e.g. {report.excluded[0]}); see ds.excluded",
            stacklevel=2,
        )
    if report.missing_splits:
        if split in report.missing_splits and not any(r.split == split for r in records):
            raise DataError(f"dataset {manifest.name!r}: split {split!r} is not downloaded under {root}; it needs "
                            f"{report.missing_splits[split]}")
        if split in (None, "all"):
            warnings.warn(f"{manifest.name}: split(s) {sorted(report.missing_splits)} not found under {root}; "
                          f"opening the others", stacklevel=2)
    chosen = records if split in (None, "all") else [r for r in records if r.split == split]
    if not chosen:
        raise DataError(
            f"dataset {manifest.name!r} under {root} has no {split!r} records (splits: {split_counts(records)})"
        )
    ds = FundusDataset(manifest, root, chosen, split=split, image_size=image_size, augment=augment,
                       skip_bad=skip_bad, report=report, text_field=text_field)
    if image_cache:
        ds.enable_cache(image_cache_dir)
    return ds.single_label() if subset == "single_label" else ds


def collate(items: Sequence[dict]) -> dict:
    """Batch items from ``FundusDataset``: tensors stacked along a new dim 0, ints to a
    LongTensor, everything else (str, None, mixed) kept as a list in item order."""
    if not items:
        raise ValueError("collate needs at least one item")
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [it.get(key) for it in items]
        if all(isinstance(v, torch.Tensor) for v in values):
            out[key] = torch.stack(values)
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            out[key] = torch.tensor(values, dtype=torch.long)
        else:
            out[key] = values
    return out


__all__ = ["FundusDataset", "Record", "open_dataset", "collate", "check_patient_disjoint"]
