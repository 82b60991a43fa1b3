"""Clinical reports for synthetic images, written from the labels and the drawn lesions.

A report is findings then an impression (knowledge.md "Reports"): the eye, the media,
the disc with its CDR, the vessels, each lesion with a count and a location (quadrants
around the fovea, near the disc, at the macula), a few negative findings, and the
diagnoses with the DR grade. Wording varies: synonyms and abbreviations from the
knowledge base, several templates per sentence, shuffled order. The report is a pure
function of (labels, findings, anatomy, rng), so it is deterministic per image.

Besides the report, each image gets a ``short_text`` (the class names, "glaucoma,
cataract") and a ``definition_text`` (name and definition of each class).
"""

from __future__ import annotations

import numpy as np

from ... import knowledge
from .anatomy import QUADRANTS, Anatomy, quadrant_of
from .labels import EyeLabels

# Countable lesions: (singular, plural) noun variants.
NOUNS = {
    "microaneurysm": [("microaneurysm", "microaneurysms"), ("MA", "MAs"), ("capillary microaneurysm", "capillary microaneurysms")],
    "dot_blot_haemorrhage": [("dot-blot haemorrhage", "dot-blot haemorrhages"),
                             ("intraretinal haemorrhage", "intraretinal haemorrhages"),
                             ("blot haemorrhage", "dot and blot haemorrhages")],
    "flame_haemorrhage": [("flame haemorrhage", "flame haemorrhages"), ("splinter haemorrhage", "splinter haemorrhages"),
                          ("flame-shaped haemorrhage", "flame-shaped haemorrhages")],
    "hard_exudate": [("cluster of hard exudates", "clusters of hard exudates"),
                     ("group of waxy exudates", "groups of waxy exudates"),
                     ("patch of hard exudates", "patches of hard exudates")],
    "cotton_wool_spot": [("cotton-wool spot", "cotton-wool spots"), ("soft exudate", "soft exudates"),
                         ("cotton wool spot (CWS)", "cotton wool spots (CWS)")],
    "drusen": [("druse", "drusen"), ("drusen deposit", "drusen")],
    "laser_scar": [("laser scar", "laser scars"), ("photocoagulation scar", "photocoagulation scars"),
                   ("laser burn", "laser burns")],
}
NUMBERS = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
EYE = {"right": ["right eye", "right eye (OD)"], "left": ["left eye", "left eye (OS)"]}
EYE_SHORT = {"right": ["right eye", "OD", "Right eye (OD)"], "left": ["left eye", "OS", "Left eye (OS)"]}
SHORT_Q = {"superotemporal": "superotemporal", "inferotemporal": "inferotemporal",
           "superonasal": "superonasal", "inferonasal": "inferonasal"}


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _count_phrase(rng, n: int, sg: str, pl: str) -> tuple[str, bool]:
    """("three microaneurysms", plural?)."""
    if n == 1:
        return f"{_pick(rng, ['a single', 'one', 'an isolated'])} {sg}", False
    if n < 10:
        return f"{_pick(rng, [NUMBERS[n], NUMBERS[n], 'a few' if n < 5 else 'several', str(n)])} {pl}", True
    return f"{_pick(rng, ['numerous', 'multiple', 'many', str(n), 'scattered'])} {pl}", True


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def location(rng, anat: Anatomy, pts) -> str:
    """Where points lie: at the macula, near the disc, or by quadrant (most first)."""
    pts = np.asarray(pts, float).reshape(-1, 2)
    if len(pts) == 0:
        return ""
    dd = anat.disc_diameter
    df = np.hypot(pts[:, 0] - anat.fovea[0], pts[:, 1] - anat.fovea[1])
    dc = np.hypot(pts[:, 0] - anat.disc[0], pts[:, 1] - anat.disc[1])
    if (df < 1.25 * dd).all():
        return _pick(rng, ["at the macula", "around the fovea", "within one disc diameter of the fovea", "in the macular area"])
    if (dc < 1.6 * dd).all():
        return _pick(rng, ["near the disc", "adjacent to the optic disc", "in the peripapillary area"])
    q = quadrant_of(anat, pts[:, 0], pts[:, 1])
    counts = {name: int((q == name).sum()) for name in QUADRANTS}
    present = sorted([k for k in QUADRANTS if counts[k]], key=lambda k: -counts[k])
    if len(present) == 4:
        return _pick(rng, ["in all four quadrants", "throughout all four quadrants", "in every quadrant"])
    if len(present) == 1:
        return f"in the {present[0]} quadrant"
    if len(present) == 2 and counts[present[0]] > 1.5 * counts[present[1]] and rng.random() < 0.5:
        return f"in the {present[0]} more than the {present[1]} quadrant"
    if (df < 0.62).all() and rng.random() < 0.3:
        return "in the posterior pole"
    return f"in the {_join(present)} quadrants"


def _lesion_sentence(rng, key, pts, anat, lab: EyeLabels) -> str:
    n = len(pts)
    loc = location(rng, anat, pts)
    sg, pl = _pick(rng, NOUNS[key])
    if key == "dot_blot_haemorrhage" and lab.dr_grade == 3:
        q = quadrant_of(anat, np.asarray(pts)[:, 0], np.asarray(pts)[:, 1])
        if min((q == name).sum() for name in QUADRANTS) > 20:
            return _pick(rng, [f"More than 20 {pl} in each of the four quadrants.",
                               f"Extensive {pl}, over twenty in every quadrant.",
                               f"Over 20 {pl} per quadrant in all four quadrants."])
    if key == "drusen":
        phrase = _pick(rng, ["numerous drusen", "multiple drusen", "scattered yellow drusen", "confluent drusen"]) if n >= 10 \
            else f"{NUMBERS[n] if n < 10 else n} drusen"
        return _cap(f"{phrase} {_pick(rng, ['are seen', 'are present', 'lie'])} {loc}.")
    if key == "laser_scar":
        return _pick(rng, [f"{_cap(pl)} in rows in the periphery.", f"Panretinal photocoagulation scars ({pl}) in the periphery.",
                           f"Multiple peripheral {pl}."])
    phrase, plural = _count_phrase(rng, n, sg, pl)
    verb = _pick(rng, ["are seen", "are present", "are noted"]) if plural else _pick(rng, ["is seen", "is present", "is noted"])
    form = int(rng.integers(3 if n > 1 else 2))
    if form == 0:
        return _cap(f"{phrase} {verb} {loc}.")
    if form == 1:
        return f"There {'are' if plural else 'is'} {phrase} {loc}."
    return f"{_cap(pl)}: {n} {loc}."


def _disc_sentence(rng, lab: EyeLabels, anat: Anatomy, findings) -> list[str]:
    c = f"{lab.cdr:.1f}"
    cdr = _pick(rng, [f"a cup-to-disc ratio of {c}", f"a CDR of {c}", f"a vertical cup-to-disc ratio of {c}"])
    out = []
    if lab.glaucoma:
        notch = ""
        if anat.notch:
            notch = _pick(rng, [f" and notching of the {anat.notch} rim", f", the rim notched at the {anat.notch} pole",
                                f" with {anat.notch} rim thinning"])
        out.append(_pick(rng, [f"The optic cup is enlarged with {cdr}{notch}.", f"Glaucomatous cupping with {cdr}{notch}.",
                               f"Thin neuro-retinal rim and {cdr}{notch}."]))
    else:
        out.append(_pick(rng, [f"The optic disc is pink and well defined with {cdr}.", f"Disc healthy, CDR {c}.",
                               f"Optic disc: sharp margins, {cdr}.", f"The disc is pink with {cdr}."]))
    if lab.myopia and rng.random() < 0.6:
        out.append(_pick(rng, ["The disc is tilted.", "Tilted, oval optic disc.", "The optic disc is obliquely inserted (tilted)."]))
    if "peripapillary_atrophy" in findings:
        out.append(_pick(rng, ["Peripapillary atrophy at the temporal disc margin.", "A pale peripapillary crescent temporally.",
                               "Temporal peripapillary atrophy (PPA)."]))
    if "nvd" in findings:
        out.append(_pick(rng, ["Neovascularisation at the disc (NVD).", "New vessels on the optic disc.", "NVD present."]))
    return out


def _vessel_sentences(rng, findings, anat) -> list[str]:
    out = []
    if "arteriolar_narrowing" in findings:
        s = _pick(rng, ["Generalised arteriolar narrowing", "Attenuated, straightened arterioles", "Diffuse arteriolar narrowing"])
        if "av_nicking" in findings:
            n = len(findings["av_nicking"])
            s += _pick(rng, [f" with AV nicking at {NUMBERS[n] if n < 10 else n} crossings", " with arteriovenous nicking",
                             " and AV nipping at arteriovenous crossings"])
        out.append(s + ".")
    if "venous_beading" in findings:
        q = sorted(set(quadrant_of(anat, *np.asarray(findings["venous_beading"]).T)))
        out.append(_pick(rng, [f"Venous beading in the {_join(q)} quadrants.", f"Beaded veins ({_join(q)}).",
                               f"Venous calibre irregularity (beading) {'in ' + str(len(q)) + ' quadrants' if len(q) > 1 else ''}."]
                      ).replace(" .", "."))
    if "venous_tortuosity" in findings:
        pts = findings["venous_tortuosity"]
        where = "all quadrants" if len(pts) >= 4 else f"the {quadrant_of(anat, *np.asarray(pts[0]))} arcade"
        out.append(_pick(rng, [f"Dilated tortuous veins in {where}.", f"The veins in {where} are engorged and tortuous."]))
    if "irma" in findings:
        out.append(_pick(rng, [f"Intraretinal microvascular abnormalities (IRMA) {location(rng, anat, findings['irma'])}.",
                               f"IRMA {location(rng, anat, findings['irma'])}."]))
    if "nve" in findings:
        out.append(_pick(rng, [f"Neovascularisation elsewhere (NVE) {location(rng, anat, findings['nve'])}.",
                               f"New vessels elsewhere {location(rng, anat, findings['nve'])}."]))
    if not out and rng.random() < 0.5:
        out.append(_pick(rng, ["Vessels of normal calibre.", "Normal arteriovenous ratio.", "The retinal vessels are unremarkable."]))
    return out


def _macula_sentences(rng, findings, anat) -> list[str]:
    out = []
    if "geographic_atrophy" in findings:
        out.append(_pick(rng, ["Geographic atrophy at the macula.", "A sharply demarcated area of atrophy at the fovea.",
                               "Macular atrophy with visible choroidal vessels."]))
    if "cnv_scar" in findings:
        out.append(_pick(rng, ["A grey-green choroidal neovascular membrane with surrounding haemorrhage at the macula.",
                               "Subretinal haemorrhage around a CNV membrane at the fovea.", "A disciform macular lesion with blood."]))
    if "preretinal_haemorrhage" in findings:
        out.append(_pick(rng, [f"A boat-shaped pre-retinal haemorrhage {location(rng, anat, findings['preretinal_haemorrhage'])}.",
                               f"Pre-retinal (subhyaloid) haemorrhage {location(rng, anat, findings['preretinal_haemorrhage'])}."]))
    if "tessellation" in findings:
        out.append(_pick(rng, ["Tessellated fundus.", "The fundus is tigroid, with visible choroidal vessels.",
                               "Marked tessellation of the background."]))
    return out


NEGATIVES = [
    (("nvd", "nve"), ["No neovascularisation.", "No new vessels.", "No NVD or NVE."]),
    (("dot_blot_haemorrhage", "flame_haemorrhage", "hard_exudate"), ["No haemorrhages or exudates.", "No retinal haemorrhages."]),
    (("microaneurysm",), ["No microaneurysms.", "No microaneurysms seen."]),
    (("cotton_wool_spot",), ["No cotton-wool spots."]),
    (("drusen", "geographic_atrophy", "cnv_scar", "hard_exudate"), ["The macula is flat with a normal foveal reflex.", "Macula normal.",
                                                                      "Fovea unremarkable."]),
    (("drusen",), ["No drusen."]),
    (("venous_beading", "venous_tortuosity"), ["No venous beading."]),
    (("preretinal_haemorrhage",), ["No pre-retinal or vitreous haemorrhage."]),
]


def _impression_terms(rng, lab: EyeLabels) -> list[str]:
    def variants(key, extra=()):
        e = knowledge.entry(key)
        return [e["name"], *[s for s in e["synonyms"] if "ICDR" not in s], *e["abbreviations"], *extra]

    terms = []
    if lab.unseen:  # only in the unseen evaluation task, never in a pretraining report
        terms.append(_pick(rng, variants(lab.unseen)))
    if lab.dr_grade:
        t = _pick(rng, variants(f"dr_grade_{lab.dr_grade}"))
        if lab.dme == 1:
            t += _pick(rng, [" with diabetic macular oedema not involving the centre", " with non-centre-involving DME",
                             " and mild macular oedema"])
        elif lab.dme == 2:
            t += _pick(rng, [" with centre-involving diabetic macular oedema", " with centre-involving DME",
                             " and clinically significant macular oedema"])
        elif rng.random() < 0.5:
            t += _pick(rng, [" without macular oedema", " without DME", ", no maculopathy"])
        terms.append(t)
    if lab.glaucoma:
        terms.append(_pick(rng, variants("glaucoma")))
    if lab.amd:
        terms.append(_pick(rng, {"drusen": ["dry age-related macular degeneration", "early AMD with drusen", "dry AMD"],
                                 "ga": ["geographic atrophy secondary to AMD", "advanced dry AMD with geographic atrophy", "atrophic AMD"],
                                 "wet": ["neovascular (wet) AMD", "wet age-related macular degeneration", "exudative AMD"]}[lab.amd]))
    if lab.hypertensive:
        sev = ["", "mild", "moderate", "severe"][lab.hypertensive]
        terms.append(f"{sev} {_pick(rng, ['hypertensive retinopathy', 'hypertensive retinal changes', 'HTN retinopathy'])}")
    if lab.myopia:
        terms.append(_pick(rng, variants("pathological_myopia", ["high myopia with myopic fundus changes"])))
    if lab.other:
        terms.append(_pick(rng, {"brvo": ["branch retinal vein occlusion", "BRVO", "branch vein occlusion"],
                                 "crvo": ["central retinal vein occlusion", "CRVO"],
                                 "laser": ["old laser photocoagulation scars", "laser-treated retina", "previous panretinal photocoagulation"]}[lab.other]))
    if lab.cataract:
        terms.append(_pick(rng, variants("cataract", ["media opacity consistent with cataract"])))
    if not terms:
        if lab.diabetic:
            terms.append(_pick(rng, ["no apparent diabetic retinopathy", "no diabetic retinopathy", "no DR"]))
        else:
            terms.append(_pick(rng, variants("normal", ["no abnormality detected"])))
    return terms


def write_report(rng: np.random.Generator, lab: EyeLabels, findings: dict, anat: Anatomy, eye: str) -> str:
    """The full clinical report (findings and impression) of one eye."""
    opening = _pick(rng, [f"Colour fundus photograph of the {_pick(rng, EYE[eye])}, macula-centred.",
                          f"Fundus photograph, {_pick(rng, EYE[eye])}.",
                          f"{_cap(_pick(rng, EYE_SHORT[eye]))}: macula-centred colour fundus image.",
                          f"Macula-centred fundus image of the {_pick(rng, EYE[eye])}."])
    parts: list[list[str]] = []
    if lab.cataract:
        parts.append([_pick(rng, ["The view is hazy owing to media opacity.", "Hazy media blur the details, consistent with lens opacity.",
                                  "Poor view through a cloudy lens."])])
    elif rng.random() < 0.4:
        parts.append([_pick(rng, ["Media clear.", "Clear media.", "Good view through clear media."])])
    parts.append(_disc_sentence(rng, lab, anat, findings))
    parts.append(_vessel_sentences(rng, findings, anat))
    for key in NOUNS:
        if key in findings:
            parts.append([_lesion_sentence(rng, key, findings[key], anat, lab)])
    if "hard_exudate" in findings and lab.dme == 2 and rng.random() < 0.6:
        parts.append([_pick(rng, ["A circinate ring of exudates involves the centre of the macula.",
                                  "Exudates encroach on the fovea."])])
    parts.append(_macula_sentences(rng, findings, anat))
    order = rng.permutation(len(parts))
    body = [s for i in order for s in parts[i]]
    absent = [opts for keys, opts in NEGATIVES if not any(k in findings for k in keys)]
    n_neg = min(len(absent), int(rng.integers(1, 4)) + (1 if not findings else 0))
    for i in rng.permutation(len(absent))[:n_neg]:
        body.insert(int(rng.integers(len(body) + 1)), _pick(rng, absent[i]))
    terms = _impression_terms(rng, lab)
    if len(terms) > 2:                       # the leading diagnosis stays first
        tail = terms[1:]
        rng.shuffle(tail)
        terms = terms[:1] + tail
    head = _pick(rng, ["Impression", "Conclusion", "Diagnosis", "Assessment"])
    impression = f"{head}: {_join(terms) if rng.random() < 0.5 else '; '.join(terms)}."
    findings_txt = " ".join(body)
    if rng.random() < 0.15:
        return f"{opening} {impression} Findings: {findings_txt}"
    return f"{opening} {findings_txt} {impression}"


def short_text(lab: EyeLabels) -> str:
    """The class-name form: "moderate non-proliferative diabetic retinopathy, glaucoma"."""
    return ", ".join(knowledge.name(k) for k in lab.keys())


def definition_text(lab: EyeLabels) -> str:
    """The definition form: "glaucoma, progressive optic nerve damage ...; cataract, ..."."""
    return "; ".join(knowledge.definition_text(k) for k in lab.keys()) + "."
