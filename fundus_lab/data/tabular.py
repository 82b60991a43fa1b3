"""Datasets without a hand-written manifest: a labelled CSV, or a folder per class.

Both functions return a manifest mapping (the schema of ``data_manifests/README.md``), so
the data still flows one way (manifest -> dataset) and the result can be written out as
YAML, edited and reused:

    m = manifest_from_csv("labels.csv", image_column="file", label_column="grade", task="ordinal")
    m = manifest_from_folder("/data/refuge/Training400")        # <root>/<class>/<image>
    ds = open_dataset(parse_manifest(m, "labels.csv"), root=..., split="train")

Classes are the distinct labels (numbers in numeric order, else text in sorted order);
each class's zero-shot prompts default to its name, and a name that is a knowledge-base
class (its key, name or a synonym: "glaucoma", "Cataract") also gets that class's
knowledge prompts. ``fundus-lab manifest init labels.csv --image-column ... --label-column
...`` (:func:`fundus_lab.cli.manifest_main`) writes the manifest as YAML for editing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence, Union

import pandas as pd
import yaml

from fundus_lab import knowledge
from fundus_lab.data.manifest import TASKS, parse_manifest

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}


class TabularError(ValueError):
    """A CSV or folder that cannot become a manifest; the message names the file and field."""


def _knowledge_key(name: str) -> Optional[str]:
    """The knowledge-base class whose key, name or synonym is ``name`` (case-insensitive)."""
    wanted = re.sub(r"[\s_-]+", " ", name.strip().lower())
    for key in knowledge.class_keys():
        entry = knowledge.entry(key)
        names = [key.replace("_", " "), entry.get("name", "")] + list(entry.get("synonyms", []) or [])
        if wanted in {re.sub(r"[\s_-]+", " ", str(n).lower()) for n in names}:
            return key
    return None


def _class_specs(names: Sequence[str], keys: Optional[dict] = None) -> list[dict]:
    out = []
    for name in names:
        key = (keys or {}).get(name, _knowledge_key(name))
        spec = {"name": name, "prompts": [name]}
        if key:
            spec = {"name": name, "key": key, "prompts": [name]}
        out.append(spec)
    return out


def _sorted_labels(values: Sequence[str]) -> list[str]:
    """Distinct labels: numeric order when every label is a number, else text order."""
    uniq = sorted(set(values))
    try:
        return sorted(uniq, key=float)
    except ValueError:
        return uniq


def _infer_task(classes: Sequence[str], multilabel: bool) -> str:
    if multilabel:
        return "multilabel"
    return "binary" if len(classes) == 2 else "multiclass"


def _read_csv(csv: Path, sep: str) -> pd.DataFrame:
    if not csv.is_file():
        raise TabularError(f"{csv}: no such CSV file")
    try:
        df = pd.read_csv(csv, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise TabularError(f"{csv}: not a readable CSV ({err})") from None
    df.columns = [str(c).strip() for c in df.columns]
    if df.empty:
        raise TabularError(f"{csv}: no rows")
    return df


def _need_column(df: pd.DataFrame, column: Optional[str], what: str, csv: Path) -> None:
    if column is not None and column not in df.columns:
        raise TabularError(f"{csv}: {what}={column!r} is not a column; the columns are {list(df.columns)}")


def manifest_from_csv(
    csv: Union[str, Path],
    image_column: str,
    label_column: str,
    root: Union[str, Path, None] = None,
    task: Optional[str] = None,
    *,
    name: Optional[str] = None,
    sep: str = ",",
    label_separator: Optional[str] = None,
    patient_column: Optional[str] = None,
    eye_column: Optional[str] = None,
    text_column: Optional[str] = None,
    split_column: Optional[str] = None,
    keys: Optional[dict] = None,
    fractions: Optional[dict] = None,
    seed: int = 0,
) -> dict:
    """A manifest mapping for a CSV with one row per image.

    Args:
        csv: the table; ``image_column`` holds image paths relative to ``root`` (default:
            the CSV's folder), with or without an extension.
        label_column: the label of each row; with ``label_separator`` (e.g. ``"|"``) a cell
            lists several class names and the task is ``multilabel``.
        task: ``multiclass`` | ``ordinal`` | ``binary`` | ``multilabel``; default: binary for
            two classes, multilabel with a separator, else multiclass (pass ``ordinal`` for
            grades: it switches evaluation to quadratic weighted kappa).
        patient_column, eye_column, text_column: optional columns (splits are by patient
            when there is one; text becomes the report).
        split_column: an official split per row (values train/val/test, or
            training/validation/testing); else a seeded stratified split by ``fractions``.
        keys: {class name: knowledge key} overriding the automatic match.
    """
    csv = Path(csv)
    df = _read_csv(csv, sep)
    for col, what in ((image_column, "image_column"), (label_column, "label_column"), (patient_column, "patient_column"),
                      (eye_column, "eye_column"), (text_column, "text_column"), (split_column, "split_column")):
        _need_column(df, col, what, csv)
    labels = df[label_column].str.strip()
    blank = labels == ""
    if blank.all():
        raise TabularError(f"{csv}: column {label_column!r} is empty on every row")
    multilabel = label_separator is not None or task == "multilabel"
    if multilabel:
        if label_separator is None:
            raise TabularError(f"{csv}: task multilabel from one column needs label_separator (e.g. '|')")
        values = [v.strip() for cell in labels[~blank] for v in cell.split(label_separator) if v.strip()]
    else:
        values = list(labels[~blank])
    classes = _sorted_labels(values)
    task = task or _infer_task(classes, multilabel)
    if task not in TASKS:
        raise TabularError(f"task={task!r}; expected one of {TASKS}")
    if task == "binary" and len(classes) != 2:
        raise TabularError(f"{csv}: task binary needs 2 distinct labels in {label_column!r}, found {classes}")
    if len(classes) < 2:
        raise TabularError(f"{csv}: column {label_column!r} has a single label {classes}; nothing to classify")

    root_path = Path(root) if root is not None else csv.parent
    try:
        annotations = csv.resolve().relative_to(root_path.resolve()).as_posix()
    except ValueError:
        annotations = str(csv.resolve())
    if multilabel:
        label = {"column": label_column, "keyword": {
            "separators": [label_separator],
            "rules": [{"match": f"^{re.escape(c.lower())}$", "label": c} for c in classes],
        }, "missing": "exclude"}
    else:
        label = {"column": label_column, "codes": {c: i for i, c in enumerate(classes)}, "missing": "exclude"}
    source: dict = {
        "annotations": annotations,
        "format": "csv",
        "image": {"column": image_column, "template": "{value}", "extensions": list(IMAGE_EXTENSIONS)},
        "label": label,
    }
    if sep != ",":
        source["sep"] = sep
    for field, col in (("patient", patient_column), ("eye", eye_column), ("text", text_column)):
        if col is not None:
            source[field] = {"column": col}
    if eye_column is not None:
        source["eye"]["values"] = _eye_values(df[eye_column])
    if split_column is not None:
        source["split_column"] = split_column
        source["split_values"] = _split_values(df[split_column], csv, split_column)
    manifest = {
        "name": name or csv.stem,
        "description": f"made by fundus_lab.data.tabular from {csv.name}; edit classes, keys and prompts as needed",
        "task": task,
        "classes": _class_specs(classes, keys),
        "sources": [source],
        "split": {"fractions": fractions or {"train": 0.7, "val": 0.1, "test": 0.2}, "seed": int(seed)},
    }
    if task == "ordinal":
        manifest["metric"] = ["quadratic_weighted_kappa", "accuracy"]
    return manifest


def _eye_values(col: pd.Series) -> dict:
    known = {"l": "left", "left": "left", "os": "left", "r": "right", "right": "right", "od": "right"}
    return {v: known[v.strip().lower()] for v in sorted(set(col)) if v.strip().lower() in known}


def _split_values(col: pd.Series, csv: Path, column: str) -> dict:
    out, bad = {}, []
    for v in sorted(set(col)):
        mapped = SPLIT_FOLDERS.get(v.strip().lower())
        if mapped is None:
            bad.append(v)
        else:
            out[v] = mapped
    if bad:
        raise TabularError(f"{csv}: split_column {column!r} has values {bad}; expected train/val/test "
                           f"(or {sorted(SPLIT_FOLDERS)})")
    return out


def manifest_from_folder(
    root: Union[str, Path],
    task: Optional[str] = None,
    *,
    name: Optional[str] = None,
    keys: Optional[dict] = None,
    fractions: Optional[dict] = None,
    seed: int = 0,
) -> dict:
    """A manifest mapping for ``root/<class>/<image>`` (torchvision's ImageFolder layout),
    or ``root/<split>/<class>/<image>`` when the top folders are train/val/test."""
    root = Path(root)
    if not root.is_dir():
        raise TabularError(f"{root}: not a folder")
    top = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_layout = bool(top) and all(p.name.lower() in SPLIT_FOLDERS for p in top)
    class_dirs = [c for p in top for c in p.iterdir() if c.is_dir()] if split_layout else top
    images = [f for d in class_dirs for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
    if not images:
        raise TabularError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in class subfolders "
                           f"(expected {root}/<class>/<image>{' or <split>/<class>/<image>' if not split_layout else ''})")
    classes = _sorted_labels([f.parent.name for f in images])
    if len(classes) < 2:
        raise TabularError(f"{root}: a single class folder {classes}; need one folder per class (at least 2)")
    task = task or _infer_task(classes, False)
    if task not in TASKS or task == "multilabel":
        raise TabularError(f"task={task!r}; a folder per class gives multiclass, ordinal or binary")
    classes_re = "|".join(re.escape(c) for c in classes)
    sources = []
    for ext in sorted({f.suffix for f in images}):  # one source per extension: a list of globs stops at the first
        glob = f"*/*/*{ext}" if split_layout else f"*/*{ext}"
        pattern = f"(?P<folder>{classes_re})/(?P<file>[^/]+)$"
        if split_layout:
            splits = "|".join(re.escape(p.name) for p in top)
            pattern = f"^(?P<split>{splits})/" + pattern
        src = {"annotations": glob, "format": "folder", "pattern": pattern,
               "label": {"column": "folder", "codes": {c: i for i, c in enumerate(classes)}}}
        if split_layout:
            src["split_column"] = "split"
            src["split_values"] = {p.name: SPLIT_FOLDERS[p.name.lower()] for p in top}
        sources.append(src)
    return {
        "name": name or root.name,
        "description": f"made by fundus_lab.data.tabular from the class folders of {root}; edit as needed",
        "task": task,
        "classes": _class_specs(classes, keys),
        "sources": sources,
        "split": {"fractions": fractions or {"train": 0.7, "val": 0.1, "test": 0.2}, "seed": int(seed)},
    }


def table_manifest(path: Union[str, Path], image_column: Optional[str] = None, label_column: Optional[str] = None,
                   root: Union[str, Path, None] = None, **kwargs):
    """A parsed :class:`~fundus_lab.data.manifest.Manifest` for a ``.csv`` path or a folder
    without ``manifest.yaml``; None for anything else (a manifest name or YAML path).

    This is the dispatch ``open_dataset`` uses for plain tables and image folders.
    """
    p = Path(path)
    if p.suffix.lower() in (".csv", ".tsv"):
        if image_column is None or label_column is None:
            raise TabularError(f"{p}: a CSV needs image_column= and label_column= (or write a manifest with "
                               f"`fundus-lab manifest init {p.name} --image-column ... --label-column ...`)")
        sep = kwargs.pop("sep", "\t" if p.suffix.lower() == ".tsv" else ",")
        return parse_manifest(manifest_from_csv(p, image_column, label_column, root, sep=sep, **kwargs), p)
    if p.is_dir() and not (p / "manifest.yaml").is_file():
        return parse_manifest(manifest_from_folder(p, **kwargs), p / "manifest.yaml")
    return None


def dump_manifest(manifest: dict, out: Union[str, Path], source: str = "") -> Path:
    """Write ``manifest`` as YAML with a header saying where it came from and what to edit."""
    out = Path(out)
    header = (
        f"# Written by `fundus-lab manifest init`{' from ' + source if source else ''}.\n"
        "# Check the task (ordinal for grades), give classes a knowledge `key` for richer zero-shot\n"
        "# prompts, and add patient ids if the data has both eyes of a person. Schema:\n"
        "# data_manifests/README.md\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + yaml.safe_dump(manifest, sort_keys=False, allow_unicode=True, width=100))
    return out


__all__ = ["TabularError", "dump_manifest", "manifest_from_csv", "manifest_from_folder", "table_manifest"]
