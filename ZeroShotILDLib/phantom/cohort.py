"""Cohorts of phantoms, in memory or written to disk with a manifest."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from ..atomic_files import atomic_path
from .. import csv_files
from ..errors import InputError
from .checks import _check_count, _check_seed, _is_number
from .constants import MANIFEST_COLUMNS, SUBTYPES
from .generate import generate_phantom
from .volume import Phantom

#: ``generate_phantom`` arguments that ``generate_cohort`` also takes as a range ``(lo, hi)``.
RANGED = ("involvement", "noise_hu", "lung_hu")


def generate_cohort(n: int, seed: int = 0, positive_fraction: float = 0.5, *, involvement=None,
                    **kwargs) -> Iterator[Phantom]:
    """Yield ``n`` phantoms: ``round(n * positive_fraction)`` with ILD, in a seeded order.

    Positives cycle through ``SUBTYPES`` (balanced) unless ``subtype`` is given in ``kwargs``.
    Each phantom gets its own seed drawn from ``seed`` (stored in ``labels["seed"]``, so any one
    can be regenerated alone). Other ``kwargs`` go to ``generate_phantom``.

    ``involvement``: None keeps each style's own draw (12-30 % of the lung); a number gives every
    positive that fraction of the lung; ``(lo, hi)`` draws it uniformly per positive. Normals
    then get ``labels["involvement"] == 0.0``. ``noise_hu`` and ``lung_hu`` may also be given as
    ``(lo, hi)``: drawn uniformly per phantom. Ranged draws come from their own stream, so the
    phantoms' seeds, order and subtypes do not depend on them; each phantom's drawn values are
    in its ``labels`` (``involvement``) or can be regenerated with ``labels["seed"]`` and the
    same cohort arguments.
    """
    n = _check_count(n)
    seed = _check_seed(seed, "Cohort seed")
    try:
        fraction_ok = 0.0 <= float(positive_fraction) <= 1.0
    except (TypeError, ValueError):
        fraction_ok = False
    if not fraction_ok:
        raise InputError(f"positive_fraction must be in [0, 1], got {positive_fraction!r}.")
    for key in ("seed", "ild"):
        if key in kwargs:
            raise InputError(f"generate_cohort sets '{key}' itself: do not pass it in kwargs.")
    rng = np.random.default_rng([int(seed), 1000])
    n_pos = int(round(n * float(positive_fraction)))
    is_pos = np.zeros(n, dtype=bool)
    is_pos[:n_pos] = True
    rng.shuffle(is_pos)
    subtypes = [SUBTYPES[i % len(SUBTYPES)] for i in range(n_pos)]
    rng.shuffle(subtypes)
    seeds = rng.choice(2**31 - 1, size=n, replace=False) if n else []
    fixed_subtype = kwargs.pop("subtype", None)
    ranges = {"involvement": involvement} if involvement is not None else {}
    for key in ("noise_hu", "lung_hu"):
        if isinstance(kwargs.get(key), (tuple, list)):
            ranges[key] = kwargs.pop(key)
    for key, value in ranges.items():
        if isinstance(value, (tuple, list)):
            ok = len(value) == 2 and all(_is_number(v) for v in value) and value[0] <= value[1]
            if not ok:
                raise InputError(f"{key} must be a number or a range (lo, hi) with lo <= hi, got {value!r}.")
    draws = np.random.default_rng([int(seed), 1001])

    def drawn(key, positive):
        value = ranges[key]
        if key == "involvement" and not positive:
            return 0.0
        return float(draws.uniform(value[0], value[1])) if isinstance(value, (tuple, list)) else value

    def phantoms():
        pos_i = 0
        for i in range(n):
            extra = {key: drawn(key, bool(is_pos[i])) for key in RANGED if key in ranges}
            if is_pos[i]:
                sub = fixed_subtype or subtypes[pos_i]
                pos_i += 1
                yield generate_phantom(int(seeds[i]), ild=True, subtype=sub, **kwargs, **extra)
            else:
                yield generate_phantom(int(seeds[i]), ild=False, **kwargs, **extra)
    return phantoms()


def write_cohort(out_dir, n, seed=0, positive_fraction=0.5, fmt=".nii.gz", **kwargs) -> Path:
    """Write ``n`` phantoms and a ``manifest.csv`` describing them; return the manifest path.

    Scans go to ``out_dir/scans/phantom_XXXX<fmt>``. The manifest has the columns
    ``scan_path`` (relative to the manifest's folder), ``report_text``, ``ild`` (0/1),
    ``subtype`` (empty for normals), ``patient_id`` and ``split`` (left empty for the caller).
    """
    fmt = str(fmt)
    if not fmt.startswith("."):
        fmt = "." + fmt
    if fmt.lower() not in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        raise InputError(f"Unsupported cohort format {fmt!r}: use .nii.gz, .nii, .nrrd or .mha.")
    # Validate the arguments before anything is created on disk.
    cohort = generate_cohort(n, seed=seed, positive_fraction=positive_fraction, **kwargs)
    out_dir = Path(out_dir)
    (out_dir / "scans").mkdir(parents=True, exist_ok=True)
    manifest = out_dir / "manifest.csv"
    rows = []
    for i, ph in enumerate(cohort):
        rel = Path("scans") / f"phantom_{i:04d}{fmt}"
        ph.save(out_dir / rel)
        rows.append({
            "scan_path": rel.as_posix(),
            "report_text": ph.report,
            "ild": int(ph.labels["ild"]),
            "subtype": ph.labels["subtype"] or "",
            "patient_id": f"SYN{ph.labels['seed']:010d}",
            "split": "",
        })
    # A reader (or a killed run's next attempt) never sees a half-written manifest.
    with atomic_path(manifest) as partial, open(partial, "w", newline="", encoding="utf-8") as fh:
        writer = csv_files.DictWriter(fh, fieldnames=list(MANIFEST_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    return manifest
