"""Annotation files as a user downloads them -> DataFrames: CSV and Excel (its encoding, sheet
and header row found or refused by name), found by name or glob inside the dataset root, one
row per patient melted to one row per eye, and the cell values in them.

The table layouts of :mod:`fundus_lab.data.readers`, in their own module: reading a file is
separate from turning its rows into records. Errors name the file and what was expected.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import pandas as pd

from fundus_lab.data.images import IMAGE_EXTENSIONS, DataError
from fundus_lab.data.manifest import JoinSpec, SourceSpec


# ---------------------------------------------------------------------------------------
# cells


def blank(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def cell(row: dict, col: Optional[str]) -> Optional[str]:
    if col is None:
        return None
    v = row.get(col)
    return None if blank(v) else str(v).strip()


def norm_code(v: Any) -> str:
    """'2', '2.0', 2, 2.0 -> '2': CSV and Excel write the same grade differently."""
    text = str(v).strip()
    try:
        f = float(text)
    except ValueError:
        return text
    return str(int(f)) if f.is_integer() else text


def typed(v: Any) -> Any:
    if blank(v):
        return None
    text = str(v).strip()
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


# ---------------------------------------------------------------------------------------
# columns and files


def candidates(spec: Union[str, list[str], None]) -> list[str]:
    if spec is None:
        return []
    return [spec] if isinstance(spec, str) else list(spec)


def _norm_header(name: str) -> str:
    return re.sub(r"\s+", " ", str(name)).strip().lower()


def find_column(df: pd.DataFrame, spec: Union[str, list[str]], what: str, where: str) -> str:
    """The first of the candidate column names present (exact, then ignoring case and
    spacing); a clear error listing the columns the file has otherwise."""
    names = candidates(spec)
    for n in names:
        if n in df.columns:
            return n
    lookup = {_norm_header(c): c for c in df.columns}
    for n in names:
        if _norm_header(n) in lookup:
            return lookup[_norm_header(n)]
    cols = [c for c in df.columns if not str(c).startswith("_")]
    raise DataError(f"{where}: missing column for {what}: expected {' or '.join(map(repr, names))}; the file has {cols}")


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
    for cand in candidates(spec):
        if os.path.isabs(cand) and not allow_outside:
            raise DataError(f"{where}: {cand!r} is an absolute path; expected a path relative to the dataset root {root}")
        if any(ch in cand for ch in "*?"):
            hits = sorted(p for p in root.glob(cand) if p.is_file())
            if hits:
                return [check_inside(p, root, where, allow_outside) for p in hits]
        elif (root / cand).is_file():
            return [check_inside(root / cand, root, where, allow_outside)]
    return []


# ---------------------------------------------------------------------------------------
# reading a table


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
        first = [str(v) for v in df.iloc[0].tolist() if not blank(v)]
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


def image_key(name: str, how: str) -> str:
    name = os.path.basename(str(name).strip())
    if how == "stem":
        stem, ext = os.path.splitext(name)
        name = stem if ext.lower() in IMAGE_EXTENSIONS else name
    return name.lower()
