"""The text paired with each training image (data.text_source) and ViLReF's report labels."""

import random

import pytest
import torch

from fundus_lab.data.text_source import PairedText, describe, paired_texts, report_labels
from fundus_lab import knowledge

KEYS = ["normal", "diabetic_retinopathy", "glaucoma", "cataract", "amd", "hypertensive_retinopathy", "pathological_myopia", "other"]


class Rec:
    def __init__(self, text, label, path="img.png"):
        self.text, self.label, self.path = text, label, path


class Tiny:
    """A dataset double: records, classes, class_keys and items like FundusDataset's."""

    classes = ["normal", "diabetic retinopathy", "glaucoma", "cataract", "amd", "htn", "myopia", "other"]
    class_keys = KEYS

    def __init__(self, recs):
        self.records = recs

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        r = self.records[i]
        return {"image": torch.zeros(3, 4, 4), "text": r.text, "label": torch.tensor(r.label, dtype=torch.float32)}


def hot(*idx):
    return [1.0 if i in idx else 0.0 for i in range(8)]


@pytest.mark.parametrize("text,expect", [
    ("Diagnosis: moderate NPDR and clinically significant macular oedema.", hot(1)),
    ("Disc healthy. Impression: glaucoma; cataract.", hot(2, 3)),
    ("No diabetic retinopathy. Macula normal.", hot(0)),                  # negated: normal
    ("Assessment: no abnormality detected.", hot(0)),
    ("Findings: drusen at the macula. Conclusion: dry AMD.", hot(4)),
    ("Diagnosis: mild HTN retinopathy, BRVO.", hot(5, 7)),
    ("No NVD or NVE. Impression: PDR without DME.", hot(1)),
])
def test_report_labels_follow_keyword_rules_with_negation(text, expect):
    assert report_labels(text, KEYS) == expect


def test_definitions_are_drawn_per_draw_from_the_knowledge_base_and_seeded():
    ds = Tiny([Rec("report a", hot(2, 3))])
    paired = PairedText(ds, "definitions")
    random.seed(0)
    texts = [paired[0]["text"] for _ in range(20)]
    assert len(set(texts)) > 1  # drawn again each time the image is drawn
    allowed = {describe_all for k in ("glaucoma", "cataract") for describe_all in _all_descriptions(k)}
    for t in texts:
        parts = t.rstrip(".").split("; ")
        assert len(parts) == 2 and all(p in allowed for p in parts)
    random.seed(0)
    assert [paired[0]["text"] for _ in range(20)] == texts  # seeded: runs repeat
    assert paired_texts(ds, [0], seed=3) == paired_texts(ds, [0], seed=3)


def _all_descriptions(key):
    rng = random.Random(0)
    return {describe(key, rng) for _ in range(500)}


def test_report_and_both_sources_and_flair_one_label():
    ds = Tiny([Rec("Impression: glaucoma.", hot(2, 3))])
    assert PairedText(ds, "report")[0]["text"] == "Impression: glaucoma."
    both = PairedText(ds, "both")[0]["text"]
    assert both.endswith("Impression: glaucoma.") and knowledge.name("glaucoma") in both or knowledge.name("cataract") in both
    item = PairedText(ds, "definitions", text_per_image="one_label")[0]
    assert item["label"].dtype == torch.long and int(item["label"]) in (2, 3)
    assert item["text"].count(";") == 0  # one category described


def test_vilref_labels_come_from_the_report_not_the_ground_truth():
    ds = Tiny([Rec("Impression: glaucoma.", hot(3))])  # ground truth disagrees with the report
    item = PairedText(ds, "report", labels_from="report_keywords")[0]
    assert item["label"].tolist() == hot(2)


def test_bad_settings_name_the_field():
    ds = Tiny([Rec(None, hot(2))])
    with pytest.raises(ValueError, match="data.text_source='notes'"):
        PairedText(ds, "notes")
    with pytest.raises(ValueError, match="no report"):
        PairedText(ds, "report", labels_from="report_keywords")
