"""Which text each training image is paired with (``data.text_source``), and report labels.

The paper (sec. 3) pairs each image with *the names and definitions of its diseases*; free
reports are the richer alternative. One comparison uses one source for every method.

- ``definitions`` (default): for each of the image's labels, one description drawn among
  the knowledge base's (name or a synonym with the definition, or the name with one of
  its signs), joined; drawn again every time the image is drawn. The trainer draws each
  sample under a seed from (run seed, epoch, index), so runs repeat.
- ``report``: the dataset's report (``ds[i]["text"]``).
- ``both``: the definitions text followed by the report.

``text_per_image: one_label`` draws one of the image's labels and describes only it, and
the sample's label becomes that category's id (FLAIR's positives). ViLReF reads labels
extracted from each report by keyword rules (:func:`report_labels`), not the ground truth.
"""

from __future__ import annotations

import random
import re
from typing import Any, Optional, Sequence

import torch
from torch.utils.data import Dataset

from fundus_lab import knowledge

TEXT_SOURCES = ("definitions", "report", "both")
TEXT_PER_IMAGE = ("all_labels", "one_label")
LABELS_FROM = ("ground_truth", "report_keywords")

# Keyword rules beyond a class's own name, synonyms and abbreviations (which always count):
# knowledge keys whose terms also signal the class, and extra words reports use for it.
RULE_KEYS = {"diabetic_retinopathy": ("dr_grade_1", "dr_grade_2", "dr_grade_3", "dr_grade_4")}
RULE_WORDS = {
    "amd": ("AMD", "macular degeneration", "geographic atrophy secondary to AMD"),
    "hypertensive_retinopathy": ("hypertensive retinopathy", "hypertensive retinal changes", "HTN retinopathy"),
    "pathological_myopia": ("high myopia", "myopic fundus", "myopic maculopathy"),
    "other": ("vein occlusion", "BRVO", "CRVO", "laser photocoagulation", "laser-treated", "panretinal photocoagulation"),
    "cataract": ("media opacity consistent with cataract",),
    "normal": ("no abnormality detected",),
}
NEGATION = re.compile(r"\b(no|not|without|absence of|negative for|free of|rules? out)\b", re.IGNORECASE)
CLAUSE = re.compile(r"[.;:]|\bbut\b|\band\b", re.IGNORECASE)


def describe(key: str, rng: random.Random) -> str:
    """One description of a knowledge entry, drawn among: name or a synonym with the
    definition ("glaucoma, progressive optic nerve damage ..."), or the name with one sign."""
    e = knowledge.entry(key)
    names = [e["name"], *e["synonyms"]]
    options = [f"{n}, {e['definition']}" for n in names] + [f"{e['name']}, {s}" for s in e["signs"]]
    return options[rng.randrange(len(options))]


def _terms(key: str) -> list[tuple[str, bool]]:
    """(term, case_sensitive) of a class: names and synonyms (any case), abbreviations
    (exact case: "DR" is not "dr"), terms of related keys, and the extra rule words."""
    out: list[tuple[str, bool]] = []
    for k in (key, *RULE_KEYS.get(key, ())):
        e = knowledge.entry(k)
        out += [(t, False) for t in (e["name"], *e["synonyms"])] + [(a, True) for a in e["abbreviations"]]
    out += [(w, w.isupper()) for w in RULE_WORDS.get(key, ())]
    return out


def report_labels(text: str, class_keys: Sequence[Optional[str]]) -> list[float]:
    """Multi-hot labels read from a report by keyword rules (ViLReF's label extraction).

    A class is present when one of its terms (:func:`_terms`) occurs as whole words and no
    negation cue ("no", "without", "absence of", ...) precedes it in the same clause.
    A class keyed ``normal`` is present when named, or when no other class is found.
    Classes without a knowledge key are never found (named in no rule).
    """
    clauses = [c for c in CLAUSE.split(text) if c and c.strip()]
    found = [0.0] * len(class_keys)
    for j, key in enumerate(class_keys):
        if key is None:
            continue
        for term, exact in _terms(key):
            pattern = re.compile(r"(?<![\w-])" + re.escape(term) + r"(?![\w-])", 0 if exact else re.IGNORECASE)
            for clause in clauses:
                m = pattern.search(clause)
                if m and not NEGATION.search(clause[: m.start()]):
                    found[j] = 1.0
                    break
            if found[j]:
                break
    if "normal" in class_keys:
        j = list(class_keys).index("normal")
        if not any(v for i, v in enumerate(found) if i != j):
            found[j] = 1.0
        elif found[j]:  # "normal disc" next to a disease: the disease wins
            found[j] = 0.0
    return found


def label_indices(label, n_classes: int) -> list[int]:
    """Class ids of a sample's label (int class id or multi-hot)."""
    if isinstance(label, torch.Tensor):
        label = label.tolist()
    if isinstance(label, (list, tuple)):
        if len(label) != n_classes:
            raise ValueError(f"label has {len(label)} entries for {n_classes} classes")
        return [i for i, v in enumerate(label) if v]
    return [int(label)]


class PairedText(Dataset):
    """Wraps a dataset so that ``ds[i]["text"]`` is the configured text (and, for
    ``one_label`` / ``report_keywords``, ``ds[i]["label"]`` the label those need).

    Args:
        dataset: a ``FundusDataset`` (``records``, ``classes``, ``class_keys``).
        text_source: ``definitions`` | ``report`` | ``both`` (``data.text_source``).
        text_per_image: ``all_labels`` | ``one_label`` (``data.text_per_image``).
        labels_from: ``ground_truth`` | ``report_keywords`` (``method.labels_from``).
    """

    def __init__(self, dataset, text_source: str = "definitions", text_per_image: str = "all_labels",
                 labels_from: str = "ground_truth"):
        for field, value, allowed in (("data.text_source", text_source, TEXT_SOURCES),
                                      ("data.text_per_image", text_per_image, TEXT_PER_IMAGE),
                                      ("method.labels_from", labels_from, LABELS_FROM)):
            if value not in allowed:
                raise ValueError(f"{field}={value!r}; expected one of {list(allowed)}")
        self.dataset, self.text_source, self.text_per_image, self.labels_from = dataset, text_source, text_per_image, labels_from
        self.records = dataset.records
        self.classes = list(dataset.classes)
        self.class_keys = list(getattr(dataset, "class_keys", None) or [None] * len(self.classes))
        needs_keys = text_source != "report" or labels_from == "report_keywords"
        if needs_keys and not any(self.class_keys):
            raise ValueError(f"data.text_source={text_source!r} / method.labels_from={labels_from!r} need knowledge keys "
                             f"for the classes of {getattr(dataset, 'name', 'the dataset')}; its manifest names none (classes[].key)")
        if text_source != "report" or labels_from == "report_keywords":
            if text_source == "report" or text_source == "both" or labels_from == "report_keywords":
                lacking = [r.path for r in self.records if not isinstance(r.text, str) or not r.text.strip()]
                if lacking:
                    raise ValueError(f"{len(lacking)} record(s) have no report (e.g. {lacking[0]}), needed by "
                                     f"data.text_source={text_source!r} / method.labels_from={labels_from!r}")
        self._report_labels = (
            [report_labels(r.text, self.class_keys) for r in self.records] if labels_from == "report_keywords" else None
        )

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def augment(self) -> bool:
        return self.dataset.augment

    @augment.setter
    def augment(self, value: bool) -> None:
        self.dataset.augment = value

    def subset(self, indices: Sequence[int]) -> "PairedText":
        """The same pairing on ``dataset.subset(indices)``."""
        return PairedText(self.dataset.subset(indices), self.text_source, self.text_per_image, self.labels_from)

    def _keys_of(self, idx: list[int]) -> list[int]:
        idx = [i for i in idx if self.class_keys[i] is not None]
        if not idx and "normal" in self.class_keys:
            idx = [self.class_keys.index("normal")]
        return idx

    def draw(self, i: int, label, rng: random.Random) -> tuple[str, Any]:
        """The text of record ``i`` and the label that goes with it, drawn with ``rng``."""
        if self._report_labels is not None:
            label = torch.tensor(self._report_labels[i], dtype=torch.float32)
        report = self.records[i].text
        if self.text_source == "report" and self.text_per_image == "all_labels":
            return report, label
        idx = self._keys_of(label_indices(label, len(self.classes)))
        if not idx:
            raise ValueError(f"{self.records[i].path}: no label with a knowledge key to describe "
                             f"(data.text_source={self.text_source!r}); classes {self.classes}")
        if self.text_per_image == "one_label":
            idx = [idx[rng.randrange(len(idx))]]
            label = torch.tensor(idx[0], dtype=torch.long)
        definitions = "; ".join(describe(self.class_keys[j], rng) for j in idx) + "."
        text = {"definitions": definitions, "report": report, "both": f"{definitions} {report}"}[self.text_source]
        return text, label

    def __getitem__(self, i: int) -> dict:
        item = dict(self.dataset[i])
        rng = random.Random(random.getrandbits(64))  # the trainer seeds the global RNG per draw
        item["text"], item["label"] = self.draw(i, item["label"], rng)
        return item


def paired_texts(dataset, indices: Sequence[int], text_source: str = "definitions", seed: int = 0) -> list[str]:
    """The texts training pairs with records ``indices`` (one draw each, under ``seed``),
    for views that must show the trained path (reconstruction through ``CA_img``)."""
    paired = PairedText(dataset, text_source)
    return [paired.draw(i, dataset.records[i].label, random.Random(seed * 1_000_003 + i))[0] for i in indices]
