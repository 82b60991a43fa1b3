"""Images stored as arrays in one ``.npz`` file (RetinaMNIST, the MedMNIST layout) -> records.

One array of images and one of label codes per split (``npz_images`` / ``npz_labels`` with
``{split}``); each record points at its array and index. The array layout of
:mod:`fundus_lab.data.readers`, in its own module; arrays are loaded without pickle.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fundus_lab.data.images import DataError
from fundus_lab.data.records import MissingFilesError, Record
from fundus_lab.data.tables import candidates, find_files, norm_code

if TYPE_CHECKING:
    from fundus_lab.data.readers import SourceReader


def npz_records(reader: "SourceReader") -> list[Record]:
    """The records of a source of ``format: npz``: images stored as arrays, one per split
    (RetinaMNIST), each record pointing at its array and index (``meta``)."""
    s, m = reader.s, reader.m
    files = find_files(s.annotations, reader.root, f"{reader.at}.annotations", m.allow_outside_root)
    if not files:
        if s.optional:
            return []
        raise MissingFilesError(f"{reader.at}.annotations: no file found under {reader.root} matching {candidates(s.annotations)}")
    path = files[0]
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001
        raise DataError(f"{path}: cannot be read as npz ({type(err).__name__}: {err})") from None
    out = []
    with data:
        for split in s.npz_splits:
            ik, lk = s.npz_images.replace("{split}", split), s.npz_labels.replace("{split}", split)
            for k in (ik, lk):
                if k not in data.files:
                    raise DataError(f"{path}: missing array {k!r}; the file has {sorted(data.files)}")
            images, labels = (_npz_array(data, k, path) for k in (ik, lk))
            if images.ndim not in (3, 4) or images.dtype.kind not in "uif":
                raise DataError(
                    f"{path}: array {ik!r} has shape {list(images.shape)} and dtype {images.dtype}; expected "
                    "numeric images [N, H, W] or [N, H, W, C]"
                )
            n_img = images.shape[0]
            if labels.ndim == 0 or labels.shape[0] != n_img:
                raise DataError(
                    f"{path}: array {lk!r} has {labels.shape[0] if labels.ndim else 0} label(s) but {ik!r} has "
                    f"{n_img} image(s); expected one label per image"
                )
            if labels.dtype.kind not in "uifb":
                raise DataError(f"{path}: array {lk!r} has dtype {labels.dtype}; expected integer label codes")
            labels = labels.reshape(n_img, -1)
            for i in range(n_img):
                loc = f"{path} {lk}[{i}]"
                raw = labels[i].tolist()
                raw = raw[0] if len(raw) == 1 else raw
                try:
                    if not s.label.codes and not (isinstance(raw, (int, float)) and float(raw).is_integer()):
                        raise ValueError  # 1.7 is not class 1
                    target = s.label.codes.get(norm_code(raw), raw) if s.label.codes else int(raw)
                    if s.label.codes and norm_code(raw) not in s.label.codes:
                        raise ValueError
                    label = m.class_index(target, "label")
                except (ValueError, TypeError):
                    err = f"{loc}: unknown label code {raw!r}; expected one of {list(s.label.codes) or list(range(len(m.classes)))}"
                    if not reader.skip_bad:
                        raise DataError(err) from None
                    reader.report.skipped.append(err)
                    continue
                rec_split = split if split in ("train", "val", "test") else s.split
                out.append(Record(path=str(path.resolve()), label=label, raw_label=raw, split=rec_split,
                                  meta={"npz_images": ik, "npz_index": i}, origin=loc))
    return out


def _npz_array(data, key: str, path: Path) -> np.ndarray:
    """One array of an npz file; object arrays (which need pickle) are refused by name."""
    try:
        return np.asarray(data[key])
    except ValueError as err:
        if "allow_pickle" in str(err) or "Object arrays" in str(err):
            raise DataError(
                f"{path}: array {key!r} is an object array (stored with pickle, which is never loaded); expected "
                "numeric arrays"
            ) from None
        raise DataError(f"{path}: array {key!r} cannot be read ({err})") from None
    except Exception as err:  # noqa: BLE001 -- zipfile/zlib errors of a corrupt member
        raise DataError(f"{path}: array {key!r} cannot be read ({type(err).__name__}: {err})") from None
