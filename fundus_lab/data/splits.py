"""Train/val/test splits: official where the dataset has one, otherwise seeded, stratified
and grouped by patient, and saved to JSON so a run can reuse and audit its split.

Grouping matters: the two eyes of one person are strongly correlated (same camera day,
same systemic disease), so a split by image leaks the test set into training. The unit
of splitting is therefore the patient (or the image where no patient id exists).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from fundus_lab.data.images import DataError
from fundus_lab.data.manifest import SPLIT_VALUES
from fundus_lab.data.records import Record

SPLIT_FILE_VERSION = 1


def group_of(rec: Record, root: Union[str, Path, None] = None) -> str:
    """The unit that must stay within one split: the patient, else the image."""
    return f"patient:{rec.patient_id}" if rec.patient_id is not None else f"image:{rec.key(root)}"


def _stratum(labels: list, multilabel: bool, class_freq: Counter) -> str:
    """Stratum of a group: the worst (highest) class for single-label data, which for DR
    grades is the patient's worse eye; for multi-label data the rarest class present
    (the usual greedy approximation of iterative stratification)."""
    if not multilabel:
        return str(max(labels))
    present = {i for vec in labels for i, v in enumerate(vec) if v}
    if not present:
        return "none"
    return str(min(present, key=lambda i: (class_freq[i], i)))


def assign_splits(
    records: Sequence[Record],
    fractions: dict[str, float],
    seed: int = 0,
    stratify: bool = True,
    root: Union[str, Path, None] = None,
) -> dict[str, str]:
    """Split records that have no official split; returns {record key: split}.

    Groups (patients) are ordered by a seeded shuffle within each stratum; group j of n in a
    stratum gets u_j = ((j + r) / n) mod 1, r ~ U[0, 1) per stratum, and the split whose
    cumulative fraction interval contains u_j. So each stratum is divided in proportion to
    ``fractions`` (a stratum of one group falls into a split with probability = its
    fraction). A split with a positive fraction that would stay empty takes one group
    from the largest split, when there are enough groups.
    """
    todo = [r for r in records if r.split is None]
    if not todo:
        return {}
    names = [s for s in ("train", "val", "test") if fractions.get(s, 0) > 0]
    bounds = np.cumsum([fractions[s] for s in names])
    bounds[-1] = 1.0
    groups: dict[str, list[Record]] = defaultdict(list)
    for r in todo:
        groups[group_of(r, root)].append(r)
    multilabel = isinstance(todo[0].label, list)
    class_freq: Counter = Counter()
    if multilabel:
        for recs in groups.values():
            for i in {i for r in recs for i, v in enumerate(r.label) if v}:
                class_freq[i] += 1
    strata: dict[str, list[str]] = defaultdict(list)
    for g in sorted(groups):
        key = _stratum([r.label for r in groups[g]], multilabel, class_freq) if stratify else "all"
        strata[key].append(g)
    rng = np.random.default_rng(seed)
    group_split: dict[str, str] = {}
    # a patient with some officially split records keeps the rest in the same split
    official = {group_of(r, root): r.split for r in records if r.split is not None}
    for g in list(groups):
        if g in official:
            group_split[g] = official[g]
            for key in strata:
                if g in strata[key]:
                    strata[key].remove(g)
    for key in sorted(strata):
        members = [strata[key][i] for i in rng.permutation(len(strata[key]))]
        r0 = rng.random()
        n = len(members)
        for j, g in enumerate(members):
            u = ((j + r0) / n) % 1.0
            group_split[g] = names[int(np.searchsorted(bounds, u, side="right").clip(0, len(names) - 1))]
    # no requested split left empty when the groups allow it
    counts = Counter(group_split.values())
    for s in names:
        if counts[s] == 0 and len(group_split) >= len(names):
            donor = max(names, key=lambda k: counts[k])
            if counts[donor] <= 1:
                continue
            g = sorted(g for g, v in group_split.items() if v == donor)[int(rng.integers(counts[donor]))]
            group_split[g] = s
            counts[donor] -= 1
            counts[s] += 1
    return {r.key(root): group_split[group_of(r, root)] for r in todo}


def check_patient_disjoint(records: Sequence[Record], where: str = "") -> None:
    """Raise if any patient has records in two splits (a leak between train and test)."""
    seen: dict[str, set] = defaultdict(set)
    for r in records:
        if r.patient_id is not None and r.split is not None:
            seen[r.patient_id].add(r.split)
    leaks = {p: sorted(s) for p, s in seen.items() if len(s) > 1}
    if leaks:
        examples = ", ".join(f"{p}: {s}" for p, s in list(leaks.items())[:5])
        raise DataError(f"{where}: {len(leaks)} patient(s) appear in more than one split ({examples})")


def save_split_file(path: Union[str, Path], records: Sequence[Record], root: Union[str, Path], info: dict) -> None:
    """Write {record key: split} plus the patient of each record, for reuse and audit."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "version": SPLIT_FILE_VERSION,
        **info,
        "counts": dict(Counter(r.split for r in records)),
        "splits": {r.key(root): r.split for r in records},
        "patients": {r.key(root): r.patient_id for r in records if r.patient_id is not None},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, ensure_ascii=False))
    tmp.replace(path)


def load_split_file(path: Union[str, Path], records: Sequence[Record], root: Union[str, Path]) -> None:
    """Set ``split`` of every record from a saved split file; records the file does not
    know (or a file naming records that are gone) are an error, not a silent re-split."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"split file {path} cannot be read as JSON ({err})") from None
    splits = payload.get("splits") if isinstance(payload, dict) else None
    if not isinstance(splits, dict):
        raise DataError(f"split file {path}: missing field 'splits' (a mapping of record key -> train|val|test)")
    keys = [r.key(root) for r in records]
    unknown = [k for k in keys if k not in splits]
    gone = set(splits) - set(keys)
    if unknown or gone:
        raise DataError(
            f"split file {path} does not match the dataset under {root}: {len(unknown)} record(s) not in the file "
            f"(e.g. {unknown[:3]}), {len(gone)} file entr(ies) without a record (e.g. {sorted(gone)[:3]})"
        )
    bad = {k: v for k, v in splits.items() if not isinstance(v, str) or v not in SPLIT_VALUES}
    if bad:
        examples = ", ".join(f"{k!r}: {v!r}" for k, v in list(bad.items())[:3])
        raise DataError(
            f"split file {path}: field 'splits' has {len(bad)} value(s) that are not a split name (e.g. {examples}); "
            "expected train, val or test (or test_camera); fix those entries, or delete the file to split again "
            "(the new split then differs from the runs that used this file)")
    for r, k in zip(records, keys):
        r.split = splits[k]


def split_counts(records: Sequence[Record]) -> dict[str, int]:
    return dict(Counter(r.split for r in records))


def make_splits(
    records: Sequence[Record],
    fractions: dict[str, float],
    seed: int,
    stratify: bool,
    root: Union[str, Path],
    split_file: Optional[Union[str, Path]] = None,
    info: Optional[dict] = None,
    where: str = "",
) -> None:
    """Fill in ``split`` of every record (in place): from ``split_file`` when it exists,
    otherwise official splits + :func:`assign_splits`, then saved to ``split_file`` if given."""
    if split_file is not None and Path(split_file).is_file():
        load_split_file(split_file, records, root)
    else:
        assigned = assign_splits(records, fractions, seed, stratify, root)
        for r in records:
            if r.split is None:
                r.split = assigned[r.key(root)]
        if split_file is not None:
            save_split_file(split_file, records, root, {**(info or {}), "seed": seed, "fractions": fractions})
    check_patient_disjoint(records, where)
