"""Manifest sources -> records: the rows of annotation tables (CSV, Excel, file names, folders)
become :class:`~fundus_lab.data.records.Record` objects; :func:`read_records` reads every
source of a manifest, whatever its layout.

Everything dataset-specific is data in the manifest; this module is the one code path. The
layouts have their own modules: annotation files as a user downloads them (encodings, sheets,
one row per patient melted to one row per eye) in :mod:`fundus_lab.data.tables`, images stored
as arrays in one ``.npz`` (RetinaMNIST) in :mod:`fundus_lab.data.npz`; what they all read into
is :mod:`fundus_lab.data.records`. Errors name the file, the row (as a spreadsheet shows it:
header = row 1) and the field.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import pandas as pd

from fundus_lab.data.images import IMAGE_EXTENSIONS, DataError
from fundus_lab.data.manifest import SPLIT_VALUES, FieldSpec, Manifest, SourceSpec
from fundus_lab.data.npz import npz_records
from fundus_lab.data.records import LoadReport, MissingFilesError, Record
from fundus_lab.data.tables import (
    blank, candidates, cell, check_inside, find_column, find_files, image_key, melt_eyes, norm_code, read_table,
    table_format, typed,
)


# ---------------------------------------------------------------------------------------
# image paths


def _render(template: str, row: dict, extra: dict, where: str) -> str:
    def sub(m: re.Match) -> str:
        key = m.group(1)
        if key in extra:
            return str(extra[key])
        if key in row:
            return "" if blank(row[key]) else str(row[key]).strip()
        raise DataError(f"{where}: template {template!r} names column {key!r}, which the file does not have")

    return re.sub(r"\{([^{}]+)\}", sub, template)


class DirIndex:
    """Cached directory listings: existence checks for thousands of images cost one
    listdir per folder, and names can be matched ignoring case or extension."""

    def __init__(self) -> None:
        self._dirs: dict[Path, Optional[dict[str, list[str]]]] = {}

    def _listing(self, d: Path) -> Optional[dict[str, list[str]]]:
        if d not in self._dirs:
            try:
                names = os.listdir(d)
            except OSError:
                self._dirs[d] = None
            else:
                idx: dict[str, list[str]] = {}
                for n in names:
                    idx.setdefault(n, []).append(n)
                    idx.setdefault("lower:" + n.lower(), []).append(n)
                    stem, ext = os.path.splitext(n)
                    if ext.lower() in IMAGE_EXTENSIONS or ext.lower() == ".npz":
                        idx.setdefault("stem:" + stem.lower(), []).append(n)
                self._dirs[d] = idx
        return self._dirs[d]

    def resolve(self, path: Path, extensions: list[str]) -> Optional[Path]:
        """``path`` if it exists; else, when ``extensions`` allow it, the one file of the
        same name ignoring case, or of the same stem with one of ``extensions``."""
        listing = self._listing(path.parent)
        if listing is None:
            return None
        if path.name in listing:
            return path
        if not extensions:
            return None
        exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
        hits = [n for n in listing.get("lower:" + path.name.lower(), [])]
        if not hits:
            stem = path.stem if path.suffix.lower() in IMAGE_EXTENSIONS else path.name
            hits = [n for n in listing.get("stem:" + stem.lower(), []) if os.path.splitext(n)[1].lower() in exts]
        return path.parent / hits[0] if len(hits) == 1 else None


# ---------------------------------------------------------------------------------------
# rows -> records


class _RowError(DataError):
    """A problem with one row: raised, or skipped and counted under skip_bad."""


def _field_value(spec: Optional[FieldSpec], df_cols: dict[str, str], row: dict, where: str, what: str) -> Optional[str]:
    if spec is None:
        return None
    value = cell(row, df_cols.get(what))
    if value is None:
        return None
    if spec.pattern:
        m = re.search(spec.pattern, value)
        if not m:
            raise _RowError(f"{where}: {what} {value!r} does not match pattern {spec.pattern!r}")
        groups = m.groupdict()
        value = groups.get("value") or (m.group(1) if m.groups() else m.group(0))
    if spec.values:
        if value in spec.values:
            value = spec.values[value]
        elif value.lower() in {k.lower() for k in spec.values}:
            value = {k.lower(): v for k, v in spec.values.items()}[value.lower()]
        else:
            raise _RowError(f"{where}: {what} {value!r} is not one of {list(spec.values)}")
    return value


class SourceReader:
    """Reads one manifest source into records (see :func:`read_records`)."""

    def __init__(self, manifest: Manifest, index: int, root: Path, report: LoadReport, skip_bad: bool, dirs: DirIndex):
        self.m, self.i, self.root, self.report, self.skip_bad, self.dirs = manifest, index, root, report, skip_bad, dirs
        self.s: SourceSpec = manifest.sources[index]
        self.at = f"{manifest.path}: sources[{index}]"

    # -- tables ---------------------------------------------------------------------------
    def tables(self) -> list[pd.DataFrame]:
        s = self.s
        files = find_files(s.annotations, self.root, f"{self.at}.annotations", self.m.allow_outside_root)
        if not files:
            if s.optional:
                return []
            cands = ", ".join(repr(c) for c in candidates(s.annotations))
            raise MissingFilesError(
                f"{self.at}.annotations: no file found under {self.root} matching {cands} "
                f"(dataset {self.m.name!r}; is root the folder you downloaded?)"
            )
        if s.format in ("filename-pattern", "folder"):
            return [self._file_table(files)]
        return [self._prepare(read_table(f, table_format(f, s.format), s), f) for f in files]

    def _file_table(self, files: list[Path]) -> pd.DataFrame:
        pattern = self.s.pattern or r"(?P<folder>[^/]+)/(?P<file>[^/]+)$"
        rows = []
        for f in files:
            rel = f.relative_to(self.root).as_posix()
            row = {"path": rel, "file": f.name, "stem": f.stem, "folder": f.parent.name, "_row": None, "_file": rel}
            m = re.search(pattern, rel)
            if m is None:
                row["_nomatch"] = f"{f}: file name does not match {self.at}.pattern {pattern!r}"
            else:
                row.update({k: v for k, v in m.groupdict().items() if v is not None})
            rows.append(row)
        return pd.DataFrame(rows)

    def _prepare(self, df: pd.DataFrame, f: Path) -> pd.DataFrame:
        df = melt_eyes(df, self.s.wide_eyes, f"{f} ({self.at}.wide_eyes)")
        if self.s.join is not None:
            df = self._join(df, f)
        return df

    def _join(self, df: pd.DataFrame, f: Path) -> pd.DataFrame:
        j = self.s.join
        files = find_files(j.annotations, self.root, f"{self.at}.join.annotations", self.m.allow_outside_root)
        if not files:
            raise DataError(
                f"{self.at}.join.annotations: no file found under {self.root} matching "
                f"{candidates(j.annotations)} (needed for patient ids: splits must be by patient)"
            )
        other = pd.concat([melt_eyes(read_table(p, table_format(p, j.format), j), j.wide_eyes, f"{p}") for p in files], ignore_index=True)
        on = find_column(other, j.image_column, "join.image_column", f"{files[0]}")
        other = other.drop(columns=["_row", "_file"])
        if "_eye" in other.columns and "_eye" in df.columns:
            other = other.drop(columns=["_eye"])
        other["_key"] = other[on].map(lambda v: None if blank(v) else image_key(v, j.key))
        dup = other["_key"].dropna().duplicated()
        if dup.any():
            names = other["_key"].dropna()[dup].tolist()[:3]
            raise DataError(f"{files[0]}: image(s) {names} listed more than once in column {on!r}")
        img_col = find_column(df, self.s.image.column or "image", "image", str(f))
        df = df.copy()
        df["_key"] = df[img_col].map(lambda v: None if blank(v) else image_key(v, j.key))
        other = other.drop(columns=[c for c in other.columns if c in df.columns and c != "_key"])
        unmatched = (~df["_key"].isin(set(other["_key"].dropna()))).sum()
        if unmatched:
            warnings.warn(
                f"{f}: {unmatched} image(s) not found in the joined table {files[0]} ({self.at}.join); "
                "they get no joined fields (e.g. no patient id: each is split on its own)",
                stacklevel=2,
            )
        return df.merge(other, on="_key", how="left")

    # -- records --------------------------------------------------------------------------
    def records(self) -> list:
        if self.s.format == "npz":
            return npz_records(self)
        out = []
        for df in self.tables():
            out.extend(self._table_records(df))
        return out

    def _columns(self, df: pd.DataFrame, where: str) -> dict[str, str]:
        """Resolve every column the source names, once per table (missing -> error)."""
        s, cols = self.s, {}
        default_image = "path" if s.format in ("filename-pattern", "folder") else None
        image_col = s.image.column or default_image
        if image_col is None:
            raise DataError(f"{self.at}.image.column: required for format {s.format}")
        cols["image"] = find_column(df, image_col, "image.column", where)
        lab = s.label
        if lab.multi_hot:
            for c in self.m.classes:
                cols["class:" + c.name] = find_column(df, c.column, f"the 0/1 column of class {c.name!r}", where)
        elif lab.column is not None:
            cols["label"] = find_column(df, lab.column, "label.column", where)
        elif s.format == "folder":
            cols["label"] = "folder"
        for name in ("patient", "eye", "text"):
            spec = getattr(s, name)
            if spec is not None and spec.column is not None:
                cols[name] = find_column(df, spec.column, f"{name}.column", where)
        if s.eye is None and "_eye" in df.columns:
            cols["eye"] = "_eye"
        elif s.eye is not None and s.eye.column is None and "_eye" in df.columns:
            cols["eye"] = "_eye"
        if s.split_column is not None:
            cols["split"] = find_column(df, s.split_column, "split_column", where)
        for name, spec in s.meta.items():
            if isinstance(spec, str) and "{" in spec:
                continue
            cols["meta:" + name] = find_column(df, spec, f"meta.{name}", where)
        return cols

    def _table_records(self, df: pd.DataFrame) -> list:
        s = self.s
        where = str(df["_file"].iloc[0]) if len(df) else self.at
        if s.format in ("filename-pattern", "folder"):
            where = f"{self.root} ({self.at})"
        cols = self._columns(df, where)
        if s.drop_duplicates:  # the same image listed on several rows: keep the first
            df = df.drop_duplicates(subset=[cols["image"]], keep="first")
        out, seen = [], set()
        for row in df.to_dict("records"):
            if row.get("_row") is not None:
                image = cell(row, cols["image"])
                loc = f"{row['_file']} row {row['_row']}" + (f" ({cols['image']} {image!r})" if image else "")
            else:
                loc = f"{self.root / row['_file']}"
            try:
                if not blank(row.get("_nomatch")):
                    raise _RowError(row["_nomatch"])
                rec = self._row_record(row, cols, loc)
            except _RowError as err:
                if not self.skip_bad:
                    raise DataError(str(err)) from None
                self.report.skipped.append(str(err))
                continue
            if rec is None:
                continue
            if s.drop_duplicates:
                if rec.path in seen:
                    continue
                seen.add(rec.path)
            out.append(rec)
        return out

    def _image_path(self, row: dict, cols: dict, loc: str) -> Path:
        spec = self.s.image
        value = cell(row, cols["image"])
        if value is None:
            raise _RowError(f"{loc}: column {cols['image']!r} (image) is empty; expected an image file name")
        base = Path(row["_file"]).parent if spec.relative_to == "annotations" else self.root
        extra = {"value": value, "stem": os.path.splitext(value)[0], "eye": row.get("_eye", "")}
        tried = []
        for template in candidates(spec.template):
            path = base / _render(template, row, extra, f"{self.at}.image.template")
            hit = self.dirs.resolve(path, spec.extensions)
            if hit is not None:
                try:
                    check_inside(hit, self.root, f"{loc}: image", self.m.allow_outside_root)
                except DataError as err:
                    raise _RowError(str(err)) from None
                return hit.resolve() if not hit.is_absolute() else hit
            tried.append(str(path))
        raise _RowError(f"{loc}: image file not found for {cols['image']!r} = {value!r}; tried {', '.join(tried)}")

    def _label(self, row: dict, cols: dict, loc: str):
        """-> (label, raw_label, notes) or None when the manifest excludes the row."""
        lab, m = self.s.label, self.m
        if lab.multi_hot:
            raw, vec = {}, []
            for c in m.classes:
                col = cols["class:" + c.name]
                v = cell(row, col)
                raw[col] = v
                if v is None:
                    if lab.missing == "exclude":
                        self.report.excluded.append(f"{loc}: empty {col!r}")
                        return None
                    raise _RowError(f"{loc}: column {col!r} (class {c.name!r}) is empty; expected 0 or 1")
                code = norm_code(v)
                if code not in ("0", "1"):
                    raise _RowError(f"{loc}: column {col!r} (class {c.name!r}) has {v!r}; expected 0 or 1")
                vec.append(int(code))
            out = self._check_empty(vec, raw, loc)
            return None if out is None else (*out, [])
        col = cols.get("label")
        raw = cell(row, col)
        if raw is None:
            if lab.missing == "exclude":
                self.report.excluded.append(f"{loc}: empty label column {col!r}")
                return None
            raise _RowError(f"{loc}: column {col!r} (label) is empty; expected a label")
        if lab.keyword is not None:
            return self._keywords(raw, col, loc)
        if lab.codes:
            code = norm_code(raw)
            if code not in lab.codes:
                raise _RowError(
                    f"{loc}: column {col!r} has unknown label code {raw!r}; expected one of {list(lab.codes)}"
                )
            target = lab.codes[code]
        else:
            target = norm_code(raw)
        try:
            idx = m.class_index(target, "label")
        except ValueError:
            raise _RowError(f"{loc}: column {col!r} has {raw!r}, which is not a class of {m.class_names}") from None
        if m.task == "multilabel":
            vec = [0] * len(m.classes)
            vec[idx] = 1
            return vec, raw, []
        return idx, raw, []

    def _keywords(self, raw: str, col: str, loc: str):
        kw, m = self.s.label.keyword, self.m
        parts = [raw]
        for sep in kw.separators:
            parts = [q for p in parts for q in p.split(sep)]
        found, notes = [], []
        for word in (p.strip().lower() for p in parts):
            if not word:
                continue
            rule = next((r for r in kw.rules if re.search(r.match, word)), None)
            if rule is not None and rule.label is None:
                notes.append(word)
            elif rule is not None:
                found.append(m.class_index(rule.label))
            elif kw.unknown == "error":
                raise _RowError(
                    f"{loc}: column {col!r}: keyword {word!r} matches no rule in "
                    f"{self.at}.label.keyword.rules; add a rule (label: null for a non-disease note)"
                )
            else:
                self.report.fallbacks[f"{word!r} -> {kw.unknown!r}"] += 1
                found.append(m.class_index(kw.unknown))
        if m.task == "multilabel":
            vec = [0] * len(m.classes)
            for i in found:
                vec[i] = 1
            out = self._check_empty(vec, raw, loc)
        else:
            uniq = sorted(set(found))
            if len(uniq) == 1:
                out = (uniq[0], raw)
            elif not uniq and self.s.label.empty == "exclude":
                self.report.excluded.append(f"{loc}: {col!r} = {raw!r} names no class")
                out = None
            else:
                raise _RowError(f"{loc}: column {col!r} = {raw!r} maps to {len(uniq)} classes; {m.task} needs exactly one")
        return None if out is None else (*out, notes)

    def _check_empty(self, vec: list[int], raw: Any, loc: str):
        if any(vec):
            return vec, raw
        policy = self.s.label.empty
        if policy == "keep":
            return vec, raw
        if policy == "exclude":
            self.report.excluded.append(f"{loc}: label {raw!r} names no class (e.g. only quality notes)")
            return None
        raise _RowError(f"{loc}: label {raw!r} names no class; expected at least one of {self.m.class_names}")

    def _row_record(self, row: dict, cols: dict, loc: str):
        lab = self._label(row, cols, loc)
        if lab is None:
            return None
        label, raw, notes = lab
        path = self._image_path(row, cols, loc)
        s = self.s
        patient = _field_value(s.patient, cols, row, loc, "patient")
        if patient is not None:
            patient = patient.strip() or None
        if patient is None and s.patient is not None:
            self.report.no_patient.append(loc)
        eye = _field_value(s.eye or FieldSpec(), cols, row, loc, "eye")
        if eye is not None:
            eye = {"l": "left", "r": "right", "os": "left", "od": "right"}.get(eye.lower(), eye.lower())
            if eye not in ("left", "right"):
                raise _RowError(f"{loc}: eye {eye!r} is not left or right; map it with eye.values")
        text = _field_value(s.text, cols, row, loc, "text")
        split = s.split
        if "split" in cols:
            value = cell(row, cols["split"])
            value = s.split_values.get(value, value) if value is not None else None
            if value not in SPLIT_VALUES:
                raise _RowError(f"{loc}: column {cols['split']!r} (split) has {value!r}; expected train, val or test (or test_camera)")
            split = value
        meta = {}
        for name, spec in s.meta.items():
            if isinstance(spec, str) and "{" in spec:
                extra = {"value": cell(row, cols["image"]), "eye": row.get("_eye", "")}
                extra["stem"] = os.path.splitext(extra["value"] or "")[0]
                meta[name] = _render(spec, row, extra, f"{self.at}.meta.{name}")
            else:
                meta[name] = typed(row.get(cols["meta:" + name]))
        if notes:
            meta["notes"] = notes
        return Record(path=str(path), label=label, raw_label=raw, patient_id=patient, eye=eye, text=text, split=split,
                      meta=meta, origin=loc)


def normalise_patients(records: list[Record], manifest: Manifest, report: LoadReport) -> None:
    """Patient ids that differ only in case (``p3``, ``P3``) become one patient, spelt as first
    seen, under ``patient_case: insensitive`` (the default); ids were already stripped. Each
    merge is recorded in ``report.merged_patients`` and warned about, so it is never silent."""
    if not any(s.patient_case == "insensitive" for s in manifest.sources):
        return
    canonical: dict[str, str] = {}
    for r in records:
        if r.patient_id is None:
            continue
        folded = r.patient_id.casefold()
        first = canonical.setdefault(folded, r.patient_id)
        if first != r.patient_id:
            report.merged_patients[r.patient_id] = first
            r.patient_id = first


def check_duplicate_images(records: list[Record], root: Path, report: LoadReport, skip_bad: bool) -> list[Record]:
    """The same image twice: with the same label and split the repeat is dropped and reported;
    with a different label (or split) it is an error naming both rows (under ``skip_bad``
    both are skipped and reported): keeping both would train on a contradiction."""
    first: dict[str, Record] = {}
    bad: set[str] = set()
    out = []
    for r in records:
        key = r.key(root)
        prev = first.get(key)
        if prev is None:
            first[key] = r
            out.append(r)
            continue
        if prev.label == r.label and prev.split == r.split and prev.patient_id == r.patient_id:
            report.duplicates.append(f"{r.origin or key}: repeats {prev.origin or key} (same label); kept once")
            continue
        what = "label" if prev.label != r.label else ("split" if prev.split != r.split else "patient id")
        msg = (f"image {key} is listed twice with a different {what}: {prev.origin or '?'} has "
               f"{getattr(prev, what.replace(' ', '_'))!r}, {r.origin or '?'} has {getattr(r, what.replace(' ', '_'))!r}")
        if not skip_bad:
            raise DataError(msg)
        report.skipped.append(msg)
        bad.add(key)
    return [r for r in out if r.key(root) not in bad]


def read_records(manifest: Manifest, root: Union[str, Path], skip_bad: bool = False) -> tuple[list[Record], LoadReport]:
    """Every record of every source of ``manifest`` under ``root`` (before splitting)."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"dataset root {root} is not a directory (dataset {manifest.name!r}, manifest {manifest.path})")
    report, dirs, records = LoadReport(), DirIndex(), []
    for i, source in enumerate(manifest.sources):
        try:
            records.extend(SourceReader(manifest, i, root, report, skip_bad, dirs).records())
        except MissingFilesError as err:
            # a source holding one official split (REFUGE's Validation400) may be absent: the
            # splits that were downloaded still open; asking for this one says what it needs
            if source.split is None:
                raise
            report.missing_splits[source.split] = str(err)
    if not records:
        missing = "".join(f"\n  {split}: {why}" for split, why in report.missing_splits.items())
        raise DataError(f"dataset {manifest.name!r} under {root}: no records found (manifest {manifest.path}){missing}")
    normalise_patients(records, manifest, report)
    records = check_duplicate_images(records, root, report, skip_bad)
    if report.merged_patients:
        pairs = ", ".join(f"{k!r} -> {v!r}" for k, v in list(report.merged_patients.items())[:5])
        warnings.warn(
            f"{manifest.name}: {len(report.merged_patients)} patient id spelling(s) differ only in case and were "
            f"merged ({pairs}); set patient_case: sensitive in the manifest if they are different people",
            stacklevel=3,
        )
    if report.no_patient:
        warnings.warn(
            f"{manifest.name}: {len(report.no_patient)} record(s) have no patient id, so each is split as its own "
            f"patient (e.g. {report.no_patient[0]})",
            stacklevel=3,
        )
    if report.duplicates:
        warnings.warn(
            f"{manifest.name}: {len(report.duplicates)} image(s) listed more than once with the same label were "
            f"kept once (e.g. {report.duplicates[0]})",
            stacklevel=3,
        )
    if report.fallbacks:
        top = ", ".join(f"{k} x{v}" for k, v in report.fallbacks.most_common(8))
        warnings.warn(
            f"{manifest.name}: {sum(report.fallbacks.values())} keyword(s) matched no rule and were mapped "
            f"by label.keyword.unknown: {top}",
            stacklevel=3,
        )
    return records, report
