"""What every dataset layout is read into: one :class:`Record` per sample, and a
:class:`LoadReport` of what loading did besides (rows skipped, excluded, merged, missing).

Its own module so that each layout's reader (:mod:`fundus_lab.data.readers` for tables,
:mod:`fundus_lab.data.npz` for arrays), the splits and the dataset share these types without
importing one another.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from fundus_lab.data.images import DataError


@dataclass
class Record:
    """One sample. ``label`` is a class index, or a multi-hot list in class order;
    ``raw_label`` is the dataset's own value (code, keyword string, or {column: value});
    ``path`` is absolute; for images stored inside an array file (RetinaMNIST) ``meta``
    holds ``npz_images`` and ``npz_index``."""

    path: str
    label: Union[int, list[int]]
    raw_label: Any = None
    patient_id: Optional[str] = None
    eye: Optional[str] = None
    text: Optional[str] = None
    split: Optional[str] = None
    meta: dict = field(default_factory=dict)
    # where the record came from ("labels.csv row 7 (image 'a.png')"), for errors naming rows
    origin: Optional[str] = field(default=None, repr=False, compare=False)

    def key(self, root: Union[str, Path, None] = None) -> str:
        """A stable identifier: the path relative to ``root`` (+ ``#array[index]``)."""
        path = self.path
        if root is not None:
            try:
                path = Path(self.path).relative_to(Path(root)).as_posix()
            except ValueError:
                pass
        if "npz_index" in self.meta:
            return f"{path}#{self.meta['npz_images']}[{self.meta['npz_index']}]"
        return str(path)


@dataclass
class LoadReport:
    """What loading did besides making records, so nothing is dropped silently."""

    skipped: list[str] = field(default_factory=list)  # bad rows skipped under skip_bad
    excluded: list[str] = field(default_factory=list)  # rows the manifest excludes (ungradable)
    fallbacks: Counter = field(default_factory=Counter)  # keyword -> count, mapped by keyword.unknown
    duplicates: list[str] = field(default_factory=list)  # the same image listed again with the same label
    merged_patients: dict[str, str] = field(default_factory=dict)  # raw id -> the id it was merged into
    no_patient: list[str] = field(default_factory=list)  # records of a source with patient ids that lack one
    # official split -> why it is absent (the files its source needs): a download with only some splits
    missing_splits: dict[str, str] = field(default_factory=dict)


class MissingFilesError(DataError):
    """A source's annotation files are not under the root (see ``read_records``)."""
