"""Manifest schema: every shipped manifest is valid, and a broken one fails at load with
the file and the field named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fundus_lab.data.manifest import (
    MANIFEST_DIR,
    ManifestError,
    available_manifests,
    load_manifest,
    parse_manifest,
    resolve_manifest_path,
)

EXPECTED = {
    "aptos2019", "eyepacs", "idrid", "messidor2", "messidor", "odir5k", "fives", "refuge", "rfmid",
    "retinamnist", "synfundus", "synth-pretrain", "synth-odir", "synth-fives", "synth-aptos",
    "synth-unseen",
}

MINIMAL = {
    "name": "tiny",
    "task": "multiclass",
    "classes": [{"name": "normal", "key": "normal"}, {"name": "glaucoma", "key": "glaucoma"}],
    "sources": [{"annotations": "labels.csv", "image": {"column": "image"}, "label": {"column": "label"}}],
}


def write_manifest(tmp_path: Path, data: dict, name: str = "tiny.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return path


def test_every_dataset_has_a_manifest():
    assert set(available_manifests()) == EXPECTED
    assert (MANIFEST_DIR / "README.md").is_file()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_manifests_are_valid_and_their_knowledge_keys_exist(name):
    m = load_manifest(name)
    assert m.name == name and m.path == MANIFEST_DIR / f"{name}.yaml"
    assert m.classes and m.sources
    knowledge = pytest.importorskip("fundus_lab.knowledge")
    for c in m.classes:
        if c.key is not None:
            assert knowledge.class_prompts(c.key), (name, c.key)
        else:
            assert c.prompts, (name, c.name)


def test_name_and_path_resolution(tmp_path):
    assert resolve_manifest_path("aptos2019") == MANIFEST_DIR / "aptos2019.yaml"
    path = write_manifest(tmp_path, MINIMAL)
    assert load_manifest(path).name == "tiny"
    assert load_manifest(str(path)).path == path
    (tmp_path / "ds").mkdir()
    write_manifest(tmp_path / "ds", MINIMAL, "manifest.yaml")
    assert load_manifest(tmp_path / "ds").name == "tiny"  # a folder means its manifest.yaml
    with pytest.raises(ManifestError, match="no manifest named 'aptos2020'.*did you mean aptos2019"):
        load_manifest("aptos2020")
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path / "missing.yaml")


def _broken(tmp_path, patch) -> str:
    data = yaml.safe_load(yaml.safe_dump(MINIMAL))
    patch(data)
    path = write_manifest(tmp_path, data)
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    msg = str(err.value)
    assert str(path) in msg  # every error names the manifest file
    return msg


def test_unknown_keys_name_the_file_and_field(tmp_path):
    msg = _broken(tmp_path, lambda d: d.update(tsak="ordinal"))
    assert "tsak: unknown field; did you mean 'task'?" in msg
    msg = _broken(tmp_path, lambda d: d["sources"][0]["label"].update(colum="x"))
    assert "sources[0].label.colum: unknown field; did you mean 'column'?" in msg
    msg = _broken(tmp_path, lambda d: d["classes"][1].update(prompt=["x"]))
    assert "classes[1].prompt: unknown field" in msg


def test_wrong_types_and_values(tmp_path):
    msg = _broken(tmp_path, lambda d: d.update(task="regression"))
    assert "task: expected 'multiclass' | 'multilabel' | 'ordinal' | 'binary', got 'regression'" in msg
    msg = _broken(tmp_path, lambda d: d["sources"][0].update(optional="yes please"))
    assert "sources[0].optional: expected bool" in msg
    msg = _broken(tmp_path, lambda d: d["sources"][0]["image"].update(extensions=".png"))
    assert "sources[0].image.extensions: expected a list of str" in msg
    msg = _broken(tmp_path, lambda d: d.update(split={"fractions": {"train": 0.5, "val": 0.2}}))
    assert "split.fractions" in msg and "summing to 1" in msg
    msg = _broken(tmp_path, lambda d: d.update(metric="acuracy"))
    assert "unknown metric 'acuracy'; did you mean accuracy" in msg
    msg = _broken(tmp_path, lambda d: d.pop("classes"))
    assert "missing required field(s) ['classes']" in msg


def test_semantic_checks(tmp_path):
    msg = _broken(tmp_path, lambda d: d["sources"][0]["label"].update(codes={0: "normal", 1: "glaucomma"}))
    assert "sources[0].label.codes.1: 'glaucomma' is not a class" in msg
    msg = _broken(tmp_path, lambda d: d["classes"].append({"name": "rare thing"}))
    assert "classes[2] ('rare thing'): needs a knowledge 'key' or inline 'prompts'" in msg
    msg = _broken(tmp_path, lambda d: d.update(task="binary", classes=d["classes"] + [{"name": "x", "key": "other"}]))
    assert "binary needs exactly 2 classes" in msg
    msg = _broken(tmp_path, lambda d: d["sources"][0]["label"].update(keyword={"rules": [{"match": "(", "label": "normal"}]}))
    assert "keyword.rules[0].match: bad regular expression" in msg
    msg = _broken(tmp_path, lambda d: d["sources"][0]["label"].update(multi_hot=True))
    assert "give exactly one of" in msg


def test_yaml_boolean_key_gets_a_hint(tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump(MINIMAL) + "on: 1\n")
    with pytest.raises(ManifestError, match="YAML reads on/off/yes/no as booleans"):
        load_manifest(path)


def test_top_level_defaults_merge_into_sources():
    m = parse_manifest({**MINIMAL, "image": {"extensions": [".png"]}, "sources": [
        {"annotations": "a.csv", "image": {"column": "id"}, "label": {"column": "y"}},
        {"annotations": "b.csv", "image": {"column": "id", "extensions": [".jpg"]}, "label": {"column": "y"}, "split": "test"},
    ]})
    assert m.sources[0].image.extensions == [".png"] and m.sources[0].image.column == "id"
    assert m.sources[1].image.extensions == [".jpg"] and m.sources[1].split == "test"
    with pytest.raises(ManifestError, match=r"<manifest>: image.colum: unknown field"):
        parse_manifest({**MINIMAL, "image": {"colum": "x"}})
