"""The cohort at a glance, from the manifest and the cached montages: written by ``preprocess``.

One row per split (and one for the whole cohort): scans, patients, scans with and without text,
distinct texts (identical texts are each other's negatives in a contrastive batch), montages
finished / failed / partly empty (fewer candidate patches than cells: the rest is blank), and the
class counts of every yes/no label. Counts only: no report text is read into the table or logs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional, Sequence

from .manifest import label_names, label_value

QC_NAME = "cohort_qc.csv"


def _text(record) -> Optional[str]:
    from ZeroShotILDLib.errors import InputError

    try:
        text = record.read_report()
    except (InputError, OSError):  # an unreadable report file is the training's error to report, not the table's
        return None
    return text.strip() if text and text.strip() else None


def montage_cells(png: Path) -> Optional[int]:
    """Patches in a cached montage (its sidecar's ``patches``), or None when the sidecar is unreadable."""
    try:
        info = json.loads(Path(png).with_suffix(".json").read_text(encoding="utf-8"))
        return len(info.get("patches") or [])
    except (OSError, ValueError, TypeError):
        return None


def cohort_qc(records: Sequence, montages: Mapping[str, Path], *, grid_n: int, failed: Sequence[str] = ()) -> list:
    """Rows of the QC table: ``all`` first, then each split (``unassigned`` for rows without one)."""
    labels = [n for n in label_names(records) if n != "subtype" and any(label_value(r, n) is not None for r in records)]
    failed = set(failed)
    cells = grid_n * grid_n
    groups = {"all": list(records)}
    for r in records:
        groups.setdefault(r.split or "unassigned", []).append(r)
    rows = []
    for name, mine in groups.items():
        texts = [_text(r) for r in mine]
        present = [t for t in texts if t is not None]
        filled = [montage_cells(montages[r.scan_id]) for r in mine if r.scan_id in montages]
        row = {"split": name, "scans": len(mine), "patients": len({r.patient_key for r in mine}),
               "with_text": len(present), "without_text": len(mine) - len(present), "distinct_texts": len(set(present)),
               "montages": len(filled), "failed": sum(1 for r in mine if r.scan_id in failed),
               "partly_empty_montages": sum(1 for n in filled if n is not None and n < cells)}
        for label in labels:
            values = [label_value(r, label) for r in mine]
            for v in sorted({v for v in values if v is not None}, key=str):
                row[f"{label}={v}"] = values.count(v)
            row[f"{label}=blank"] = values.count(None)
        rows.append(row)
    return rows


def qc_line(rows: Sequence[Mapping]) -> str:
    """One summary line of :func:`cohort_qc`'s table."""
    whole = rows[0]
    splits = " / ".join(f"{r['split']} {r['scans']}" for r in rows[1:])
    line = (f"cohort QC: {whole['scans']} scans of {whole['patients']} patients ({splits}); "
            f"{whole['without_text']} without text; {whole['with_text']} texts, {whole['distinct_texts']} distinct; "
            f"{whole['montages']} montages, {whole['partly_empty_montages']} partly empty, {whole['failed']} failed")
    return line


def write_qc(rows: Sequence[Mapping], path: Path) -> Path:
    """The table as CSV (formula-safe cells), written atomically."""
    from ZeroShotILDLib import csv_files

    from .files import atomic_path

    fields = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_path(Path(path)) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv_files.DictWriter(handle, fieldnames=fields, restval=0)
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)
