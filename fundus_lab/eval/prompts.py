"""Prompts that pretraining never read: the disjoint-prompt zero-shot's ensembles.

The knowledge-base ensemble (:func:`fundus_lab.knowledge.class_prompts`) contains the very
sentence each pretraining image was paired with ("<name>, <definition>."), so the paper's
zero-shot column measures recall of seen sentences as much as transfer. Here a class is
described by its own template set around its name, and by the entry's ``paraphrases``
(descriptions in other words, kept out of pretraining and of the tokenizer's corpus).
``tests/test_zero_shot_transfer.py`` asserts that no prompt below occurs in any
pretraining text (definitions, reports, both).
"""

from __future__ import annotations

from fundus_lab import knowledge

# Wordings no pretraining text uses (reports say "Impression:", "fundus photograph", ...).
TEMPLATES = (
    "{} seen on a retinal photograph",
    "an ophthalmoscopic picture of {}",
    "retinal image with the appearance of {}",
    "this eye's fundus image points to {}",
)


def disjoint_prompts(key: str) -> list[str]:
    """The disjoint ensemble of knowledge class ``key``: each template around its name,
    then its paraphrases. A class without paraphrases is an error: the ensemble would be
    templates of a bare name only, which is not what the column claims."""
    e = knowledge.entry(key)
    if not e.get("paraphrases"):
        raise ValueError(f"{knowledge.KNOWLEDGE_PATH.name}: classes.{key}.paraphrases is missing or empty; the "
                         "disjoint-prompt zero-shot needs held-out descriptions of every class it scores")
    return list(dict.fromkeys([t.format(e["name"]) for t in TEMPLATES] + knowledge.paraphrases(key)))


def dataset_disjoint_prompts(ds) -> list[list[str]]:
    """Per class of ``ds`` (in order), its disjoint ensemble; every class needs a knowledge key."""
    keys = list(getattr(ds, "class_keys", None) or [None] * len(ds.classes))
    missing = [c for c, k in zip(ds.classes, keys) if k is None]
    if missing:
        raise ValueError(f"disjoint-prompt zero-shot: classes {missing} of {getattr(ds, 'name', 'the dataset')} have "
                         "no knowledge key (manifest classes[].key), so they have no held-out prompts")
    return [disjoint_prompts(k) for k in keys]


__all__ = ["TEMPLATES", "dataset_disjoint_prompts", "disjoint_prompts"]
