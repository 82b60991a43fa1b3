"""The knowledge base: contract fields, prompt ensembles, corpus, clear errors."""

import pytest

from fundus_lab import knowledge

CLASS_KEYS = ["normal", "diabetic_retinopathy", *[f"dr_grade_{g}" for g in range(5)], "dme", "glaucoma",
              "cataract", "amd", "hypertensive_retinopathy", "pathological_myopia", "other"]


@pytest.mark.parametrize("key", CLASS_KEYS + knowledge.lesion_keys())
def test_entry_has_contract_fields(key):
    e = knowledge.entry(key)
    assert isinstance(e["name"], str) and e["name"]
    assert isinstance(e["definition"], str) and e["definition"]
    for field in ("synonyms", "abbreviations", "signs"):
        assert isinstance(e[field], list) and all(isinstance(s, str) for s in e[field])
    assert e["signs"], f"{key} has no visible signs"


def test_entry_is_a_copy():
    knowledge.entry("glaucoma")["synonyms"].append("changed")
    assert "changed" not in knowledge.entry("glaucoma")["synonyms"]


def test_class_prompts_follow_the_recipe():
    e = knowledge.entry("glaucoma")
    prompts = knowledge.class_prompts("glaucoma")
    expected = ["glaucoma", "glaucomatous optic neuropathy", "suspected glaucoma", "glaucoma suspect",
                "a fundus photograph of glaucoma",
                "glaucoma, progressive optic nerve damage with loss of the neuro-retinal rim.",
                "a fundus photograph showing a cup-to-disc ratio of 0.6 or more.",
                "a fundus photograph showing notching or thinning of the neuro-retinal rim.",
                "a fundus photograph showing vessels bent over the rim of an enlarged cup.",
                "a fundus photograph showing peripapillary atrophy."]
    assert prompts == expected
    assert len(prompts) == 1 + len(e["synonyms"]) + 2 + len(e["signs"])


def test_prompts_are_unique_per_class():
    for key in CLASS_KEYS:
        p = knowledge.class_prompts(key)
        assert len(p) == len(set(p))


def test_unknown_key_names_key_and_close_matches():
    with pytest.raises(KeyError) as err:
        knowledge.entry("glaucomma")
    msg = str(err.value)
    assert "glaucomma" in msg and "'glaucoma'" in msg
    with pytest.raises(KeyError, match="zzz_unrelated"):
        knowledge.class_prompts("zzz_unrelated")


def test_corpus_covers_every_entry_without_duplicates():
    corpus = knowledge.corpus()
    assert len(corpus) == len(set(corpus))
    text = "\n".join(corpus)
    for key in [k for k in knowledge.keys() if k not in knowledge.unseen_keys()]:
        e = knowledge.entry(key)
        assert e["name"] in corpus
        assert e["definition"][1:] in text
        for s in e["synonyms"] + e["abbreviations"]:
            assert s in corpus


def test_dataset_code_maps_point_at_real_keys():
    for key in list(knowledge.ODIR_KEYS.values()) + list(knowledge.DR_GRADE_KEYS):
        knowledge.entry(key)
    assert list(knowledge.ODIR_KEYS) == list("NDGCAHMO")


def test_bad_yaml_names_file_and_field(tmp_path):
    bad = tmp_path / "kb.yaml"
    bad.write_text("classes:\n  foo:\n    name: Foo\n    synonyms: not-a-list\n    abbreviations: []\n"
                   "    definition: x\n    signs: [a]\n")
    with pytest.raises(ValueError, match=r"kb.yaml: classes.foo.synonyms: expected a list"):
        knowledge._load(str(bad))
    bad.write_text("classes:\n  foo:\n    name: Foo\n")
    with pytest.raises(ValueError, match=r"classes.foo: missing field 'synonyms'"):
        knowledge._load(str(bad))
