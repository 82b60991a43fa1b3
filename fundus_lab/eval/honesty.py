"""Keeping evaluation honest: no patient on both sides, and the splits written down.

A patient's two eyes look alike, so a model that trained (or chose a hyper-parameter) on
one eye and is scored on the other is partly scored on memory. Every protocol calls
:func:`assert_disjoint` on the data it fits/tunes on and the data it scores on, and the
comparison writes the exact sample lists (:func:`write_split_file`) into each run folder.

Patients are identified by (dataset folder, patient id): two different datasets number
their patients independently, while two splits of one dataset share one numbering.
Samples without a patient id are identified by their image file.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path


class LeakageError(ValueError):
    """A patient (or image) appears both in the data a model learned from and in its test data."""


def _namespace(ds) -> str:
    root = getattr(ds, "root", None)
    return str(Path(root).resolve()) if root is not None else f"<{type(ds).__name__} {id(ds)}>"


def _image_key(r) -> str:
    """The record's own stable key (``Record.key``: path + array index for .npz images)."""
    key = getattr(r, "key", None)
    return key() if callable(key) else str(Path(str(r.path)).resolve())


def patient_keys(ds) -> set[tuple[str, str]]:
    """{(dataset folder, patient id or image path)} of every sample of ``ds``."""
    records = getattr(ds, "records", None)
    if records is None:
        raise TypeError(f"{type(ds).__name__} has no .records; cannot check patients")
    ns = _namespace(ds)
    out = set()
    for r in records:
        pid = getattr(r, "patient_id", None)
        out.add((ns, f"patient:{pid}" if pid not in (None, "") else f"image:{_image_key(r)}"))
    return out


def assert_disjoint(a, b, name_a: str = "train", name_b: str = "test") -> None:
    """Raise :class:`LeakageError` if ``a`` and ``b`` share a patient (or an image)."""
    shared = patient_keys(a) & patient_keys(b)
    if shared:
        examples = ", ".join(sorted(k for _, k in shared)[:5])
        raise LeakageError(
            f"{len(shared)} patient(s) appear in both the {name_a} data ({_namespace(a)}, split "
            f"{getattr(a, 'split', '?')}) and the {name_b} data (split {getattr(b, 'split', '?')}): {examples}"
        )


def write_split_file(ds, path: str | Path) -> str:
    """Write the samples of ``ds`` (index, image, patient, eye, split, label) as CSV.

    Returns the SHA-256 of the file, which goes into cache keys and result JSON so a run
    is traceable to the exact samples it saw.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = getattr(ds, "root", None)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "image", "patient_id", "eye", "split", "label"])
        for i, r in enumerate(ds.records):
            image = str(r.path)
            if root is not None:
                try:
                    image = str(Path(r.path).resolve().relative_to(Path(root).resolve()))
                except ValueError:
                    pass
            w.writerow([i, image, r.patient_id if r.patient_id is not None else "", r.eye or "",
                        r.split or "", r.label])
    return hashlib.sha256(path.read_bytes()).hexdigest()
