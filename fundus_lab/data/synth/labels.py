"""Disease labels of synthetic patients and eyes, and the disease mix of each task.

A patient has systemic conditions (diabetes, hypertension, myopia) and an age; both eyes
inherit them, so diseases correlate across eyes the way they do in ODIR: DR grades differ
by at most one step, glaucoma/cataract/AMD are usually bilateral, a vein occlusion is
usually one-sided. Each task draws from its own mix:

- pretrain / odir: multi-label, eight ODIR categories, most eyes single-label
- fives: exactly one of A, D, G, N per eye, balanced over patients
- aptos: diabetic patients with every DR grade 0-4 well represented
- unseen: diseases no pretraining image or text has (``UNSEEN``), alternating by patient,
  drawn from lesions the seen diseases share: Purtscher retinopathy (cotton-wool spots
  and flame haemorrhages around the disc, both eyes as after trauma or pancreatitis) and
  ocular ischaemic syndrome (mid-peripheral dot-blot haemorrhages and microaneurysms,
  narrowed arterioles; one-sided in about 80 % of patients, but both eyes here so that the
  class is the patient's)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np

ODIR_CODES = ("N", "D", "G", "C", "A", "H", "M", "O")
TASKS = ("pretrain", "odir", "fives", "aptos", "unseen")
# Unseen diseases (knowledge keys, ``in_pretraining: false``) and their label codes.
UNSEEN = {"P": "purtscher_retinopathy", "I": "ocular_ischaemic_syndrome"}
TASK_IDS = {t: i for i, t in enumerate(TASKS)}


@dataclass
class EyeLabels:
    """What one eye has. ``cataract`` is the haze strength (0 none .. 1 dense)."""

    dr_grade: int = 0
    dme: int = 0
    glaucoma: bool = False
    cataract: float = 0.0
    amd: Optional[str] = None          # "drusen" | "ga" | "wet"
    hypertensive: int = 0              # 0 none, 1 mild, 2 moderate, 3 severe
    myopia: bool = False
    other: Optional[str] = None        # "brvo" | "crvo" | "laser"
    cdr: float = 0.3
    age: float = 55.0
    diabetic: bool = False             # a diabetic without DR is "no apparent DR"
    unseen: Optional[str] = None       # a key of UNSEEN's values: a disease pretraining never sees

    def __post_init__(self):
        if not 0 <= int(self.dr_grade) <= 4:
            raise ValueError(f"EyeLabels.dr_grade: expected 0-4, got {self.dr_grade}")
        if not 0 <= int(self.dme) <= 2:
            raise ValueError(f"EyeLabels.dme: expected 0-2, got {self.dme}")
        if self.dme and self.dr_grade < 2:
            raise ValueError("EyeLabels.dme: hard exudates need DR grade >= 2 here")
        if self.amd not in (None, "drusen", "ga", "wet"):
            raise ValueError(f"EyeLabels.amd: expected None, 'drusen', 'ga' or 'wet', got {self.amd!r}")
        if self.other not in (None, "brvo", "crvo", "laser"):
            raise ValueError(f"EyeLabels.other: expected None, 'brvo', 'crvo' or 'laser', got {self.other!r}")
        if not 0 <= self.hypertensive <= 3:
            raise ValueError(f"EyeLabels.hypertensive: expected 0-3, got {self.hypertensive}")
        if self.unseen not in (None, *UNSEEN.values()):
            raise ValueError(f"EyeLabels.unseen: expected None or one of {list(UNSEEN.values())}, got {self.unseen!r}")
        if not 0.05 <= self.cdr <= 0.95:
            raise ValueError(f"EyeLabels.cdr: expected 0.05-0.95, got {self.cdr}")

    def odir(self) -> dict[str, int]:
        """The eight ODIR categories; N only when nothing else applies."""
        d = {
            "D": int(self.dr_grade > 0 or self.dme > 0),
            "G": int(self.glaucoma),
            "C": int(self.cataract > 0),
            "A": int(self.amd is not None),
            "H": int(self.hypertensive > 0),
            "M": int(self.myopia),
            "O": int(self.other is not None or self.unseen is not None),  # ODIR files rare diseases as other
        }
        return {"N": int(not any(d.values())), **d}

    def fives_class(self) -> str:
        """A, D, G or N when the eye is exactly one of those, else ''."""
        on = [k for k, v in self.odir().items() if v]
        return on[0] if len(on) == 1 and on[0] in "ADGN" else ""

    def unseen_class(self) -> str:
        """The UNSEEN code (P, I) of the eye's unseen disease, else ''."""
        return next((c for c, k in UNSEEN.items() if k == self.unseen), "")

    def keys(self) -> list[str]:
        """Knowledge keys of what the eye has, most important first."""
        out = [self.unseen] if self.unseen else []
        if self.dr_grade:
            out.append(f"dr_grade_{self.dr_grade}")
        if self.dme:
            out.append("dme")
        for flag, key in ((self.glaucoma, "glaucoma"), (self.amd, "amd"),
                          (self.hypertensive, "hypertensive_retinopathy"),
                          (self.myopia, "pathological_myopia"), (self.other, "other"),
                          (self.cataract, "cataract")):
            if flag:
                out.append(key)
        if not out:
            return ["dr_grade_0"] if self.diabetic else ["normal"]
        return out

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Patient:
    patient_id: str
    age: float
    camera: str
    split: str
    eyes: dict[str, EyeLabels] = field(default_factory=dict)


def _cdr(rng, glaucoma: bool) -> float:
    return round(float(rng.uniform(0.6, 0.9) if glaucoma else rng.uniform(0.1, 0.4)), 2)


def _amd_type(rng) -> str:
    return str(rng.choice(["drusen", "ga", "wet"], p=[0.55, 0.25, 0.2]))


def _eye(rng, age, *, grade=0, dme=None, glaucoma=False, cataract=False, amd=None, hyp=0,
         myopia=False, other=None, diabetic=False) -> EyeLabels:
    if dme is None:
        dme = int(rng.choice([0, 1, 2], p=[0.6, 0.25, 0.15])) if grade >= 2 else 0
    return EyeLabels(dr_grade=int(grade), dme=int(dme), glaucoma=bool(glaucoma),
                     cataract=round(float(rng.uniform(0.35, 1.0)), 2) if cataract else 0.0,
                     amd=amd, hypertensive=int(hyp), myopia=bool(myopia), other=other,
                     cdr=_cdr(rng, glaucoma), age=float(age), diabetic=diabetic or grade > 0)


def _odir_patient(rng, age):
    """ODIR-like mix: one primary category per patient, sometimes a second one."""
    cats = ["N", "D", "G", "C", "A", "H", "M", "O"]
    p = np.array([0.22, 0.26, 0.09, 0.09, 0.09, 0.08, 0.08, 0.09])
    primary = str(rng.choice(cats, p=p))
    conditions = {primary}
    if primary != "N" and rng.random() < 0.18:
        second = str(rng.choice(cats[1:], p=p[1:] / p[1:].sum()))
        conditions.add(second)
    if primary in ("C", "A"):
        age = max(age, rng.uniform(60, 85))
    base_grade = int(rng.choice([1, 2, 3, 4], p=[0.3, 0.35, 0.2, 0.15]))
    hyp = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
    amd = _amd_type(rng)
    other_kind = str(rng.choice(["brvo", "crvo", "laser"], p=[0.45, 0.2, 0.35]))
    other_eye = str(rng.choice(["left", "right"]))
    eyes = {}
    for eye in ("right", "left"):
        # a bilateral condition spares the second eye sometimes
        spared = rng.random() < 0.2
        has = {c for c in conditions if c != "N" and not (spared and eye == "left")}
        if "O" in has and eye != other_eye:
            has.discard("O")
        grade = int(np.clip(base_grade + rng.choice([-1, 0, 0, 1]), 1, 4)) if "D" in has else 0
        eyes[eye] = _eye(rng, age, grade=grade, glaucoma="G" in has, cataract="C" in has,
                         amd=amd if "A" in has else None, hyp=hyp if "H" in has else 0,
                         myopia="M" in has, other=other_kind if "O" in has else None,
                         diabetic="D" in conditions)
    return age, eyes


def _fives_patient(rng, age, cls):
    """One FIVES class (A, D, G, N) for both eyes, nothing else."""
    if cls == "A":
        age = rng.uniform(60, 88)
    eyes = {}
    for eye in ("right", "left"):
        if cls == "D":
            g = int(rng.choice([1, 2, 3, 4], p=[0.2, 0.35, 0.25, 0.2]))
            eyes[eye] = _eye(rng, age, grade=g)
        else:
            eyes[eye] = _eye(rng, age, glaucoma=cls == "G", amd=_amd_type(rng) if cls == "A" else None)
    return age, eyes


def _unseen_patient(rng, age, code):
    """Both eyes with the unseen disease ``code`` (UNSEEN), nothing else."""
    if code == "I":  # carotid disease: older patients
        age = rng.uniform(55, 85)
    return age, {eye: _eye(rng, age) for eye in ("right", "left")}


def _aptos_patient(rng, age, base_grade):
    eyes = {}
    for eye in ("right", "left"):
        g = base_grade if eye == "right" else int(np.clip(base_grade + rng.choice([-1, 0, 0, 0, 1]), 0, 4))
        eyes[eye] = _eye(rng, age, grade=g, diabetic=True)
    return age, eyes


# Patient slot -> split. Slot = (index * SLOT_STEP) % N_SLOTS; N_SLOTS is prime, so the
# slot is independent of the class schedules (fives: index % 4, aptos: index % 5) and every
# class reaches every split in proportion. 6/11 train, 1/11 val, 2/11 in-domain test (the
# training cameras, unseen patients) and 2/11 held-out camera test.
N_SLOTS = 11
SLOT_STEP = 4
SLOT_SPLITS = ("train",) * 6 + ("val", "test", "test", "test_camera", "test_camera")
SPLIT_NAMES = ("train", "val", "test", "test_camera")


def patient_split(index: int, held_out: bool) -> str:
    """Split of patient ``index``: train | val | test | test_camera (see SLOT_SPLITS).

    Without a held-out camera the ``test_camera`` slots join the in-domain ``test``."""
    split = SLOT_SPLITS[(index * SLOT_STEP) % N_SLOTS]
    return "test" if split == "test_camera" and not held_out else split


def sample_patient(rng: np.random.Generator, task: str, index: int, cameras: list[str],
                   held_out: Optional[str]) -> Patient:
    """Patient ``index`` of ``task``: age, camera, split and both eyes' labels.

    Split (``patient_split``): the held-out camera's patients are ``test_camera``; the
    others are photographed by a training camera and split into train, val and an
    in-domain ``test``. The slot is a fixed function of the patient index, not a random
    draw, so every split has patients from the ninth patient on (a smoke-sized set
    included), and a patient never crosses splits. The pretraining set has no test
    splits: its test slots are training data.
    """
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; expected one of {list(TASKS)}")
    train_cams = [c for c in cameras if c != held_out]
    has_held = held_out is not None and held_out in cameras
    split = patient_split(index, has_held)
    if has_held and (not train_cams or split == "test_camera"):
        camera = held_out
    else:
        camera = str(train_cams[int(rng.integers(len(train_cams)))])
    if task == "pretrain":
        split = "val" if split == "val" else "train"
    age = float(rng.uniform(25, 85))
    if task in ("pretrain", "odir"):
        age, eyes = _odir_patient(rng, age)
    elif task == "fives":
        age, eyes = _fives_patient(rng, age, "ADGN"[index % 4])
    elif task == "unseen":
        code = tuple(UNSEEN)[index % len(UNSEEN)]
        age, eyes = _unseen_patient(rng, age, code)
        for e in eyes.values():
            e.unseen = UNSEEN[code]
    else:
        age, eyes = _aptos_patient(rng, age, index % 5)
    for e in eyes.values():
        e.age = round(float(age), 1)
    return Patient(patient_id=f"{task}-{index:06d}", age=round(float(age), 1), camera=camera, split=split, eyes=eyes)
