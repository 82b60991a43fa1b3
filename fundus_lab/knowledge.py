"""The clinical knowledge base: class and lesion descriptions as data.

FLAIR showed that describing a class by its visible signs ("expert knowledge") beats the
bare class name for zero-shot transfer, and the paper pairs each image with disease names
and definitions. Both need the same facts, so they live once, in
``fundus_lab/data/knowledge.yaml``, and this module is the only reader.

    >>> from fundus_lab import knowledge
    >>> knowledge.entry("glaucoma")["definition"]
    'progressive optic nerve damage with loss of the neuro-retinal rim'
    >>> knowledge.class_prompts("glaucoma")[:3]
    ['glaucoma', 'glaucomatous optic neuropathy', 'suspected glaucoma']
"""

from __future__ import annotations

import copy
import difflib
from functools import lru_cache
from pathlib import Path
from typing import Optional

import yaml

KNOWLEDGE_PATH = Path(__file__).parent / "data" / "knowledge.yaml"
REQUIRED_FIELDS = ("name", "synonyms", "abbreviations", "definition", "signs")
KINDS = ("classes", "lesions")

# Dataset label codes -> knowledge keys (ODIR-5K categories; FIVES uses A, D, G, N too).
ODIR_KEYS = {
    "N": "normal",
    "D": "diabetic_retinopathy",
    "G": "glaucoma",
    "C": "cataract",
    "A": "amd",
    "H": "hypertensive_retinopathy",
    "M": "pathological_myopia",
    "O": "other",
}
DR_GRADE_KEYS = tuple(f"dr_grade_{g}" for g in range(5))


def _validate(data: object, path: Path) -> dict[str, dict[str, dict]]:
    """Check the YAML layout so a typo fails here, naming the file and the field."""
    if not isinstance(data, dict) or set(data) - set(KINDS) or not set(data) & set(KINDS):
        raise ValueError(f"{path}: expected top-level keys {list(KINDS)}, got {data!r:.80}")
    seen: dict[str, str] = {}
    for kind in KINDS:
        for key, entry in (data.get(kind) or {}).items():
            where = f"{path}: {kind}.{key}"
            if key in seen:
                raise ValueError(f"{where}: key also defined under {seen[key]}")
            seen[key] = kind
            if not isinstance(entry, dict):
                raise ValueError(f"{where}: expected a mapping, got {type(entry).__name__}")
            for field in REQUIRED_FIELDS:
                if field not in entry:
                    raise ValueError(f"{where}: missing field '{field}'")
            for field in ("synonyms", "abbreviations", "signs"):
                value = entry[field]
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ValueError(f"{where}.{field}: expected a list of strings, got {value!r}")
            for field in ("name", "definition"):
                if not isinstance(entry[field], str) or not entry[field].strip():
                    raise ValueError(f"{where}.{field}: expected a non-empty string")
            paraphrases = entry.get("paraphrases", [])
            if not isinstance(paraphrases, list) or not all(isinstance(v, str) and v.strip() for v in paraphrases):
                raise ValueError(f"{where}.paraphrases: expected a list of non-empty strings, got {paraphrases!r}")
            if not isinstance(entry.get("in_pretraining", True), bool):
                raise ValueError(f"{where}.in_pretraining: expected true or false, got {entry['in_pretraining']!r}")
    return {kind: dict(data.get(kind) or {}) for kind in KINDS}


@lru_cache(maxsize=None)
def _load(path: str = str(KNOWLEDGE_PATH)) -> dict[str, dict[str, dict]]:
    p = Path(path)
    with open(p, encoding="utf-8") as f:
        return _validate(yaml.safe_load(f), p)


def keys(kind: Optional[str] = None) -> list[str]:
    """All keys, or those of one kind ("classes" or "lesions"), in file order."""
    base = _load()
    if kind is None:
        return [k for kd in KINDS for k in base[kd]]
    if kind not in KINDS:
        raise ValueError(f"knowledge.keys: kind must be one of {list(KINDS)}, got {kind!r}")
    return list(base[kind])


def class_keys() -> list[str]:
    return keys("classes")


def lesion_keys() -> list[str]:
    return keys("lesions")


def entry(key: str) -> dict:
    """The entry of ``key``: dict(name, synonyms, abbreviations, definition, signs, ...).

    A copy, so callers may edit it. Unknown keys raise KeyError naming close matches.
    """
    base = _load()
    for kind in KINDS:
        if key in base[kind]:
            return copy.deepcopy(base[kind][key])
    close = difflib.get_close_matches(str(key), keys(), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise KeyError(f"unknown knowledge key {key!r} in {KNOWLEDGE_PATH.name}{hint}")


def name(key: str) -> str:
    return entry(key)["name"]


def _sentence(text: str) -> str:
    text = text.strip()
    return text[0].upper() + text[1:] + ("" if text.endswith(".") else ".")


def class_prompts(key: str) -> list[str]:
    """The zero-shot prompt ensemble of a class (knowledge.md "Prompts for zero-shot").

    In order: the name, each synonym, "a fundus photograph of <name>", the definition as
    "<name>: <definition>.", and one sentence per sign ("A fundus photograph showing
    <sign>."). The class embedding is the normalised mean of these prompts' embeddings.
    Duplicates are removed, order kept.
    """
    e = entry(key)
    prompts = [e["name"], *e["synonyms"], f"a fundus photograph of {e['name']}",
               f"{e['name']}, {e['definition']}."]
    prompts += [f"a fundus photograph showing {sign}." for sign in e["signs"]]
    return list(dict.fromkeys(prompts))


def definition_text(key: str) -> str:
    """The definition form used for image texts: "<name>, <definition>"."""
    e = entry(key)
    return f"{e['name']}, {e['definition']}"


def unseen_keys() -> list[str]:
    """Class keys held out of pretraining (``in_pretraining: false``): the unseen diseases
    that zero-shot names from their entries alone."""
    return [k for k in class_keys() if not _load()["classes"][k].get("in_pretraining", True)]


def paraphrases(key: str) -> list[str]:
    """A class's evaluation-only paraphrases (its ``paraphrases`` field; empty when none)."""
    return list(entry(key).get("paraphrases", []))


def corpus() -> list[str]:
    """Every text in the base (names, synonyms, abbreviations, definitions, signs,
    lesion looks and prompts), deduplicated, for tokenizer training.

    Evaluation-only text stays out: unseen diseases' entries and every ``paraphrases``
    field, so that no pretraining step (the tokenizer included) has read them."""
    texts: list[str] = []
    held_out = set(unseen_keys())
    for key in (k for k in keys() if k not in held_out):
        e = entry(key)
        texts += [e["name"], *e["synonyms"], *e["abbreviations"], _sentence(e["definition"])]
        texts += [_sentence(s) for s in e["signs"]]
        texts += [_sentence(e[f]) for f in ("look", "where") if isinstance(e.get(f), str)]
        if key in _load()["classes"]:
            texts += class_prompts(key)
    return list(dict.fromkeys(texts))
