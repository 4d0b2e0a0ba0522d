"""Patient-grouped splits whose *images* keep the cohort's class balance, and what each split holds.

``manifest.split_by_patient(stratify=...)`` balances patients: a positive patient with twelve
images and a negative one with two count the same, so the image shares drift (COVID-CT: 38.7 %
COVID images in validation against 49.8 % overall) while every AUROC is computed per image.
:func:`stratified_patient_split` keeps patients whole and balances the images of each label value
instead; :func:`split_balance` reports images and patients per split and value.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from ZeroShotILDLib.errors import InputError

from .manifest import check_label, label_value

SPLITS = ("train", "val", "test")
#: Stratum of rows whose label is blank.
BLANK = "(blank)"


def _value(record, label: str) -> str:
    value = label_value(record, label)
    return BLANK if value is None else str(value)


def stratified_patient_split(records: Sequence, *, val_fraction: float = 0.1, test_fraction: float = 0.0,
                             seed: int = 0, stratify: str) -> list:
    """Assign train/val/test by patient so that each split's *images* of every label value come close
    to the split's share of them.

    Rows that already have a split keep it and their patient follows (as in
    ``manifest.split_by_patient``); rows without a patient id are their own patient. The free
    patients are shuffled with ``seed`` (from sorted order, so row order does not matter), then
    taken largest first; each goes to the split where its images bring the per-value image counts
    nearest to their targets (``fraction x`` the free images of that value; squared relative
    error). Patients are never divided.

    Parameters
    ----------
    records : sequence of manifest.ManifestRecord
    val_fraction, test_fraction : float
        Shares of the free images for val and test (train takes the rest).
    seed : int
    stratify : str
        ``ild``, ``subtype`` or a ``label_<name>`` column; blank values form their own stratum.

    Returns
    -------
    list of ManifestRecord
        Copies with ``split`` set, in input order.
    """
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0 and val_fraction + test_fraction < 1.0):
        raise InputError(f"val fraction {val_fraction} and test fraction {test_fraction} must be in [0, 1) and leave "
                         "some patients for training")
    label = check_label(records, stratify)
    fixed: dict = {}
    for r in records:
        if r.split is not None and fixed.setdefault(r.patient_key, r.split) != r.split:
            raise InputError(f"{r.source}: patient {r.patient_id} is in split {r.split} here and {fixed[r.patient_key]} "
                             "in another row: a patient's scans belong to one split")
    values = sorted({_value(r, label) for r in records})
    column = {v: i for i, v in enumerate(values)}
    counts: dict = {}
    for r in records:
        if r.patient_key in fixed:
            continue
        counts.setdefault(r.patient_key, np.zeros(len(values)))[column[_value(r, label)]] += 1
    free = sorted(counts)
    shuffled = [free[i] for i in np.random.default_rng(seed).permutation(len(free))]
    # Largest patients first (stable: equal sizes keep the seeded order): small ones then fill the gaps.
    order = sorted(shuffled, key=lambda key: -counts[key].sum())
    total = sum(counts.values()) if counts else np.zeros(len(values))
    shares = {"train": 1.0 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction}
    target = {s: shares[s] * total for s in SPLITS}
    current = {s: np.zeros(len(values)) for s in SPLITS}
    scale = np.maximum(total, 1.0)

    def cost(split: str, add: np.ndarray) -> float:
        after = current[split] + add
        before = current[split]
        return float((((after - target[split]) / scale) ** 2).sum() - (((before - target[split]) / scale) ** 2).sum())

    assigned = dict(fixed)
    for key in order:
        candidates = [s for s in SPLITS if shares[s] > 0]
        best = min(candidates, key=lambda s: (cost(s, counts[key]), SPLITS.index(s)))
        assigned[key] = best
        current[best] += counts[key]
    # A split asked for but left empty (every patient larger than its share) takes the smallest patient of train.
    for split in ("val", "test"):
        if shares[split] > 0 and not any(s == split for k, s in assigned.items() if k in counts):
            donors = [k for k in order if assigned[k] == "train"]
            if len(donors) > 1:
                assigned[donors[-1]] = split
    return [dataclasses.replace(r, split=assigned[r.patient_key]) for r in records]


def split_balance(records: Sequence, label: Optional[str] = None) -> list:
    """Per split: images, patients and, with ``label``, images and patients per value and the share of
    positive images / patients (a patient counts as positive if any of its images is)."""
    rows = []
    names = sorted({r.split for r in records if r.split}, key=lambda s: (SPLITS.index(s) if s in SPLITS else 9, s))
    for name in names:
        mine = [r for r in records if r.split == name]
        row = {"split": name, "images": len(mine), "patients": len({r.patient_key for r in mine})}
        if label:
            by_patient: dict = {}
            for r in mine:
                v = _value(r, label)
                row[f"images {label}={v}"] = row.get(f"images {label}={v}", 0) + 1
                by_patient.setdefault(r.patient_key, set()).add(v)
            positive_images = sum(1 for r in mine if _value(r, label) == "1")
            known = [r for r in mine if _value(r, label) != BLANK]
            if known and {_value(r, label) for r in known} <= {"0", "1"}:
                row["positive images %"] = round(100.0 * positive_images / len(known), 1)
                patients = [p for p, vs in by_patient.items() if vs - {BLANK}]
                row["positive patients %"] = round(100.0 * sum(1 for p in patients if "1" in by_patient[p])
                                                   / max(1, len(patients)), 1)
        rows.append(row)
    return rows
