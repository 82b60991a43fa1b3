"""Manifest sources -> records: read annotation tables (CSV, Excel, npz, file names,
folders), reshape them (one row per eye, joins), and turn each row into a :class:`Record`.

Everything dataset-specific is data in the manifest; this module is the one code path.
Errors name the file, the row (as a spreadsheet shows it: header = row 1) and the field.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import pandas as pd

from fundus_lab.data.images import IMAGE_EXTENSIONS, DataError
from fundus_lab.data.manifest import SPLIT_VALUES, FieldSpec, JoinSpec, Manifest, SourceSpec


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


# ---------------------------------------------------------------------------------------
# small helpers


def _blank(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def _cell(row: dict, col: Optional[str]) -> Optional[str]:
    if col is None:
        return None
    v = row.get(col)
    return None if _blank(v) else str(v).strip()


def _norm_code(v: Any) -> str:
    """'2', '2.0', 2, 2.0 -> '2': CSV and Excel write the same grade differently."""
    text = str(v).strip()
    try:
        f = float(text)
    except ValueError:
        return text
    return str(int(f)) if f.is_integer() else text


def _typed(v: Any) -> Any:
    if _blank(v):
        return None
    text = str(v).strip()
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def _candidates(spec: Union[str, list[str], None]) -> list[str]:
    if spec is None:
        return []
    return [spec] if isinstance(spec, str) else list(spec)


def _norm_header(name: str) -> str:
    return re.sub(r"\s+", " ", str(name)).strip().lower()


def find_column(df: pd.DataFrame, spec: Union[str, list[str]], what: str, where: str) -> str:
    """The first of the candidate column names present (exact, then ignoring case and
    spacing); a clear error listing the columns the file has otherwise."""
    names = _candidates(spec)
    for n in names:
        if n in df.columns:
            return n
    lookup = {_norm_header(c): c for c in df.columns}
    for n in names:
        if _norm_header(n) in lookup:
            return lookup[_norm_header(n)]
    cols = [c for c in df.columns if not str(c).startswith("_")]
    raise DataError(f"{where}: missing column for {what}: expected {' or '.join(map(repr, names))}; the file has {cols}")


def _render(template: str, row: dict, extra: dict, where: str) -> str:
    def sub(m: re.Match) -> str:
        key = m.group(1)
        if key in extra:
            return str(extra[key])
        if key in row:
            return "" if _blank(row[key]) else str(row[key]).strip()
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
# tables


def check_inside(path: Path, root: Path, where: str, allow: bool = False) -> Path:
    """``path`` if it resolves (``..`` and symlinks followed) inside ``root``; else a DataError
    naming ``where`` and the path, before anything is read from it. ``allow`` is the
    manifest's ``allow_outside_root``."""
    if allow:
        return path
    resolved = Path(os.path.realpath(path))
    root_resolved = Path(os.path.realpath(root))
    if resolved != root_resolved and root_resolved not in resolved.parents:
        raise DataError(
            f"{where}: {path} resolves to {resolved}, outside the dataset root {root_resolved}; paths may not leave "
            "the root (set allow_outside_root: true in the manifest if the files are meant to live elsewhere)"
        )
    return path


def find_files(spec: Union[str, list[str], None], root: Path, where: str = "annotations", allow_outside: bool = False) -> list[Path]:
    """Candidates in order; the first that matches anything wins (a glob may match many).
    Every file found must lie inside ``root`` (:func:`check_inside`)."""
    for cand in _candidates(spec):
        if os.path.isabs(cand) and not allow_outside:
            raise DataError(f"{where}: {cand!r} is an absolute path; expected a path relative to the dataset root {root}")
        if any(ch in cand for ch in "*?"):
            hits = sorted(p for p in root.glob(cand) if p.is_file())
            if hits:
                return [check_inside(p, root, where, allow_outside) for p in hits]
        elif (root / cand).is_file():
            return [check_inside(root / cand, root, where, allow_outside)]
    return []


def table_format(path: Path, declared: str) -> str:
    """The file's extension decides between CSV and Excel, so one source can list both
    variants of a dataset (ODIR's data.xlsx or Kaggle's full_df.csv)."""
    suffix = path.suffix.lower()
    if suffix in (".xls", ".xlsx", ".xlsm"):
        return "excel"
    if suffix in (".csv", ".tsv", ".txt"):
        return "csv"
    return declared


def _clean_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Strip header whitespace (IDRiD's 'Risk of macular edema ') and drop the empty
    'Unnamed: n' columns a spreadsheet's stray cells leave behind."""
    df = df.rename(columns=lambda c: str(c).strip())
    drop = [c for c in df.columns if str(c).startswith("Unnamed:") and df[c].isna().all()]
    return df.drop(columns=drop)


_BOMS = ((b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"),
         (b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))


def text_encoding(path: Path, declared: str) -> str:
    """The codec to read ``path`` with. A declared codec is used as is; ``auto`` accepts
    UTF-8 (with or without BOM) and UTF-16/32 with a BOM, and refuses anything else with
    an error naming the file: guessing latin-1 turned a Greek (cp1253) file into garbage."""
    if declared != "auto":
        return declared
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 20)
    except OSError as err:
        raise DataError(f"annotation file {path} cannot be read ({err})") from None
    for bom, codec in _BOMS:
        if head.startswith(bom):
            return codec
    if head[:200].count(b"\x00") > len(head[:200]) // 4:
        raise DataError(
            f"annotation file {path}: looks like UTF-16/32 without a byte-order mark; set encoding: utf-16-le "
            "(or utf-16-be) on the source in the manifest"
        )
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 4:  # not just a character cut by the 1 MB window
            raise DataError(
                f"annotation file {path}: not UTF-8 (byte 0x{head[err.start]:02x} at offset {err.start}); set "
                "encoding: on the source in the manifest to the file's codec (e.g. cp1253 for Greek, cp1252 or "
                "latin-1 for Western European)"
            ) from None
    return "utf-8-sig"


def read_table(path: Path, fmt: str, spec: Union[SourceSpec, JoinSpec]) -> pd.DataFrame:
    """One annotation file -> DataFrame of strings, plus ``_row`` (spreadsheet row number)
    and ``_file``. Empty files and files without data rows are errors."""
    header_auto = spec.header == "auto"
    names = list(spec.names) or None
    try:
        if fmt == "csv":
            kwargs = dict(sep=spec.sep or ",", dtype=str, keep_default_na=False, na_values=[""], skipinitialspace=True)
            if header_auto or spec.header is False:
                kwargs.update(header=None, names=names)
            elif names:
                kwargs.update(header=0, names=names)
            encoding = text_encoding(path, getattr(spec, "encoding", "auto"))
            try:
                df = pd.read_csv(path, encoding=encoding, **kwargs)
            except UnicodeDecodeError as err:
                raise DataError(
                    f"annotation file {path}: not valid {encoding} text ({err.reason} at byte {err.start}); "
                    "set the source's encoding: in the manifest to the file's codec (e.g. cp1253, latin-1)"
                ) from None
        elif fmt == "excel":
            sheet = 0 if spec.sheet is None else spec.sheet
            header = None if (header_auto or spec.header is False) else 0
            with warnings.catch_warnings():  # pandas 3 deprecates xlrd; it still reads .xls
                warnings.filterwarnings("ignore", message=".*xlrd.*")
                df = pd.read_excel(path, sheet_name=sheet, dtype=str, header=header)
            if names:
                if len(names) > df.shape[1]:
                    raise DataError(f"{path}: names {names} lists more columns than the sheet has ({df.shape[1]})")
                df = df.iloc[:, : len(names)]
                df.columns = names
        else:
            raise DataError(f"{path}: unsupported table format {fmt!r}")
    except pd.errors.EmptyDataError:
        raise DataError(f"annotation file {path} is empty; expected a header row and one row per image") from None
    except DataError:
        raise
    except ValueError as err:
        if "Worksheet" in str(err) or "sheet" in str(err).lower():
            raise DataError(f"annotation file {path}: sheet {spec.sheet!r} not found ({err})") from None
        raise DataError(f"annotation file {path} cannot be read as {fmt}: {err}") from None
    except Exception as err:  # noqa: BLE001 -- xlrd/openpyxl raise many types for a corrupt file
        raise DataError(f"annotation file {path} cannot be read as {fmt}: {type(err).__name__}: {err}") from None
    df = _clean_columns(df)
    first_line = 2  # the header is row 1
    if header_auto and len(df):
        first = [str(v) for v in df.iloc[0].tolist() if not _blank(v)]
        if not any(os.path.splitext(v)[1].lower() in IMAGE_EXTENSIONS for v in first):
            df = df.iloc[1:].reset_index(drop=True)
        else:
            first_line = 1
    elif header_auto or spec.header is False:
        first_line = 1
    df = df.dropna(how="all").copy()
    if df.empty:
        raise DataError(f"annotation file {path} has a header but no data rows; expected one row per image")
    df["_row"] = df.index + first_line
    df["_file"] = str(path)
    return df


def melt_eyes(df: pd.DataFrame, wide: dict[str, dict[str, str]], where: str) -> pd.DataFrame:
    """One row per patient with left/right columns -> one row per eye (column ``_eye``)."""
    if not wide:
        return df
    parts = []
    for eye, mapping in wide.items():
        cols = {find_column(df, src, f"the {eye} eye's {dst!r}", where): dst for src, dst in mapping.items()}
        part = df.drop(columns=[c for c in cols.values() if c in df.columns and c not in cols]).rename(columns=cols)
        part["_eye"] = eye
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def _image_key(name: str, how: str) -> str:
    name = os.path.basename(str(name).strip())
    if how == "stem":
        stem, ext = os.path.splitext(name)
        name = stem if ext.lower() in IMAGE_EXTENSIONS else name
    return name.lower()


# ---------------------------------------------------------------------------------------
# rows -> records


class _RowError(DataError):
    """A problem with one row: raised, or skipped and counted under skip_bad."""


def _field_value(spec: Optional[FieldSpec], df_cols: dict[str, str], row: dict, where: str, what: str) -> Optional[str]:
    if spec is None:
        return None
    value = _cell(row, df_cols.get(what))
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
            cands = ", ".join(repr(c) for c in _candidates(s.annotations))
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
                f"{_candidates(j.annotations)} (needed for patient ids: splits must be by patient)"
            )
        other = pd.concat([melt_eyes(read_table(p, table_format(p, j.format), j), j.wide_eyes, f"{p}") for p in files], ignore_index=True)
        on = find_column(other, j.image_column, "join.image_column", f"{files[0]}")
        other = other.drop(columns=["_row", "_file"])
        if "_eye" in other.columns and "_eye" in df.columns:
            other = other.drop(columns=["_eye"])
        other["_key"] = other[on].map(lambda v: None if _blank(v) else _image_key(v, j.key))
        dup = other["_key"].dropna().duplicated()
        if dup.any():
            names = other["_key"].dropna()[dup].tolist()[:3]
            raise DataError(f"{files[0]}: image(s) {names} listed more than once in column {on!r}")
        img_col = find_column(df, self.s.image.column or "image", "image", str(f))
        df = df.copy()
        df["_key"] = df[img_col].map(lambda v: None if _blank(v) else _image_key(v, j.key))
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
            return self._npz_records()
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
                image = _cell(row, cols["image"])
                loc = f"{row['_file']} row {row['_row']}" + (f" ({cols['image']} {image!r})" if image else "")
            else:
                loc = f"{self.root / row['_file']}"
            try:
                if not _blank(row.get("_nomatch")):
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
        value = _cell(row, cols["image"])
        if value is None:
            raise _RowError(f"{loc}: column {cols['image']!r} (image) is empty; expected an image file name")
        base = Path(row["_file"]).parent if spec.relative_to == "annotations" else self.root
        extra = {"value": value, "stem": os.path.splitext(value)[0], "eye": row.get("_eye", "")}
        tried = []
        for template in _candidates(spec.template):
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
                v = _cell(row, col)
                raw[col] = v
                if v is None:
                    if lab.missing == "exclude":
                        self.report.excluded.append(f"{loc}: empty {col!r}")
                        return None
                    raise _RowError(f"{loc}: column {col!r} (class {c.name!r}) is empty; expected 0 or 1")
                code = _norm_code(v)
                if code not in ("0", "1"):
                    raise _RowError(f"{loc}: column {col!r} (class {c.name!r}) has {v!r}; expected 0 or 1")
                vec.append(int(code))
            out = self._check_empty(vec, raw, loc)
            return None if out is None else (*out, [])
        col = cols.get("label")
        raw = _cell(row, col)
        if raw is None:
            if lab.missing == "exclude":
                self.report.excluded.append(f"{loc}: empty label column {col!r}")
                return None
            raise _RowError(f"{loc}: column {col!r} (label) is empty; expected a label")
        if lab.keyword is not None:
            return self._keywords(raw, col, loc)
        if lab.codes:
            code = _norm_code(raw)
            if code not in lab.codes:
                raise _RowError(
                    f"{loc}: column {col!r} has unknown label code {raw!r}; expected one of {list(lab.codes)}"
                )
            target = lab.codes[code]
        else:
            target = _norm_code(raw)
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
            value = _cell(row, cols["split"])
            value = s.split_values.get(value, value) if value is not None else None
            if value not in SPLIT_VALUES:
                raise _RowError(f"{loc}: column {cols['split']!r} (split) has {value!r}; expected train, val or test (or test_camera)")
            split = value
        meta = {}
        for name, spec in s.meta.items():
            if isinstance(spec, str) and "{" in spec:
                extra = {"value": _cell(row, cols["image"]), "eye": row.get("_eye", "")}
                extra["stem"] = os.path.splitext(extra["value"] or "")[0]
                meta[name] = _render(spec, row, extra, f"{self.at}.meta.{name}")
            else:
                meta[name] = _typed(row.get(cols["meta:" + name]))
        if notes:
            meta["notes"] = notes
        return Record(path=str(path), label=label, raw_label=raw, patient_id=patient, eye=eye, text=text, split=split,
                      meta=meta, origin=loc)

    def _npz_records(self) -> list:
        s, m = self.s, self.m
        files = find_files(s.annotations, self.root, f"{self.at}.annotations", m.allow_outside_root)
        if not files:
            if s.optional:
                return []
            raise MissingFilesError(f"{self.at}.annotations: no file found under {self.root} matching {_candidates(s.annotations)}")
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
                        target = s.label.codes.get(_norm_code(raw), raw) if s.label.codes else int(raw)
                        if s.label.codes and _norm_code(raw) not in s.label.codes:
                            raise ValueError
                        label = m.class_index(target, "label")
                    except (ValueError, TypeError):
                        err = f"{loc}: unknown label code {raw!r}; expected one of {list(s.label.codes) or list(range(len(m.classes)))}"
                        if not self.skip_bad:
                            raise DataError(err) from None
                        self.report.skipped.append(err)
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
