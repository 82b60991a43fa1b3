"""Typed values from YAML and the command line: the schema coercer configs and manifests share.

Configs (:mod:`fundus_lab.config`) and dataset manifests (:mod:`fundus_lab.data.manifest`)
check every value against the annotations of their dataclasses with one piece of code:
:func:`coerce` and :func:`build_dataclass` (YAML values, strict or lenient), :func:`coerce_text`
(the text of a ``key=value`` override, :class:`OverrideText`), and :func:`to_dict` back to plain
values. It is a module of its own so that the config schema (the dataclasses and how a run's
config is loaded) reads on its own, and it imports nothing of the package. It raises
:class:`SchemaError`, whose parts (where, what was expected, what came) each caller turns into
its own message: ``ConfigError`` in :mod:`fundus_lab.config`, ``ManifestError`` in
:mod:`fundus_lab.data.manifest`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, Mapping, Sequence

import yaml


class ConfigError(ValueError):
    """A config file, override or name that does not fit the schema (raised by :mod:`fundus_lab.config`
    and :mod:`fundus_lab.names`; defined here, at the ground, so both can raise it)."""

# metadata of a dataclass field that a file may not set (e.g. Manifest.path, filled in by the loader)
NOT_FROM_FILE = {"from_file": False}


class SchemaError(ValueError):
    """A value that does not fit its dataclass schema, with where and why kept as data.

    ``problem`` is ``"type"`` (a wrong type or value; ``expected`` is the annotation),
    ``"finite"`` (a float that is inf or nan),
    ``"length"`` (a fixed-size tuple of the wrong size), ``"unknown"`` (a key the
    dataclass ``expected`` lacks; ``known`` lists its fields) or ``"missing"`` (required
    fields ``missing``). ``path`` locates the value from the root: field names and list
    indices, ``("sources", 0, "label", "column")``. The text is built only when shown, so
    the failed tries of a ``Union`` cost nothing.
    """

    def __init__(self, problem: str, path: tuple = (), expected: Any = None, value: Any = None, *,
                 key: Any = None, known: tuple = (), missing: tuple = ()):
        super().__init__(problem)
        self.problem, self.path, self.expected, self.value = problem, tuple(path), expected, value
        self.key, self.known, self.missing = key, tuple(known), tuple(missing)

    @property
    def field(self) -> str:
        """The path as written in a file: ``sources[0].label.column``."""
        return field_path(self.path)

    def reason(self) -> str:
        if self.problem == "unknown":
            if isinstance(self.key, bool):
                hint = "; YAML reads on/off/yes/no as booleans: quote the key"
            else:
                hint = did_you_mean(difflib.get_close_matches(str(self.key), list(self.known), n=3, cutoff=0.6))
            return f"unknown field{hint} (known: {', '.join(self.known)})"
        if self.problem == "missing":
            return f"missing required field(s) {list(self.missing)}"
        if self.problem == "length":
            return f"expected {len(typing.get_args(self.expected))} values, got {short_repr(self.value)}"
        if self.problem == "finite":
            return f"expected a finite number, got {short_repr(self.value)}"
        return f"expected {describe_type(self.expected)}, got {short_repr(self.value)}"

    def __str__(self) -> str:
        return f"{self.field}: {self.reason()}" if self.path else self.reason()


def field_path(path: Sequence) -> str:
    """``("sources", 0, "label")`` -> ``"sources[0].label"``."""
    out = ""
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def did_you_mean(close: Sequence[str]) -> str:
    """``"; did you mean 'a', 'b'?"`` for close matches, ``""`` for none."""
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def describe_type(tp: Any) -> str:
    """An annotation in words, for "expected ..." messages."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return f"a list of {describe_type(typing.get_args(tp)[0])}" if typing.get_args(tp) else "a list"
    if origin is tuple:
        args = typing.get_args(tp)
        if args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} values ({', '.join(describe_type(a) for a in args)})"
        return f"a list of {describe_type(args[0])}" if args else "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} fields"
    return getattr(tp, "__name__", str(tp))


def short_repr(value: Any, limit: int = 80) -> str:
    """repr of ``value`` cut at ``limit`` characters without building the whole repr of a
    huge nested value (a hostile file must not make an error message cost seconds)."""
    if isinstance(value, (dict, list)):
        if isinstance(value, dict):
            inner = ", ".join(f"{short_repr(k, 20)}: {short_repr(v, 20)}" for k, v in list(value.items())[:4])
        else:
            inner = ", ".join(short_repr(x, 20) for x in list(value)[:4])
        more = ", ..." if len(value) > 4 else ""
        text = ("{" + inner + more + "}") if isinstance(value, dict) else ("[" + inner + more + "]")
    else:
        text = repr(value) if not isinstance(value, str) else repr(value[: limit + 2])
    return text[:limit]


class OverrideText(str):
    """The text after ``=`` in a ``key=value`` override, as typed.

    :func:`coerce` types it by its field's schema (:func:`coerce_text`) instead of reading it
    as YAML, so ``train.output_dir=/runs/exp #2`` stays that path (YAML read ``#2`` as a
    comment), a newline, ``~`` or ``a: b`` stay text in a str field, and ``train.steps=1x``
    is an error naming the key."""


NULL_WORDS = ("null", "none")  # what sets an Optional field to None from the command line
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def coerce_text(text: str, tp: Any, path: tuple = ()) -> Any:
    """An override's text typed by the annotation ``tp`` (:class:`OverrideText`).

    str: the text verbatim. int/float: the number it spells (``1e-3``, ``1e3`` for an int).
    bool: true/false/yes/no/on/off/1/0. Optional: ``null``/``none`` is None. Literal: one of
    its values as written. list/tuple: ``a,b,c`` (each item typed) or a YAML flow list
    ``[a, b]``. A mapping or nested section: YAML. Anything else: :class:`SchemaError`.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    raw = str(text)
    word = raw.strip()
    if tp is Any:
        return raw
    if origin in (typing.Union, types.UnionType):
        if word.lower() in NULL_WORDS and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        # a plain str option last: "3" for Union[int, str] is the number, "x" the text
        for arg in sorted(options, key=lambda a: a is str):
            try:
                return coerce_text(raw, arg, path)
            except SchemaError as err:
                if len(options) == 1:
                    raise err from None
        raise SchemaError("type", path, tp, raw)
    if origin is Literal:
        for arg in args:
            if word == str(arg) or (isinstance(arg, bool) and word.lower() == str(arg).lower()):
                return arg
        raise SchemaError("type", path, tp, raw)
    if dataclasses.is_dataclass(tp) or origin is dict or tp is dict:
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise SchemaError("type", path, tp, raw) from None
        return coerce(value, tp, path, lenient=True)
    if origin in (list, tuple):
        if word.startswith("["):
            try:
                value = yaml.safe_load(word)
            except yaml.YAMLError:
                raise SchemaError("type", path, tp, raw) from None
            return coerce(value, tp, path, lenient=True)
        items = [OverrideText(v.strip()) for v in word.split(",") if v.strip()]
        return coerce(items, tp, path, lenient=True)
    if tp is bool:
        if word.lower() in TRUE_WORDS:
            return True
        if word.lower() in FALSE_WORDS:
            return False
        raise SchemaError("type", path, tp, raw)
    if tp is int:
        try:
            return int(word)
        except ValueError:
            pass
        try:
            number = float(word)
        except ValueError:
            raise SchemaError("type", path, tp, raw) from None
        if math.isfinite(number) and number.is_integer():
            return int(number)
        raise SchemaError("type", path, tp, raw)
    if tp is float:
        try:
            number = float(word)
        except ValueError:
            raise SchemaError("type", path, tp, raw) from None
        return coerce(number, float, path)
    if tp is str:
        return str(raw)
    return raw


def coerce(value: Any, tp: Any, path: tuple = (), *, lenient: bool = False) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it typed; :class:`SchemaError` if it does not fit.

    Strict by default (what YAML gives must already be the type: manifests). ``lenient``
    adds the lossless conversions a ``key=value`` command line needs (configs): ``"1,2,4"``
    for a list, ``"1e-3"`` for a float, ``3.0`` for an int, a number for a str.
    Handles Any, Optional/Union, Literal, nested dataclasses (from mappings), list, tuple
    (fixed size or ``...``), dict, bool, int, float, str; other annotations pass through.
    """
    if isinstance(value, OverrideText):
        return coerce_text(value, tp, path)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise SchemaError("type", path, tp, value)
        options = [a for a in args if a is not type(None)]
        # a mapping for a dataclass option: its own error (naming the inner field) is the useful one
        for arg in options:
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return coerce(value, arg, path, lenient=lenient)
        if len(options) == 1:
            return coerce(value, options[0], path, lenient=lenient)
        for arg in options:
            try:
                return coerce(value, arg, path, lenient=lenient)
            except SchemaError:
                continue
        raise SchemaError("type", path, tp, value)
    if origin is Literal:
        if value in args:
            return value
        raise SchemaError("type", path, tp, value)
    if dataclasses.is_dataclass(tp):
        if isinstance(tp, type) and isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise SchemaError("type", path, tp, value)
        return build_dataclass(tp, value, path, lenient=lenient)
    if origin in (list, tuple):
        if lenient and isinstance(value, str):  # "a,b,c" from a notebook parameter (eval.shots="1,2,4")
            value = [OverrideText(v.strip()) for v in value.split(",") if v.strip()]
        if not (isinstance(value, list) or (isinstance(value, tuple) and (lenient or origin is tuple))):
            raise SchemaError("type", path, tp, value)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise SchemaError("length", path, tp, value)
            return tuple(coerce(v, a, (*path, i), lenient=lenient) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [coerce(v, item, (*path, i), lenient=lenient) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise SchemaError("type", path, tp, value)
        if len(args) != 2:
            return dict(value)
        return {str(k): coerce(v, args[1], (*path, str(k)), lenient=lenient) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise SchemaError("type", path, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if lenient and isinstance(value, float) and value.is_integer():
            return int(value)
        raise SchemaError("type", path, tp, value)
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif lenient and isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise SchemaError("type", path, tp, value)
        if not math.isfinite(number):  # inf/nan pass every range check and poison training at step 1
            raise SchemaError("finite", path, tp, value)
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if lenient and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise SchemaError("type", path, tp, value)
    return value


def build_dataclass(cls: type, data: Mapping, path: tuple = (), *, lenient: bool = False):
    """Dataclass ``cls`` from the mapping ``data``: every key a field, every value its type,
    every field without a default present (:class:`SchemaError` otherwise)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("from_file", True)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise SchemaError("unknown", (*path, str(key)), cls, value, key=key, known=tuple(fields))
        kwargs[key] = coerce(value, hints[key], (*path, key), lenient=lenient)
    missing = [n for n, f in fields.items()
               if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise SchemaError("missing", path, cls, data, missing=tuple(missing))
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Dataclass tree to plain YAML/JSON-safe values (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
