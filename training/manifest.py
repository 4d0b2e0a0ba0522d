"""Manifests: the list of scans, reports and labels that training and evaluation read.

A manifest is a CSV file (one header row) or a JSONL file (one JSON object per line) with:

============== =========== ===================================================================
column         required    meaning
============== =========== ===================================================================
scan_path      yes         a scan file (NIfTI, NRRD, MHA, a 2D PNG/JPG) or a DICOM folder;
                           relative paths are resolved against the manifest's folder
scan_id        no          a unique name for the scan (default: scan_path as written)
report_text    no          the report itself
report_path    no          a text file holding the report (not together with report_text)
ild            no          0/1, yes/no, true/false, positive/negative; blank = unknown
subtype        no          free text (e.g. ``idiopathic pulmonary fibrosis``); implies ILD
label_<name>   no          any further 0/1 label, read like ``ild``
split          no          train / val / test (also training, valid, validation, testing)
patient_id     no          scans of one patient always land in the same split
pixel_spacing_mm no        pixel size of a 2-D PNG/JPG row in mm (default: the command's
                           ``--pixel-spacing-mm``, else 1 mm with a warning)
extra_<name>   no          carried along untouched
============== =========== ===================================================================

Column names are case-insensitive and label names are lower-cased (``label_GGO`` is ``ggo``).
In JSONL, labels may also be given as ``"labels": {"name": 1, ...}``. Any other column is an
error (a typo such as ``splt`` must not silently drop the split). Every problem is reported as
one ``InputError`` line naming the file, line and column.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from ZeroShotILDLib import csv_files
from ZeroShotILDLib.atomic_files import atomic_write_text
from ZeroShotILDLib.errors import InputError

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test",
}
_TRUE = {"1", "1.0", "yes", "y", "true", "t", "positive", "pos"}
_FALSE = {"0", "0.0", "no", "n", "false", "f", "negative", "neg"}
_BLANK = {"", "nan", "na", "n/a", "none", "null", "unknown", "?"}
_KNOWN = ("scan_path", "scan_id", "report_text", "report_path", "ild", "subtype", "split",
          "patient_id", "pixel_spacing_mm", "labels")


@dataclass
class ManifestRecord:
    """One row of a manifest. ``report_text`` is hidden from ``repr`` so it never lands in logs."""

    #: Absolute path of the scan file or DICOM folder.
    scan_path: Path
    #: Unique name of the scan (cache keys, result tables).
    scan_id: str
    report_text: Optional[str] = field(default=None, repr=False)
    #: Absolute path of a text file with the report.
    report_path: Optional[Path] = None
    #: 1 = ILD, 0 = no ILD, None = unknown.
    ild: Optional[int] = None
    subtype: Optional[str] = None
    #: Free labels (``label_<name>`` columns) -> 0, 1 or None.
    labels: dict = field(default_factory=dict)
    split: Optional[str] = None
    patient_id: Optional[str] = None
    #: ``extra_<name>`` columns, untouched strings.
    extra: dict = field(default_factory=dict, repr=False)
    #: Pixel size (mm) of a 2-D image row; None = not given (3-D scans carry their own spacing).
    pixel_spacing_mm: Optional[float] = None
    #: Where the row came from, e.g. ``"manifest.csv line 4"`` (for messages).
    source: str = ""

    @property
    def patient_key(self) -> str:
        """The unit of splitting: the patient id, or the scan itself when there is none."""
        return self.patient_id if self.patient_id else f"scan:{self.scan_id}"

    def read_report(self) -> Optional[str]:
        """The report text (from ``report_text`` or ``report_path``), or None if there is none."""
        if self.report_text is not None:
            return self.report_text
        if self.report_path is None:
            return None
        try:
            return self.report_path.read_text(encoding="utf-8-sig", errors="replace")
        except OSError as e:
            raise InputError(f"{self.source}, column report_path: cannot read the file "
                             f"({e.strerror or type(e).__name__})") from None


def parse_binary(value, *, where: str = "") -> Optional[int]:
    """Read a 0/1 label written as 0/1, yes/no, true/false, positive/negative; blank -> None."""
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value != value:  # NaN
            return None
        if value in (0, 1):
            return int(value)
    text = str(value).strip().lower()
    if text in _BLANK:
        return None
    if text in _TRUE:
        return 1
    if text in _FALSE:
        return 0
    # The cell is never quoted back: a shifted column may hold report text or a name.
    raise InputError(f"{where}: not a label; use 1/0, yes/no, true/false or leave it blank")


def _text(value) -> Optional[str]:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _resolve(path_text: str, base: Path) -> Path:
    p = Path(path_text).expanduser()
    return p if p.is_absolute() else (base / p)


def _record(raw: dict, *, base: Path, where: str, check_files: bool) -> ManifestRecord:
    def col(name):
        return f"{where}, column {name}"

    cols = {}
    for key, value in raw.items():
        if key is None:
            raise InputError(f"{where}: more values than header columns; "
                             f"quote values that contain commas")
        k = str(key).strip().lower()
        if not k:
            if _text(value) is not None:
                raise InputError(f"{where}: a value sits under an empty header; name the column")
            continue
        if k in cols:
            raise InputError(f"{where}: column {k} appears twice; keep one")
        cols[k] = value

    unknown = [k for k in cols if k not in _KNOWN
               and not k.startswith("label_") and not k.startswith("extra_")]
    if unknown:
        raise InputError(f"{where}: unknown column {unknown[0]!r}; known columns are "
                         f"{', '.join(_KNOWN[:-1])}, label_<name> and extra_<name>")

    scan_text = _text(cols.get("scan_path"))
    if scan_text is None:
        raise InputError(f"{col('scan_path')}: empty; every row needs the path of its scan")
    scan_path = _resolve(scan_text, base)
    if check_files and not scan_path.exists():
        raise InputError(f"{col('scan_path')}: no such file or folder; paths are relative "
                         f"to the manifest's folder")

    report_text = cols.get("report_text")
    report_text = None if report_text is None or not str(report_text).strip() else str(report_text)
    report_path_text = _text(cols.get("report_path"))
    if report_text is not None and report_path_text is not None:
        raise InputError(f"{where}: both report_text and report_path are set; keep one")
    report_path = _resolve(report_path_text, base) if report_path_text else None
    if check_files and report_path is not None and not report_path.is_file():
        raise InputError(f"{col('report_path')}: no such file; paths are relative to the manifest's folder")

    ild = parse_binary(cols.get("ild"), where=col("ild"))
    subtype = _text(cols.get("subtype"))
    if subtype is not None and ild == 0:
        raise InputError(f"{col('subtype')}: a subtype is given but ild is 0; fix one of them")

    labels: dict = {}
    nested = cols.get("labels")
    if nested is not None:
        if not isinstance(nested, dict):
            raise InputError(f"{col('labels')}: must be an object of name: 0/1")
        for name, value in nested.items():
            labels[str(name).strip().lower()] = parse_binary(value, where=f"{col('labels')}.{name}")
    for k, value in cols.items():
        if k.startswith("label_"):
            name = k[len("label_"):]
            if not name:
                raise InputError(f"{where}: column label_ needs a name after the underscore")
            if name in labels:
                raise InputError(f"{col(k)}: this label is also given in column labels; keep one")
            labels[name] = parse_binary(value, where=col(k))

    split_text = _text(cols.get("split"))
    split = None
    if split_text is not None:
        split = _SPLIT_ALIASES.get(split_text.lower())
        if split is None:
            raise InputError(f"{col('split')}: not a split; use train, val or test, or leave it blank")

    spacing_text = _text(cols.get("pixel_spacing_mm"))
    pixel_spacing_mm = None
    if spacing_text is not None:
        try:
            pixel_spacing_mm = float(spacing_text)
        except ValueError:
            pixel_spacing_mm = float("nan")
        if not (pixel_spacing_mm > 0 and pixel_spacing_mm < 100):
            raise InputError(f"{col('pixel_spacing_mm')}: not a pixel size; give millimetres per pixel, e.g. 0.7")

    scan_id = _text(cols.get("scan_id")) or Path(scan_text).as_posix()
    return ManifestRecord(
        scan_path=scan_path, scan_id=scan_id, report_text=report_text, report_path=report_path,
        ild=ild, subtype=subtype, labels=labels, split=split,
        patient_id=_text(cols.get("patient_id")), pixel_spacing_mm=pixel_spacing_mm,
        extra={k[len("extra_"):]: v for k, v in cols.items() if k.startswith("extra_")},
        source=where,
    )


def read_manifest(path: Union[str, Path], *, check_files: bool = True,
                  require_report: bool = False, require_ild: bool = False) -> list[ManifestRecord]:
    """Read and validate a manifest.

    Parameters
    ----------
    path : str or Path
        ``.csv`` (or ``.tsv``) with a header row, or ``.jsonl`` / ``.ndjson``.
    check_files : bool, default True
        Fail on a scan_path or report_path that does not exist.
    require_report : bool, default False
        Every row needs report_text or report_path (training).
    require_ild : bool, default False
        Every row needs an ild label (evaluation).

    Returns
    -------
    list of ManifestRecord
        In file order; blank lines and blank CSV rows are skipped.

    Raises
    ------
    InputError
        One line naming the file, line and column of the first problem.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"manifest {path} does not exist")
    base = path.resolve().parent
    suffix = path.suffix.lower()
    records: list[ManifestRecord] = []
    try:
        if suffix in (".jsonl", ".ndjson"):
            with path.open(encoding="utf-8-sig") as f:
                for line_no, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    where = f"{path.name} line {line_no}"
                    try:
                        raw = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise InputError(f"{where}: not valid JSON ({e.msg})") from None
                    if not isinstance(raw, dict):
                        raise InputError(f"{where}: each line must be a JSON object")
                    records.append(_record(raw, base=base, where=where, check_files=check_files))
        elif suffix in (".csv", ".tsv"):
            with path.open(newline="", encoding="utf-8-sig") as f:
                reader = csv_files.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
                if not reader.fieldnames:
                    raise InputError(f"manifest {path.name} is empty; it needs a header row")
                header = [h.strip().lower() for h in reader.fieldnames if h]
                if "scan_path" not in header:
                    # The header is not echoed: without one, the first row (a report?) would be.
                    raise InputError(f"manifest {path.name} has no scan_path column: its first line must be "
                                     f"the header (scan_path, report_text or report_path, ild, ...)")
                start = reader.line_num + 1
                for raw in reader:
                    # Name the line a record starts on (a quoted report may span many lines).
                    where, start = f"{path.name} line {start}", reader.line_num + 1
                    if all(_text(v) is None for k, v in raw.items() if k is not None) and None not in raw:
                        continue
                    records.append(_record(raw, base=base, where=where, check_files=check_files))
        else:
            raise InputError(f"manifest {path.name}: unknown format {suffix or '(none)'}; "
                             f"use .csv, .tsv or .jsonl")
    except UnicodeDecodeError:
        raise InputError(f"manifest {path.name} is not UTF-8 text; save it as UTF-8") from None
    except csv.Error as e:
        raise InputError(f"manifest {path.name}: malformed CSV ({e})") from None

    if not records:
        raise InputError(f"manifest {path.name} has no rows")
    seen: dict[str, str] = {}
    for r in records:
        if r.scan_id in seen:
            raise InputError(f"{r.source}: the same scan_id as {seen[r.scan_id]}; "
                             f"give each row its own scan_id")
        seen[r.scan_id] = r.source
        if require_report and r.report_text is None and r.report_path is None:
            raise InputError(f"{r.source}: no report_text or report_path; training needs a report "
                             f"for every scan")
        if require_ild and r.ild is None:
            raise InputError(f"{r.source}, column ild: empty; evaluation needs an ild label "
                             f"for every scan")
    check_patient_splits(records)
    return records


def _relative(p: Optional[Path], base: Path) -> str:
    if p is None:
        return ""
    try:
        return p.resolve().relative_to(base).as_posix()
    except ValueError:
        return str(p)


def write_manifest(records: Sequence[ManifestRecord], path: Union[str, Path]) -> Path:
    """Write records as CSV or JSONL (by extension); paths inside the folder become relative.

    ``read_manifest(write_manifest(records, p))`` gives back equal records.
    """
    path = Path(path).expanduser()
    base = path.resolve().parent
    label_names = sorted({k for r in records for k in r.labels})
    extra_names = sorted({k for r in records for k in r.extra})
    # Decided once: a test inside the loop made writing (and `split`) quadratic in the rows.
    has_spacing = any(x.pixel_spacing_mm is not None for x in records)
    rows = []
    for r in records:
        row = {
            "scan_path": _relative(r.scan_path, base), "scan_id": r.scan_id,
            "report_text": r.report_text or "", "report_path": _relative(r.report_path, base),
            "ild": "" if r.ild is None else r.ild, "subtype": r.subtype or "",
            "split": r.split or "", "patient_id": r.patient_id or "",
        }
        if has_spacing:
            row["pixel_spacing_mm"] = "" if r.pixel_spacing_mm is None else r.pixel_spacing_mm
        for name in label_names:
            v = r.labels.get(name)
            row[f"label_{name}"] = "" if v is None else v
        for name in extra_names:
            v = r.extra.get(name)
            row[f"extra_{name}"] = "" if v is None else v
        rows.append(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        for row in rows:
            # Empty core fields are left out; label/extra keys stay so every row has them.
            buffer.write(json.dumps({k: (None if v == "" and k.startswith("label_") else v)
                                     for k, v in row.items()
                                     if v != "" or k.startswith(("label_", "extra_"))}) + "\n")
    elif path.suffix.lower() in (".csv", ".tsv"):
        fields = list(rows[0]) if rows else ["scan_path"]
        # csv_files: a scan id or report starting with "=" is not a formula in a spreadsheet.
        w = csv_files.DictWriter(buffer, fieldnames=fields, delimiter="\t" if path.suffix.lower() == ".tsv" else ",",
                                 lineterminator="\r\n")
        w.writeheader()
        w.writerows(rows)
    else:
        raise InputError(f"manifest {path.name}: unknown format; use .csv, .tsv or .jsonl")
    # Atomic (a temporary file made with O_EXCL, renamed): never half-written, never through a link.
    atomic_write_text(path, buffer.getvalue())
    return path


def check_patient_splits(records: Iterable[ManifestRecord]) -> None:
    """Raise ``InputError`` if one patient has scans in two different splits (a data leak)."""
    where: dict[str, dict[str, str]] = {}
    for r in records:
        if r.split is None:
            continue
        splits = where.setdefault(r.patient_key, {})
        splits.setdefault(r.split, r.source)
        if len(splits) > 1:
            (s1, w1), (s2, w2) = list(splits.items())[:2]
            raise InputError(f"one patient has scans in {s1} ({w1}) and {s2} ({w2}); "
                             f"all scans of a patient must be in one split")


def label_names(records: Sequence[ManifestRecord]) -> list[str]:
    """Label columns a command can use: ``ild``, ``subtype`` and every ``label_<name>``."""
    return ["ild", "subtype"] + sorted({k for r in records for k in r.labels if k not in ("ild", "subtype")})


def label_value(record: ManifestRecord, name: str):
    """The value of label ``name`` (``ild``, ``subtype`` or a ``label_<name>`` column) of one row; None = unknown."""
    key = name.strip().lower()
    key = key[len("label_"):] if key.startswith("label_") else key
    if key in record.labels:
        return record.labels[key]
    if key == "ild":
        return record.ild
    if key == "subtype":
        return record.subtype.strip().lower() if record.subtype else (None if record.ild is None else "no ild")
    return None


def check_label(records: Sequence[ManifestRecord], name: str) -> str:
    """``name`` without a ``label_`` prefix, or one ``InputError`` line listing the labels the manifest has."""
    key = name.strip().lower()
    key = key[len("label_"):] if key.startswith("label_") else key
    if key in ("ild", "subtype") or any(key in r.labels for r in records):
        if any(label_value(r, key) is not None for r in records):
            return key
        raise InputError(f"label {name!r} is blank in every row of the manifest: fill it in or choose another label")
    raise InputError(f"the manifest has no label {name!r}: choose one of {', '.join(label_names(records))}")


def _allocate(total: int, sizes: Sequence[int]) -> list[int]:
    """Split ``total`` over groups of ``sizes`` in proportion (largest remainder), never more than a group has."""
    n = sum(sizes)
    if n == 0 or total <= 0:
        return [0] * len(sizes)
    exact = [total * s / n for s in sizes]
    out = [min(int(e), s) for e, s in zip(exact, sizes)]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - int(exact[i])), i))
    for i in order * 2:
        if sum(out) >= total:
            break
        if out[i] < sizes[i]:
            out[i] += 1
    return out


def split_by_patient(records: Sequence[ManifestRecord], *, val_fraction: float = 0.1,
                     test_fraction: float = 0.0, seed: int = 0,
                     stratify: Optional[str] = None) -> list[ManifestRecord]:
    """Assign train/val/test by patient, never by scan.

    Rows that already have a split keep it, and the other scans of the same patient follow
    it. The remaining patients are shuffled with ``seed`` (in sorted order first, so the result
    does not depend on row order) and ``round(fraction * n_patients)`` of them go to val and
    test, at least one each when the fraction is positive and there are patients to spare.
    Scans without a patient_id count as their own patient (paper 000 holds out 10 % by patient:
    give patient ids whenever a patient has several scans).

    Parameters
    ----------
    records : sequence of ManifestRecord
    val_fraction : float, default 0.1
        Share of unassigned patients held out for validation (paper 000: 10 %).
    test_fraction : float, default 0.0
        Share of unassigned patients for the test split.
    seed : int, default 0
    stratify : str, optional
        A label (``ild``, ``subtype`` or a ``label_<name>`` column): each value's patients are
        shared out in the same proportions, so val and test keep the cohort's class balance
        (paper 000 balanced its test set). A patient takes the largest value among its scans
        (positive if any scan is); patients with the label blank form their own stratum.

    Returns
    -------
    list of ManifestRecord
        Copies with ``split`` set, in the input order.
    """
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0
            and val_fraction + test_fraction < 1.0):
        raise InputError(f"val fraction {val_fraction} and test fraction {test_fraction} must be "
                         f"in [0, 1) and leave some patients for training")
    check_patient_splits(records)
    fixed = {r.patient_key: r.split for r in records if r.split is not None}
    free = sorted({r.patient_key for r in records} - set(fixed))
    order = np.random.default_rng(seed).permutation(len(free))
    shuffled = [free[i] for i in order]

    def count(fraction):
        if fraction <= 0 or len(free) < 2:
            return 0
        return max(1, int(round(fraction * len(free))))

    n_val = count(val_fraction)
    n_test = min(count(test_fraction), max(len(free) - n_val - 1, 0))
    assigned = dict(fixed)
    if stratify is None:
        for i, key in enumerate(shuffled):
            assigned[key] = "val" if i < n_val else "test" if i < n_val + n_test else "train"
        return [dataclasses.replace(r, split=assigned[r.patient_key]) for r in records]
    name = check_label(records, stratify)
    value_of: dict = {}
    for r in records:
        v = label_value(r, name)
        if v is not None:
            old = value_of.get(r.patient_key)
            value_of[r.patient_key] = v if old is None else max(old, v, key=str)
    strata: dict = {}
    for key in shuffled:  # shuffled order inside each stratum
        strata.setdefault(str(value_of.get(key)), []).append(key)
    names = sorted(strata)
    sizes = [len(strata[k]) for k in names]
    vals = _allocate(n_val, sizes)
    tests = _allocate(n_test, [s - v for s, v in zip(sizes, vals)])
    for k, nv, nt in zip(names, vals, tests):
        for i, key in enumerate(strata[k]):
            assigned[key] = "val" if i < nv else "test" if i < nv + nt else "train"
    return [dataclasses.replace(r, split=assigned[r.patient_key]) for r in records]


def split_counts(records: Iterable[ManifestRecord]) -> dict:
    """``{split: {"scans": n, "patients": m}}`` (split None = unassigned) for summaries."""
    out: dict = {}
    for r in records:
        entry = out.setdefault(r.split, {"scans": 0, "patients": set()})
        entry["scans"] += 1
        entry["patients"].add(r.patient_key)
    return {k: {"scans": v["scans"], "patients": len(v["patients"])} for k, v in out.items()}
