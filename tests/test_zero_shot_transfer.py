"""Zero-shot that measures transfer (Table 2): prompts pretraining never read, and diseases
pretraining never named. Every pretraining text is generated here (each text source, every
description the knowledge base offers, reports of a rendered pretraining set) and searched
for the evaluation strings; the unseen diseases are rendered from lesions seen diseases share."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from fundus_lab import config as C
from fundus_lab import experiment as ex
from fundus_lab import knowledge
from fundus_lab.data.text_source import TEXT_SOURCES, PairedText, describe
from fundus_lab.eval.prompts import TEMPLATES, dataset_disjoint_prompts, disjoint_prompts
from doubles import PlantedModel, ToyDataset

N_PRETRAIN = 240  # 120 patients: every ODIR category several times over (labels._odir_patient)
DRAWS = 4  # text draws per image and source (definitions vary per draw)


class _Nth:
    """An rng whose ``randrange(n)`` is ``i mod n``: walks every option of ``describe``."""

    def __init__(self, i):
        self.i = i

    def randrange(self, n):
        return self.i % n


@pytest.fixture(scope="module")
def pretraining_texts(tmp_path_factory):
    """Every text pretraining can pair with an image: each source (definitions, report, both)
    drawn several times for every image of a rendered synth-pretrain, and every description
    ``describe`` can give for each knowledge key a pretraining image carries."""
    from fundus_lab.data import open_dataset, synth

    root = tmp_path_factory.mktemp("synth") / "synth-pretrain"
    synth.generate(root, "pretrain", n=N_PRETRAIN, seed=0, image_size=32)
    ds = open_dataset("synth-pretrain", root=root, split="all", image_size=32)
    texts = set()
    for source in TEXT_SOURCES:
        paired = PairedText(ds, source)
        for i, record in enumerate(ds.records):
            for d in range(DRAWS):
                texts.add(paired.draw(i, record.label, random.Random(d * 100_003 + i))[0])
    keys = {k for r in ds.records for k in [ds.class_keys[j] for j, v in enumerate(r.label) if v]}
    keys |= {k for k in knowledge.class_keys() if k.startswith("dr_grade_")} | {"dme"}
    for key in keys:
        texts |= {describe(key, _Nth(i)) for i in range(64)}
    assert len(texts) > 3 * N_PRETRAIN
    return [t.lower() for t in texts]


def _occurrences(strings, texts):
    return {s: t for s in strings for t in texts if s.lower() in t}


def test_no_disjoint_prompt_occurs_in_any_pretraining_text(pretraining_texts):
    prompts = [p for key in knowledge.ODIR_KEYS.values() for p in disjoint_prompts(key)]
    assert len(prompts) == 8 * (len(TEMPLATES) + 2)
    assert not _occurrences(prompts, pretraining_texts)
    assert not _occurrences(prompts, [t.lower() for t in knowledge.corpus()])  # nor the tokenizer's corpus
    # the check can fail: the knowledge-base ensemble holds the very sentence pretraining used
    seen = _occurrences(knowledge.class_prompts("glaucoma"), pretraining_texts)
    assert "glaucoma, progressive optic nerve damage with loss of the neuro-retinal rim." in seen


def test_unseen_diseases_are_absent_from_every_pretraining_text(pretraining_texts):
    unseen = knowledge.unseen_keys()
    assert len(unseen) >= 2
    corpus = [t.lower() for t in knowledge.corpus()]
    for key in unseen:
        e = knowledge.entry(key)
        strings = [e["name"], *e["synonyms"], e["definition"]]
        assert not _occurrences(strings, pretraining_texts), key
        assert not _occurrences(strings, corpus), key
        for abbreviation in e["abbreviations"]:  # whole words, exact case ("OIS")
            word = re.compile(rf"(?<![\w-]){re.escape(abbreviation.lower())}(?![\w-])")
            assert not any(word.search(t) for t in pretraining_texts), abbreviation


def test_unseen_diseases_are_rendered_from_lesions_seen_diseases_share():
    """synth-unseen: both diseases, drawn with lesions the pretraining diseases also have."""
    from fundus_lab.data.synth import UNSEEN, EyeLabels, render_eye, sample_one

    seen_lesions = set()  # what diabetic and hypertensive retinopathy draw (both in pretraining)
    for labels in (EyeLabels(dr_grade=2, diabetic=True), EyeLabels(dr_grade=3, diabetic=True),
                   EyeLabels(hypertensive=3)):
        for seed in range(3):
            seen_lesions |= set(render_eye(np.random.default_rng(seed), labels, size=128).masks)
    found = {}
    for i in range(8):
        row, _, masks = sample_one("unseen", i, 0, ["topcon", "canon", "handheld"], 128)
        found.setdefault(row["unseen_class"], []).append(set(masks))
        assert row["O"] == 1 and row["N"] == 0  # an abnormal eye, filed as "other" by ODIR's scheme
        assert knowledge.name(UNSEEN[row["unseen_class"]]) in row["short_text"]
    assert set(found) == set(UNSEEN)
    assert all("cotton_wool_spot" in m for m in found["P"])
    assert all({"dot_blot_haemorrhage", "microaneurysm", "arteriolar_narrowing"} <= m for m in found["I"])
    assert set().union(*found["P"], *found["I"]) <= seen_lesions


def test_pretraining_images_never_have_an_unseen_disease():
    from fundus_lab.data.synth import sample_one

    for i in range(60):
        row = sample_one("pretrain", i, 0, ["topcon", "canon"], 32)[0]
        assert row["unseen_class"] == ""


def _planted(class_keys, prompts_of):
    """Toy images (colour = class) and a model that knows only the given prompts: class c's
    prompts point at colour c, so using any other prompt raises."""
    ds = ToyDataset(np.array([0, 1, 2, 0, 1, 2]), ["n", "g", "c"], class_keys=class_keys, split="test")
    ds.class_prompts = lambda: [knowledge.class_prompts(k) for k in class_keys]  # as FundusDataset builds them
    vectors = {p: np.eye(3)[c] for c, key in enumerate(class_keys) for p in prompts_of(key)}
    return ds, PlantedModel(np.eye(3), vectors)


def test_disjoint_protocol_prompts_with_the_held_out_prompts_only():
    keys = ["normal", "glaucoma", "cataract"]
    ds, model = _planted(keys, disjoint_prompts)
    sets = {"tests": {"in_domain": ds}, "task": "multiclass", "classes": ds.classes}
    fit = ex.PROTOCOLS.get("zero_shot_disjoint").run(model, sets, C.load_config(overrides=["eval.progress=false"]), None)
    assert fit.available and fit.result["prompts"] == [disjoint_prompts(k) for k in keys]
    assert (np.asarray(fit.predictions["in_domain"][0]).argmax(1) == ds.labels).all()
    with pytest.raises(KeyError, match="no planted vector"):  # the seen-class column asks for the knowledge prompts
        ex.PROTOCOLS.get("zero_shot").run(model, sets, C.load_config(overrides=["eval.progress=false"]), None)


def test_unseen_protocol_reads_the_unseen_dataset_and_its_knowledge_prompts():
    assert C.load_config().eval.unseen_dataset == "synth-unseen"
    assert ex.PROTOCOLS.get("zero_shot_unseen").dataset_key == "unseen_dataset"
    keys = knowledge.unseen_keys()[:2] + ["normal"]
    ds, model = _planted(keys, knowledge.class_prompts)
    sets = {"tests": {"in_domain": ds}, "task": "multiclass", "classes": ds.classes}
    fit = ex.PROTOCOLS.get("zero_shot_unseen").run(model, sets, C.load_config(overrides=["eval.progress=false"]), None)
    assert (np.asarray(fit.predictions["in_domain"][0]).argmax(1) == ds.labels).all()


def test_disjoint_prompts_name_the_missing_field():
    with pytest.raises(ValueError, match=r"knowledge.yaml: classes.dme.paraphrases is missing"):
        disjoint_prompts("dme")
    ds = ToyDataset(np.array([0, 1]), ["a", "b"], class_keys=["normal", None])
    with pytest.raises(ValueError, match=r"classes \['b'\].*no knowledge key"):
        dataset_disjoint_prompts(ds)


def test_bad_paraphrases_and_in_pretraining_name_file_and_field(tmp_path):
    base = "classes:\n  foo:\n    name: Foo\n    synonyms: []\n    abbreviations: []\n    definition: x\n    signs: [a]\n"
    bad = tmp_path / "kb.yaml"
    bad.write_text(base + "    paraphrases: just one string\n")
    with pytest.raises(ValueError, match=r"kb.yaml: classes.foo.paraphrases: expected a list of non-empty strings"):
        knowledge._load(str(bad))
    bad.write_text(base + "    in_pretraining: 'no'\n")
    with pytest.raises(ValueError, match=r"kb.yaml: classes.foo.in_pretraining: expected true or false"):
        knowledge._load(str(bad))
