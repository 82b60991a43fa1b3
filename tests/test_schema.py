"""The one schema coercer configs and manifests share (fundus_lab.schema.coerce / build_dataclass):
each type family, strict versus lenient (command-line) conversions, and the error text."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import pytest

from fundus_lab import config as C
from fundus_lab.schema import NOT_FROM_FILE, SchemaError, build_dataclass, coerce, short_repr


@dataclass
class Inner:
    column: str
    pattern: Optional[str] = None


@dataclass
class Outer:
    name: str
    mode: Literal["a", "b"] = "a"
    inner: Optional[Inner] = None
    items: list[Inner] = field(default_factory=list)
    pair: tuple[float, float] = (0.0, 1.0)
    table: dict[str, int] = field(default_factory=dict)
    either: Union[bool, Literal["auto"]] = True
    path: Optional[str] = field(default=None, metadata=NOT_FROM_FILE)


def _err(value, tp, lenient=False, path=("f",)) -> SchemaError:
    with pytest.raises(SchemaError) as info:
        coerce(value, tp, path, lenient=lenient)
    return info.value


def test_scalars_strict():
    assert coerce(3, int) == 3 and coerce(3, float) == 3.0 and isinstance(coerce(3, float), float)
    assert coerce(True, bool) is True and coerce("x", str) == "x"
    assert str(_err(True, int)) == "f: expected int, got True"  # a bool is not a number
    assert str(_err(3.0, int)) == "f: expected int, got 3.0"
    assert str(_err("1e-3", float)) == "f: expected float, got '1e-3'"
    assert str(_err(1, bool)) == "f: expected bool, got 1"
    assert str(_err(3, str)) == "f: expected str, got 3"


def test_scalars_lenient_take_lossless_command_line_values():
    assert coerce(3.0, int, lenient=True) == 3 and isinstance(coerce(3.0, int, lenient=True), int)
    assert coerce("1e-3", float, lenient=True) == pytest.approx(1e-3)
    assert coerce(3, str, lenient=True) == "3"
    assert _err(2.5, int, lenient=True).problem == "type"
    assert _err("many", float, lenient=True).problem == "type"
    assert _err(True, str, lenient=True).problem == "type"


def test_any_and_unknown_annotations_pass_through():
    obj = object()
    assert coerce(obj, Any) is obj and coerce(obj, object) is obj


def test_optional_union_and_literal():
    assert coerce(None, Optional[int]) is None
    assert str(_err(None, int)) == "f: expected int, got None"
    assert str(_err("x", Optional[int])) == "f: expected int, got 'x'"  # one option: its own error
    assert coerce("auto", Union[bool, Literal["auto"]]) == "auto" and coerce(False, Union[bool, Literal["auto"]]) is False
    assert str(_err("maybe", Union[bool, Literal["auto"]])) == "f: expected bool or 'auto', got 'maybe'"
    assert str(_err(None, Union[str, int])) == "f: expected str or int, got None"
    assert coerce("b", Literal["a", "b"]) == "b"
    assert str(_err("c", Literal["a", "b"])) == "f: expected 'a' | 'b', got 'c'"


def test_lists_tuples_and_dicts():
    assert coerce([1, 2], list[int]) == [1, 2]
    e = _err([1, "x"], list[int])
    assert e.path == ("f", 1) and str(e) == "f[1]: expected int, got 'x'"
    assert str(_err(".png", list[str])) == "f: expected a list of str, got '.png'"
    assert str(_err((1, 2), list[int])) == "f: expected a list of int, got (1, 2)"  # YAML never gives tuples
    assert coerce("1, 2,4", list[int], lenient=True) == [1, 2, 4]  # eval.shots=1,2,4
    assert coerce("a,b", list[str], lenient=True) == ["a", "b"]
    assert coerce((1, 2), list[int], lenient=True) == [1, 2]
    assert coerce([0.9, 0.98], tuple[float, float]) == (0.9, 0.98)
    assert coerce("0.9,0.95", tuple[float, float], lenient=True) == (0.9, 0.95)
    e = _err([0.9], tuple[float, float])
    assert e.problem == "length" and str(e) == "f: expected 2 values, got [0.9]"
    assert coerce([1, 2, 3], tuple[int, ...]) == (1, 2, 3)
    assert coerce({1: 2}, dict[str, int]) == {"1": 2}
    assert str(_err({"a": "x"}, dict[str, int])) == "f.a: expected int, got 'x'"
    assert str(_err([1], dict[str, int])) == "f: expected a mapping, got [1]"


def test_nested_dataclasses_unknown_and_missing_fields():
    o = build_dataclass(Outer, {"name": "n", "inner": {"column": "c"}, "items": [{"column": "x"}], "pair": [1, 2]})
    assert o.inner == Inner("c") and o.items == [Inner("x")] and o.pair == (1.0, 2.0)
    assert coerce(Inner("c"), Inner) == Inner("c")  # an instance is already fine
    e = _raises(Outer, {"name": "n", "items": [{"column": "x"}, {"colum": "y"}]})
    assert (e.problem, e.path, e.key) == ("unknown", ("items", 1, "colum"), "colum")
    assert str(e) == "items[1].colum: unknown field; did you mean 'column'? (known: column, pattern)"
    # a mapping for an Optional dataclass: the inner field's error, not "expected Inner or None"
    assert str(_raises(Outer, {"name": "n", "inner": {"column": 3}})) == "inner.column: expected str, got 3"
    assert str(_raises(Outer, {"name": "n", "inner": "c"})) == "inner: expected a mapping of Inner fields, got 'c'"
    assert str(_raises(Outer, {})) == "missing required field(s) ['name']"
    assert str(_raises(Outer, {"name": "n", "inner": {}})) == "inner: missing required field(s) ['column']"
    e = _raises(Outer, {"name": "n", True: 1})  # `on: 1` in YAML
    assert "YAML reads on/off/yes/no as booleans: quote the key" in str(e)
    # a field the loader fills in cannot come from a file, and is not offered as a known field
    e = _raises(Outer, {"name": "n", "path": "/x"})
    assert e.problem == "unknown" and "path" not in e.known


def _raises(cls, data, **kw) -> SchemaError:
    with pytest.raises(SchemaError) as info:
        build_dataclass(cls, data, **kw)
    return info.value


def test_error_text_is_short_for_huge_values():
    e = _err(["x" * 10_000] * 10_000, str)
    assert str(e).startswith("f: expected str, got ['xxx") and len(str(e)) <= len("f: expected str, got ") + 80
    assert short_repr(list(range(10))) == "[0, 1, 2, 3, ...]" and short_repr({"a": 1}) == "{'a': 1}"


def test_configs_and_manifests_use_the_same_coercer():
    from fundus_lab.data import manifest

    assert manifest.coerce is coerce and manifest.build_dataclass is build_dataclass
    assert manifest.SchemaError is SchemaError


def test_config_messages_from_the_shared_coercer():
    with pytest.raises(C.ConfigError, match=r"^f\.yaml: train\.clip_grad_norm = 'x' is not a valid float$"):
        C.from_dict(C.Config, {"train": {"clip_grad_norm": "x"}}, "f.yaml")  # was "not a valid Optional"
    with pytest.raises(C.ConfigError, match=r"^f\.yaml: eval\.shots\[2\] = 'x' is not a valid int$"):
        C.from_dict(C.Config, {"eval": {"shots": "1,2,x"}}, "f.yaml")
    with pytest.raises(C.ConfigError, match=r"^f\.yaml: train\.betas needs 2 values, got \[0\.9\]$"):
        C.from_dict(C.Config, {"train": {"betas": [0.9]}}, "f.yaml")
    with pytest.raises(C.ConfigError, match=r"^f\.yaml: train must be a mapping of TrainConfig fields, got 5$"):
        C.from_dict(C.Config, {"train": 5}, "f.yaml")
    with pytest.raises(C.ConfigError, match=r"^f\.yaml: train\.mixed_precision = 'fp8'; expected one of \['auto', 'no', 'fp16', 'bf16'\]$"):
        C.from_dict(C.Config, {"train": {"mixed_precision": "fp8"}}, "f.yaml")
    with pytest.raises(C.ConfigError, match=r"^m\.json: unknown config key 'model\.patch_sise'; did you mean 'model\.patch_size'"):
        C.from_dict(C.ModelConfig, {"patch_sise": 3}, "m.json", prefix="model.")
    with pytest.raises(C.ConfigError, match=r"^f\.yaml: unknown config key 'trian'; did you mean 'train', 'train\.lr'\?$"):
        C.from_dict(C.Config, {"trian": {}}, "f.yaml")
    cfg = C.from_dict(C.Config, {"train": {"steps": 3.0, "lr": "1e-3", "betas": "0.9,0.95"}, "eval": {"shots": "1,2"}}, "f.yaml")
    assert (cfg.train.steps, cfg.train.lr, cfg.train.betas, cfg.eval.shots) == (3, 1e-3, (0.9, 0.95), [1, 2])
