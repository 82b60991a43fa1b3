"""Dataset manifests: one YAML file per dataset says how to read it, so adding a dataset
means writing a manifest, never code.

A manifest names the annotation files and image paths (relative to the dataset root),
how labels are read (a code column, 0/1 multi-hot columns, or diagnostic keywords mapped
to classes), the classes in order with their knowledge-base keys, the task, the metric,
where patient ids and eyes come from, and how to split. ``data_manifests/README.md``
documents every field; this module parses and validates them.

Validation is strict on purpose: an unknown key or a wrong type is an error naming the
manifest file and the field (``odir5k.yaml: sources[0].label.keyword.rules[3].labl:
unknown field; did you mean 'label'?``) instead of a setting that silently does nothing.
The type checking is the one configs use (:func:`fundus_lab.schema.coerce`, strict mode).
"""

from __future__ import annotations

import difflib
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from fundus_lab.config import PACKAGE_ROOT, ConfigError
from fundus_lab.names import check_name
from fundus_lab.schema import NOT_FROM_FILE, SchemaError, build_dataclass, coerce, short_repr

# the shipped manifests live inside the package (``data_manifests/`` at the checkout root links
# to them) so a plain install has them; FUNDUS_LAB_MANIFESTS points elsewhere (a site's own collection)
MANIFEST_DIR = Path(os.environ.get("FUNDUS_LAB_MANIFESTS", PACKAGE_ROOT / "data_manifests"))

TASKS = ("multiclass", "multilabel", "ordinal", "binary")
SPLITS = ("train", "val", "test")
# every value an official split may hold: SPLITS plus the held-out-camera test set of the
# synthetic benchmark (in-domain "test" = training cameras, unseen patients)
SPLIT_VALUES = (*SPLITS, "test_camera")
FORMATS = ("csv", "excel", "npz", "filename-pattern", "folder")
# metric names the evaluation understands (a typo in a manifest fails at load)
METRICS = (
    "accuracy", "balanced_accuracy", "macro_f1", "auc", "map", "quadratic_weighted_kappa",
    "cohen_kappa", "odir_score", "sensitivity", "specificity",
)

StrOrList = Union[str, list[str]]


class ManifestError(ValueError):
    """A manifest that does not fit the schema; the message names the file and the field."""


class StrictLoader(yaml.SafeLoader):
    """YAML for manifests: no anchors/aliases and no duplicate keys.

    Aliases let an 840-byte file expand to gigabytes ("billion laughs"), and a manifest
    never needs them; a key given twice would silently keep the last value.
    """

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(
                None, None, f"alias *{event.anchor} is not allowed in a manifest (write the value out)", event.start_mark
            )
        node = super().compose_node(parent, index)
        if getattr(node, "anchor", None):
            raise yaml.constructor.ConstructorError(
                None, None, f"anchor &{node.anchor} is not allowed in a manifest (write the value out)", node.start_mark
            )
        return node

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # SafeLoader reports unhashable keys itself
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"key {key!r} is given twice (first on line {seen[key].line + 1}); the last would silently win",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str):
    """Parse manifest YAML with :class:`StrictLoader`."""
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 -- StrictLoader is a SafeLoader


# ---------------------------------------------------------------------------------------
# schema


@dataclass
class ClassSpec:
    """One class, in the order of the label vector.

    ``key`` is a knowledge-base key (``fundus_lab.knowledge``) that supplies zero-shot
    prompts; ``prompts`` adds the manifest's own (required where there is no key, e.g.
    RFMiD's rarer conditions). ``column`` is the 0/1 column of multi-hot annotations.
    """

    name: str
    key: Optional[str] = None
    prompts: list[str] = field(default_factory=list)
    column: Optional[str] = None


@dataclass
class KeywordRule:
    """``match`` is a regular expression searched in one lower-cased keyword; ``label``
    the class it means, or null for notes that are not diseases (``lens dust``)."""

    match: str
    label: Optional[str] = None
    note: Optional[str] = None


@dataclass
class KeywordSpec:
    """Free-text diagnostic keywords -> classes (ODIR's per-eye keywords)."""

    separators: list[str] = field(default_factory=lambda: [",", "，", ";", "；", "、"])
    rules: list[KeywordRule] = field(default_factory=list)
    # a keyword no rule matches: "error", or the name of the class it falls into
    # (ODIR defines O as "any other abnormality"); falls are counted and reported
    unknown: str = "error"


@dataclass
class LabelSpec:
    """How one row becomes a label: ``codes`` (raw value -> class name or index) read
    from ``column``; or ``multi_hot`` (each class's own 0/1 ``column``); or ``keyword``."""

    column: Optional[StrOrList] = None
    codes: dict[str, Union[str, int]] = field(default_factory=dict)
    multi_hot: bool = False
    keyword: Optional[KeywordSpec] = None
    missing: Literal["error", "exclude"] = "error"  # an empty label cell
    empty: Literal["error", "exclude", "keep"] = "error"  # no class after keyword mapping


@dataclass
class ImageSpec:
    """Where the image of a row is: ``template`` rendered with the row's columns
    (``{value}`` = the ``column`` cell, ``{stem}`` = it without extension); several
    templates are tried in order. ``extensions`` lets a name with a missing or differently
    cased extension find its file (MESSIDOR-2 mixes .png, .jpg, .JPG, .tif)."""

    column: Optional[StrOrList] = None
    template: StrOrList = "{value}"
    extensions: list[str] = field(default_factory=list)
    relative_to: Literal["root", "annotations"] = "root"
    fov_crop: bool = True


@dataclass
class FieldSpec:
    """A per-record string (patient id, eye, text): a ``column`` and optionally a regular
    expression ``pattern`` whose first group (or group ``value``) is the value, and
    ``values`` to map raw values (``L`` -> ``left``)."""

    column: Optional[StrOrList] = None
    pattern: Optional[str] = None
    values: dict[str, str] = field(default_factory=dict)


@dataclass
class JoinSpec:
    """A second table merged into the rows by image name (MESSIDOR-2's exam pairs give
    patient and eye). ``image_column`` is the joined table's image-name column; names match without
    extension and case (``key: stem``) or exactly (``key: name``)."""

    annotations: StrOrList
    image_column: str
    format: Literal["csv", "excel"] = "csv"
    sep: Optional[str] = None
    header: Union[bool, Literal["auto"]] = True
    names: list[str] = field(default_factory=list)
    sheet: Optional[Union[str, int]] = None
    wide_eyes: dict[str, dict[str, str]] = field(default_factory=dict)
    key: Literal["stem", "name"] = "stem"
    encoding: str = "auto"


@dataclass
class SourceSpec:
    """One annotation file (or glob of files, or glob of images) producing records."""

    annotations: Optional[StrOrList] = None  # candidates tried in order; globs allowed
    format: Literal["csv", "excel", "npz", "filename-pattern", "folder"] = "csv"
    split: Optional[Literal["train", "val", "test"]] = None  # official split of every row
    split_column: Optional[str] = None  # official split per row
    split_values: dict[str, str] = field(default_factory=dict)
    optional: bool = False  # absent files are fine (e.g. test labels released later)
    # csv / excel
    sep: Optional[str] = None
    header: Union[bool, Literal["auto"]] = True
    names: list[str] = field(default_factory=list)
    sheet: Optional[Union[str, int]] = None
    # "auto": UTF-8 (BOM or not) or UTF-16/32 with a BOM, anything else is an error asking
    # for an explicit codec name (cp1253, latin-1, ...): a wrong guess garbles text silently
    encoding: str = "auto"
    # filename-pattern / folder: regex over the path relative to the root, named groups
    pattern: Optional[str] = None
    # npz: array names, "{split}" replaced by each of npz_splits
    npz_images: str = "{split}_images"
    npz_labels: str = "{split}_labels"
    npz_splits: list[str] = field(default_factory=lambda: ["train", "val", "test"])
    # one row per patient with both eyes -> one row per eye: eye -> {column: new name}
    wide_eyes: dict[str, dict[str, str]] = field(default_factory=dict)
    drop_duplicates: bool = False  # same image listed twice (Kaggle ODIR full_df.csv)
    join: Optional[JoinSpec] = None
    label: LabelSpec = field(default_factory=LabelSpec)
    image: ImageSpec = field(default_factory=ImageSpec)
    patient: Optional[FieldSpec] = None
    eye: Optional[FieldSpec] = None
    text: Optional[FieldSpec] = None
    meta: dict[str, StrOrList] = field(default_factory=dict)
    # patient ids are stripped; "insensitive" also treats ids differing only in case as one
    # patient (p3 / P3), so the eyes of one person cannot be split apart; "sensitive" keeps them apart
    patient_case: Literal["insensitive", "sensitive"] = "insensitive"


@dataclass
class SplitSpec:
    """Rows without an official split are split here: seeded, stratified by label, and
    grouped by patient so that no patient's eyes land in two splits."""

    fractions: dict[str, float] = field(default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1})
    seed: int = 0
    stratify: bool = True


# fields a manifest may set once at the top level as defaults for every source
SOURCE_DEFAULTS = ("format", "label", "image", "patient", "eye", "text", "meta", "encoding", "patient_case")


@dataclass
class Manifest:
    """A parsed, validated manifest (``path`` is the file it came from)."""

    name: str
    task: Literal["multiclass", "multilabel", "ordinal", "binary"]
    classes: list[ClassSpec]
    sources: list[SourceSpec]
    metric: StrOrList = "accuracy"
    description: str = ""
    url: Optional[str] = None
    citation: Optional[str] = None
    split: SplitSpec = field(default_factory=SplitSpec)
    synthetic: bool = False
    # annotation and image paths must resolve (symlinks followed) inside the dataset root;
    # true allows a dataset whose files are symlinked from elsewhere
    allow_outside_root: bool = False
    path: Optional[Path] = field(default=None, metadata=NOT_FROM_FILE)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def metrics(self) -> list[str]:
        return [self.metric] if isinstance(self.metric, str) else list(self.metric)

    def class_index(self, label: Union[str, int], where: str = "") -> int:
        """A class name (or short column name, or index) -> its index in ``classes``."""
        if isinstance(label, int) and not isinstance(label, bool):
            if 0 <= label < len(self.classes):
                return label
        else:
            text = str(label).strip()
            for i, c in enumerate(self.classes):
                if text == c.name or (c.column is not None and text == c.column):
                    return i
            if re.fullmatch(r"\d+", text) and int(text) < len(self.classes):
                return int(text)
        raise ManifestError(
            f"{self.path}: {where}: {label!r} is not a class; expected one of {self.class_names}"
        )


# ---------------------------------------------------------------------------------------
# dataclass checking: the shared schema coercer of fundus_lab.schema, in manifest words


def _schema_error(err: SchemaError, where: str) -> ManifestError:
    """``where: sources[0].label.colum: unknown field; did you mean 'column'? (known: ...)``."""
    return ManifestError(f"{where}: {err}")


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------
# loading


def available_manifests() -> list[str]:
    """Names of the manifests shipped in ``data_manifests/``."""
    return sorted(p.stem for p in MANIFEST_DIR.glob("*.yaml"))


def resolve_manifest_path(name_or_path: Union[str, Path]) -> Path:
    """A manifest name (``aptos2019``) -> ``data_manifests/aptos2019.yaml``; a path is
    taken as is (a directory means its ``manifest.yaml``)."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    looks_like_path = path.suffix in (".yaml", ".yml") or "/" in text or "\\" in text
    if looks_like_path or path.exists():
        if path.is_dir():
            path = path / "manifest.yaml"
        if not path.is_file():
            raise ManifestError(f"manifest file {path} does not exist")
        return path
    named = MANIFEST_DIR / f"{text}.yaml"
    if named.is_file():
        return named
    known = available_manifests()
    close = difflib.get_close_matches(text, known, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ManifestError(
        f"no manifest named {text!r} in {MANIFEST_DIR}; {hint}known: {', '.join(known)} "
        "(or pass the path of a manifest .yaml file)"
    )


def parse_manifest(data: Any, path: Union[str, Path] = "<manifest>") -> Manifest:
    """Validate a manifest mapping (as read from YAML) and return a :class:`Manifest`."""
    where = str(path)
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: expected a mapping at the top level, got {type(data).__name__}")
    data = dict(data)
    defaults = {k: data.pop(k) for k in SOURCE_DEFAULTS if k in data}
    # validate the defaults on their own first, so an error names the top-level field
    hints = typing.get_type_hints(SourceSpec)
    try:
        for key, value in defaults.items():
            coerce(value, hints[key], (key,))
    except SchemaError as err:
        raise _schema_error(err, where) from None
    sources = data.get("sources")
    if not isinstance(sources, list) or not sources:
        raise ManifestError(f"{where}: sources: expected a non-empty list of annotation sources")
    merged = []
    for i, src in enumerate(sources):
        if not isinstance(src, dict):
            raise ManifestError(f"{where}: sources[{i}]: expected a mapping, got {short_repr(src)}")
        merged.append(_merge(defaults, src))
    data["sources"] = merged
    try:
        manifest = build_dataclass(Manifest, data)
    except SchemaError as err:
        raise _schema_error(err, where) from None
    manifest.path = Path(path) if path != "<manifest>" else None
    _check_semantics(manifest, where)
    return manifest


def _check_semantics(m: Manifest, where: str) -> None:
    """Cross-field rules the types alone cannot express."""
    try:  # the name becomes file names (image cache, split files): one safe path component
        check_name(m.name, "name:")
    except ConfigError as err:
        raise ManifestError(f"{where}: {err}") from None
    if not m.classes:
        raise ManifestError(f"{where}: classes: expected at least one class")
    names = m.class_names
    if len(set(names)) != len(names):
        raise ManifestError(f"{where}: classes: duplicate class names in {names}")
    if m.task == "binary" and len(names) != 2:
        raise ManifestError(f"{where}: task: binary needs exactly 2 classes, got {len(names)}")
    for i, c in enumerate(m.classes):
        if c.key is None and not c.prompts:
            raise ManifestError(
                f"{where}: classes[{i}] ({c.name!r}): needs a knowledge 'key' or inline 'prompts' "
                "(zero-shot evaluation describes every class)"
            )
    for metric in m.metrics:
        if metric not in METRICS:
            close = difflib.get_close_matches(metric, METRICS, n=2)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ManifestError(f"{where}: metric: unknown metric {metric!r}{hint} (known: {', '.join(METRICS)})")
    fr = m.split.fractions
    if not fr or set(fr) - set(SPLITS) or any(v < 0 for v in fr.values()) or abs(sum(fr.values()) - 1) > 1e-6:
        raise ManifestError(
            f"{where}: split.fractions: expected non-negative fractions of {list(SPLITS)} summing to 1, got {fr}"
        )
    for i, s in enumerate(m.sources):
        at = f"{where}: sources[{i}]"
        lab = s.label
        modes = sum([bool(lab.codes) or (lab.column is not None and not lab.keyword), lab.multi_hot, lab.keyword is not None])
        if s.format == "npz":
            if lab.multi_hot or lab.keyword:
                raise ManifestError(f"{at}.label: npz labels are integer codes; multi_hot/keyword do not apply")
        elif modes != 1 and not (modes == 0 and s.format == "folder"):  # folder: label = folder name
            raise ManifestError(
                f"{at}.label: give exactly one of column(+codes), multi_hot: true, or keyword (got {modes})"
            )
        if lab.multi_hot and m.task != "multilabel":
            raise ManifestError(f"{at}.label.multi_hot: needs task multilabel, not {m.task}")
        if lab.keyword is not None:
            if lab.column is None:
                raise ManifestError(f"{at}.label.keyword: needs label.column (the keyword text)")
            for j, rule in enumerate(lab.keyword.rules):
                _check_regex(rule.match, f"{at}.label.keyword.rules[{j}].match")
                if rule.label is not None:
                    m.class_index(rule.label, f"sources[{i}].label.keyword.rules[{j}].label")
            if lab.keyword.unknown != "error":
                m.class_index(lab.keyword.unknown, f"sources[{i}].label.keyword.unknown")
        for code, target in lab.codes.items():
            m.class_index(target, f"sources[{i}].label.codes.{code}")
        if s.annotations is None:
            raise ManifestError(f"{at}.annotations: required (a file, a list of candidates, or a glob)")
        if s.format == "filename-pattern" and not s.pattern:
            raise ManifestError(f"{at}.pattern: required for format filename-pattern (a regex with named groups)")
        if s.pattern:
            _check_regex(s.pattern, f"{at}.pattern")
        if s.encoding != "auto":
            import codecs

            try:
                codecs.lookup(s.encoding)
            except LookupError:
                raise ManifestError(f"{at}.encoding: unknown codec {s.encoding!r}; expected auto or a codec name such as utf-8, cp1253, latin-1") from None
        for fname in ("patient", "eye", "text"):
            spec = getattr(s, fname)
            if spec is not None and spec.pattern:
                _check_regex(spec.pattern, f"{at}.{fname}.pattern")
        for eye in s.wide_eyes:
            if eye not in ("left", "right"):
                raise ManifestError(f"{at}.wide_eyes.{eye}: expected the keys left and right")
        if lab.multi_hot:
            for c in m.classes:
                if c.column is None:
                    raise ManifestError(f"{where}: classes ({c.name!r}).column: needed by sources[{i}].label.multi_hot")


def _check_regex(text: str, where: str) -> None:
    try:
        re.compile(text)
    except re.error as err:
        raise ManifestError(f"{where}: bad regular expression {text!r}: {err}") from None


def load_manifest(name_or_path: Union[str, Path]) -> Manifest:
    """Load and validate a manifest by name (``data_manifests/<name>.yaml``) or path."""
    path = resolve_manifest_path(name_or_path)
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ManifestError(f"{path}: not UTF-8 text ({err}); save the manifest as UTF-8") from None
    except yaml.YAMLError as err:
        raise ManifestError(f"{path}: not valid YAML: {err}") from None
    return parse_manifest(data, path)
