"""Writing a result to a folder: result.json, patches.csv, montage.png, heatmap.nii.gz, lung_mask.nii.gz, overlay.png,
report.html, patterns.nii.gz/.ctbl, and for a DICOM input the DICOM results (lung_mask.seg.dcm,
patterns.seg.dcm, result.sr.dcm); and, for several scans, the cohort summary.csv beside their folders.

The tool only ever replaces or removes files it wrote itself. Every result folder holds a manifest
(``.zeroshot-ild-manifest.json``) naming the files the tool wrote there with their sizes and SHA-256;
an earlier result is recognised only while its files still match (a manifest can be copied, edited or
forged, so its word alone is not enough). Anything else in the folder (the user's notes, a ``review/``
folder, the input scan) is never touched. A folder that is neither empty nor a verified earlier result
is refused before any work, unless the caller passes ``overwrite``, which still writes only the output
names above and removes nothing.

The files are built in a staging folder inside the result folder (same file system) that
``atomic_files.make_staging_dir`` creates with a random name, and then renamed into place one by one,
so a kill leaves each output either in its old or its new version and never half-written. The next
run removes staging folders of dead processes only when they are verifiably ours (a real folder of
this user with our marker; links are never followed), and from them only the tool's file names.
"""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from . import __version__
from . import csv_files
from .atomic_files import (atomic_write_text, default_file_mode, file_record, make_staging_dir, matches_record,
                           pid_alive, read_own_json, remove_owned_files, staging_pid)
from .errors import InputError
from .results import AnalysisResult
from .scan import Scan

RESULT_SCHEMA = "zeroshot-ild-result/1"
#: The JSON Schema of result.json, shipped with the package.
RESULT_SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "result.schema.json"
MANIFEST_FORMAT = "zeroshot-ild-manifest/2"
#: Manifests of earlier versions: names only, nothing to verify the files against.
_OLD_MANIFEST_FORMATS = ("zeroshot-ild-manifest/1",)
_MANIFEST_LIMIT = 1 << 20
#: The list of files the tool wrote into a result folder; the only files it will ever replace or remove there.
MANIFEST_NAME = ".zeroshot-ild-manifest.json"
#: Every file a run writes into ``--out``, in the order they are moved into place (result.json last).
OUTPUT_FILES = ("patches.csv", "montage.png", "heatmap.nii.gz", "lung_mask.nii.gz", "overlay.png", "patterns.nii.gz",
                "patterns.ctbl", "report.html", "result.json")
#: Files only some runs write (DICOM results of a DICOM input); ours all the same, in the manifest when written.
OPTIONAL_OUTPUT_FILES = ("lung_mask.seg.dcm", "patterns.seg.dcm", "result.sr.dcm", "report.pdf", "report.pdf.dcm")
#: Written only when the pattern map is on (``AnalysisSettings.patterns``).
PATTERN_FILES = ("patterns.nii.gz", "patterns.ctbl")
#: The cohort table ``analyze`` writes beside the per-scan folders when given several scans.
SUMMARY_NAME = "summary.csv"
#: Its first columns: how an earlier summary.csv is recognised as the tool's own (and so replaceable).
SUMMARY_HEAD = ("input", "folder", "model", "model_meaningful", "lung_volume_ml")
#: Prefix of staging folders (``mkdtemp`` adds a random part; see ``atomic_files.make_staging_dir``).
STAGING_PREFIX = ".zeroshot-ild-partial-"
#: Leftovers older than this process are not a concurrent writer's.
RUN_STARTED = time.time()
log = logging.getLogger("zeroshot-ild")


def result_to_dict(result: AnalysisResult, top_patches: int | None = None) -> dict:
    """The JSON document described in the README (schema ``zeroshot-ild-result/1``)."""
    s = result.settings
    ranked = result.ranked if top_patches is None else result.ranked[:top_patches]
    montage_rank = {int(i): k for k, i in enumerate(result.montage_indices)}
    return {
        "schema": RESULT_SCHEMA,
        "software": {"name": "zeroshot-ild", "version": __version__},
        "input": result.source,
        "model": {"name": result.model_name, "meaningful": result.model_meaningful, "checkpoint": s.checkpoint},
        "settings": s.to_dict(),
        "scan": {"shape_zyx": list(result.shape_zyx), "spacing_mm": [float(v) for v in result.spacing_mm]},
        "lung_volume_ml": round(float(result.lung_volume_ml), 2),
        "candidates": len(result.patches),
        "encoded_exactly": result.encoded_exactly,
        "probabilities": {k: float(v) for k, v in result.finding_probabilities.items()},
        "subtype_probabilities": {k: float(v) for k, v in result.subtype_probabilities.items()},
        "montage": {"file": "montage.png", "size": s.montage_size,
                    "patches": [patch_record(result, int(i)) for i in result.montage_indices]},
        "top_patches": [dict(patch_record(result, int(i)), rank=k + 1, in_montage=int(i) in montage_rank)
                        for k, i in enumerate(ranked)],
        "extent": {k: _extent_record(v) for k, v in result.extent.items()},
        "zones": dict(result.zones),
        "patterns": _patterns_record(result),
        "notes": list(result.notes),
        "timings_s": {k: round(float(v), 3) for k, v in result.timings_s.items()},
    }


def _extent_record(record: dict) -> dict:
    out = dict(record)
    out["lung_fraction"] = _rounded(record["lung_fraction"])
    out["by_zone"] = {k: _rounded(v) for k, v in record["by_zone"].items()}
    return out


def _rounded(v):
    return round(float(v), 5) if v is not None and math.isfinite(float(v)) else None


def _patterns_record(result: AnalysisResult) -> Optional[dict]:
    """The pattern map's entry in result.json (None when it is off): files, labels and extent per pattern."""
    pm = result.patterns
    if pm is None:
        return None
    counts = np.bincount(pm.labels, minlength=len(pm.names) + 1) if len(pm.labels) else np.zeros(len(pm.names) + 1)
    return {
        "file": "patterns.nii.gz", "colour_table": "patterns.ctbl", "normal_prompt": pm.normal_prompt,
        "rule": pm.rule,
        "labels": [{"value": 0, "name": "none", "colour": [0, 0, 0], "patches": int(counts[0])}]
        + [{"value": k, "name": n, "colour": [int(c) for c in col], "patches": int(counts[k])}
           for k, (n, col) in enumerate(zip(pm.names, pm.colours), start=1)],
        "extent": {n: _extent_record(pm.extent[n]) for n in pm.names if n in pm.extent},
    }


def output_files(result: AnalysisResult) -> tuple:
    """The files this result writes, in the order they are moved into place (result.json last)."""
    return tuple(n for n in OUTPUT_FILES if result.patterns is not None or n not in PATTERN_FILES)


def patch_record(result: AnalysisResult, i: int) -> dict:
    p = result.patches
    z, r, c = int(p.slice_index[i]), int(p.row0[i]), int(p.col0[i])
    return {
        "candidate": i,
        "slice_index": z,
        "bbox_voxels": {"x0": c, "y0": r, "x1": c + p.size_cols, "y1": r + p.size_rows, "z": z},
        "center_ras_mm": [round(float(v), 3) for v in p.center_ras_mm[i]],
        "lung_fraction": round(float(p.lung_fraction[i]), 4),
        "probabilities": {k: float(v[i]) for k, v in result.patch_probabilities.items()},
    }


# ----------------------------------------------------------------------------------------------
# JSON without NaN
# ----------------------------------------------------------------------------------------------
def finite_json(value) -> Tuple[object, int]:
    """``value`` with every NaN/±inf number replaced by ``None``, and how many were replaced.

    Python's ``json`` writes bare ``NaN``/``Infinity``, which is not JSON: strict parsers (browsers,
    jq, most languages) refuse the whole file.
    """
    count = 0

    def walk(v):
        nonlocal count
        if isinstance(v, (float, np.floating)):
            if not math.isfinite(float(v)):
                count += 1
                return None
            return float(v)
        if isinstance(v, np.integer):
            return int(v)
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(x) for x in v]
        if isinstance(v, np.ndarray):
            return [walk(x) for x in v.tolist()]
        return v

    return walk(value), count


def json_text(payload, *, notes_key: Optional[str] = "notes", default=None) -> str:
    """Strict JSON of ``payload``: non-finite numbers become ``null`` and a note in ``notes_key`` says so."""
    if default is not None:  # let the caller's converter turn numpy scalars, paths... into plain values first
        payload = json.loads(json.dumps(payload, default=default))
    clean, count = finite_json(payload)
    if count and notes_key is not None and isinstance(clean, dict):
        clean[notes_key] = list(clean.get(notes_key) or []) + [
            f"{count} non-finite number(s) written as null: those values are invalid"]
    return json.dumps(clean, indent=2, allow_nan=False) + "\n"


# ----------------------------------------------------------------------------------------------
# Output folder: checks before the work, leftovers of killed runs
# ----------------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    return pid_alive(pid)


def our_names() -> set:
    """Every name the tool may write into a result folder (the manifest may list no other)."""
    return set(OUTPUT_FILES) | set(OPTIONAL_OUTPUT_FILES)


def _is_our_staging(entry: Path) -> bool:
    return entry.name.startswith(STAGING_PREFIX) and staging_pid(entry) is not None


def clean_leftovers(out_dir: Path) -> None:
    """Remove staging folders that killed runs of ours left inside ``out_dir``.

    Only folders verified as ours (``atomic_files.staging_pid``: a real folder of this user with our
    marker, never a link) whose writer is dead; from them only the tool's file names; a folder that
    then still holds anything else is kept with a warning. Nothing beside ``out_dir`` is touched
    (earlier versions staged there; such ``.OUT.old-PID`` folders are left for the user).
    """
    try:
        entries = list(os.scandir(out_dir))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if not entry.name.startswith(STAGING_PREFIX):
            continue
        pid = staging_pid(entry.path)
        if pid is None or pid == os.getpid() or pid_alive(pid):
            continue
        if not remove_owned_files(entry.path, our_names() | {MANIFEST_NAME}):
            log.warning(f"kept {entry.path}: a killed earlier run left it and it holds files the tool did not write")


def _read_manifest(out_dir: Path):
    """(doc, None) for a readable manifest of the current format, (None, reason) otherwise, (None, None) if none."""
    doc, problem = read_own_json(out_dir / MANIFEST_NAME, _MANIFEST_LIMIT)
    if problem == "absent":
        return None, None
    if problem == "damaged":
        return None, f"{MANIFEST_NAME} is damaged"
    if problem or not isinstance(doc, dict) or doc.get("format") not in (MANIFEST_FORMAT,) + _OLD_MANIFEST_FORMATS:
        return None, f"{MANIFEST_NAME} is not a manifest the tool wrote"
    if doc["format"] != MANIFEST_FORMAT:
        return None, "it was written by an older zeroshot-ild whose manifest records no file hashes"
    return doc, None


def _verify_earlier(out_dir: Path):
    """(records, None) when ``out_dir`` holds an earlier result of ours, else (None, why it is not one).

    The manifest alone is no evidence (it can be copied, edited or forged): every file it lists must
    be one of the tool's names and still match the size and SHA-256 recorded when it was written,
    and no other file with one of the tool's names may be there.
    """
    doc, why = _read_manifest(out_dir)
    if doc is None:
        if why is None and (out_dir / "result.json").is_file():
            why = "its result.json has no manifest of the tool beside it"
        return None, why or "it holds no zeroshot-ild manifest"
    files = doc.get("files")
    if not isinstance(files, dict) or "result.json" not in files:
        return None, f"{MANIFEST_NAME} lists no result"
    names = our_names()
    for name, record in files.items():
        if name not in names:
            return None, f"{MANIFEST_NAME} names {name!r}, which is not a file the tool writes"
        if not matches_record(out_dir / name, record):
            return None, f"{name} does not match what the tool wrote there (changed, replaced or missing)"
    for name in sorted(names - set(files)):
        p = out_dir / name
        if p.exists() or p.is_symlink():
            return None, f"{name} is there but the tool did not write it"
    return {k: (v if isinstance(v, list) else [v]) for k, v in files.items()}, None


def _earlier_result(out_dir: Path) -> Optional[list]:
    """The files a verified earlier run wrote into ``out_dir``, or None if it holds no result of ours."""
    records, _ = _verify_earlier(out_dir)
    return None if records is None else sorted(records)


def _visible_entries(out_dir: Path) -> list:
    return [e for e in out_dir.iterdir() if not _is_our_staging(e)]


def prepare_out_dir(out_dir: os.PathLike, *, overwrite: bool = False, clean: bool = True) -> Path:
    """Check ``out_dir`` before any work; return it resolved. Nothing is created.

    Accepted: a new or empty folder, or an earlier result verified against its manifest (sizes and
    hashes). Refused with one line: a file in the way, a folder that holds other things (unless
    ``overwrite``), an output name taken by a folder or a link, or a place the process cannot write to.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    if clean:
        try:
            clean_leftovers(out_dir)
        except OSError as exc:
            log.warning(f"could not clean leftovers of an earlier run in {out_dir}: {exc.strerror or exc}")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise InputError(f"output {out_dir} exists and is not a folder: choose another --out")
        for name in OUTPUT_FILES + OPTIONAL_OUTPUT_FILES + (MANIFEST_NAME,):
            p = out_dir / name
            if p.is_symlink() or (p.exists() and not p.is_file()):
                raise InputError(f"{p} is in the way of an output file (it is not a plain file): move it or choose "
                                 "another --out")
        if _visible_entries(out_dir) and not overwrite:
            records, why = _verify_earlier(out_dir)
            if records is None:
                raise InputError(f"output folder {out_dir} is not empty and holds no earlier zeroshot-ild result "
                                 f"({why}): choose a new or empty --out, or add --overwrite to write the result "
                                 "files into it (nothing else there is touched)")
        probe_in = out_dir
    else:
        probe_in = out_dir.parent
        while not probe_in.exists():
            probe_in = probe_in.parent
        if not probe_in.is_dir():
            raise InputError(f"cannot create output folder {out_dir}: {probe_in} is a file, not a folder")
    _probe_writable(probe_in, out_dir)
    return out_dir


def _probe_writable(folder: Path, out_dir: Path) -> None:
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".zeroshot-ild-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(f"cannot write to {folder} ({exc.strerror or exc}): choose another --out than {out_dir}") from None


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def write_patches_csv(result: AnalysisResult, path: Path) -> None:
    """Every scored box, ranked by the first prompt (rank 1 = most probable): first the boxes that pass the
    lung-fraction filter (the top-patch and montage candidates, so rank k is the k-th top patch), then the
    boxes at the pleura scored for the extent only (lung fraction under the filter)."""
    p = result.patches
    prompts = list(result.patch_probabilities)
    below = ~p.montage_candidates(result.settings.filter_threshold)
    order = np.lexsort((np.arange(len(p)), -result.patch_probabilities[prompts[0]], below))
    with open(path, "w", newline="", encoding="utf-8") as handle:
        w = csv_files.writer(handle)
        w.writerow(["rank", "candidate", "slice_index", "x0", "y0", "x1", "y1", "center_r_mm", "center_a_mm",
                    "center_s_mm", "lung_fraction"] + [f"p[{q}]" for q in prompts])
        for rank, i in enumerate(order, start=1):
            r, c = int(p.row0[i]), int(p.col0[i])
            w.writerow([rank, int(i), int(p.slice_index[i]), c, r, c + p.size_cols, r + p.size_rows,
                        *(f"{v:.3f}" for v in p.center_ras_mm[i]), f"{p.lung_fraction[i]:.4f}",
                        *(f"{result.patch_probabilities[q][i]:.6f}" for q in prompts)])


def _write_files(result: AnalysisResult, scan: Scan, folder: Path, *, dicom: Optional[bool] = None) -> tuple:
    """Write every output into ``folder``; return the names of the optional ones written (DICOM results)."""
    import SimpleITK as sitk
    from PIL import Image

    from .dicom_results import write_dicom_results
    from .figures import overlay_figure
    from .heatmap import paint_heatmap
    from .patches import slice_step_voxels
    from .report_pdf import write_report_files

    labels = names = pattern_extent = None
    if result.patterns is not None:
        from .patterns import colour_table_text, label_volume

        pm = result.patterns
        labels = label_volume(result)
        names = {k: n for k, n in pm.label_names().items() if k > 0}
        pattern_extent = {n: pm.extent[n] for n in pm.names if n in pm.extent}
        sitk.WriteImage(scan.to_output_sitk(labels), str(folder / "patterns.nii.gz"), useCompression=True)
        (folder / "patterns.ctbl").write_text(colour_table_text(pm.names, pm.colours), encoding="utf-8")
    # First: whether they were written (or why not) is a note in result.json and the report.
    optional = tuple(write_dicom_results(result, scan, folder, enabled=dicom, extent=result.extent or None,
                                         pattern_map=labels, pattern_names=names, pattern_extent=pattern_extent))
    del labels
    write_patches_csv(result, folder / "patches.csv")
    Image.fromarray(result.montage).save(folder / "montage.png")
    slab = slice_step_voxels(scan.spacing_mm, result.settings.slice_step_mm)
    # Limited to the lung: boxes at the pleura are scored, and their chest-wall part must not look hot.
    heat = paint_heatmap(result.patches, result.patch_probabilities[result.primary_prompt], scan.hu.shape,
                         slab_voxels=slab, lung_mask=result.lung_mask)
    # to_output_sitk: an interval series is written on a regular grid that overlays its slices.
    sitk.WriteImage(scan.to_output_sitk(heat), str(folder / "heatmap.nii.gz"), useCompression=True)
    overlay_figure(scan, result, heat).save(folder / "overlay.png")
    # report.pdf and its DICOM copy (report_pdf): whether they were written is a note in result.json, so
    # result.json is written after them.
    optional += tuple(write_report_files(result, scan, folder, heat, extent=result.extent or None,
                                         pattern_extent=pattern_extent,
                                         output_files=list(output_files(result)) + list(optional),
                                         dicom_written=bool(optional)))
    del heat
    with open(folder / "result.json", "w", encoding="utf-8") as handle:
        handle.write(json_text(result_to_dict(result)))
    sitk.WriteImage(scan.to_output_sitk(result.lung_mask.astype(np.uint8)), str(folder / "lung_mask.nii.gz"),
                    useCompression=True)
    return optional


def _write_manifest(out_dir: Path, staging: Path, records: dict) -> None:
    """Write the manifest in the staging folder and rename it into place (nothing half-written in ``out_dir``)."""
    tmp = staging / MANIFEST_NAME
    tmp.write_text(json.dumps(
        {"format": MANIFEST_FORMAT, "software": {"name": "zeroshot-ild", "version": __version__},
         "note": "files the zeroshot-ild tool wrote here, with their sizes and SHA-256; a later run replaces "
                 "or removes only these, and only while they still match",
         "files": {k: (v[0] if len(v) == 1 else v) for k, v in sorted(records.items())}}, indent=2) + "\n",
        encoding="utf-8")
    os.chmod(tmp, default_file_mode())
    os.replace(tmp, out_dir / MANIFEST_NAME)


def write_outputs(result: AnalysisResult, scan: Scan, out_dir: os.PathLike, *, overwrite: bool = False,
                  dicom: Optional[bool] = None) -> Path:
    """Write every output into ``out_dir``, replacing only files a verified earlier run wrote there.

    ``dicom``: write DICOM SEG/SR results (None: when the scan was read from DICOM and highdicom
    is installed; see ``dicom_results``). See the module docstring for what is and is not touched.
    A failed write (full disk, permissions) raises ``InputError`` with one line; the staging folder is removed and the earlier files stay.
    """
    out_dir = prepare_out_dir(out_dir, overwrite=overwrite)
    created = not out_dir.exists()
    staging = None
    written: list = []
    try:
        out_dir.mkdir(parents=True, exist_ok=True)  # plain mkdir: the umask decides who may read it
        staging = make_staging_dir(out_dir, STAGING_PREFIX)
        optional = _write_files(result, scan, staging, dicom=dicom)
        # result.json last: a folder with a new result.json holds every other new file.
        written = [n for n in output_files(result) if n != "result.json"] + list(optional) + ["result.json"]
        new = {n: [file_record(staging / n)] for n in written}
        previous, _ = _verify_earlier(out_dir)
        previous = previous or {}  # --overwrite into a foreign folder: nothing of it is ours to remove
        # Name every version first: a kill while moving leaves a manifest that still verifies.
        union = {n: previous.get(n, []) + new.get(n, []) for n in set(previous) | set(new)}
        _write_manifest(out_dir, staging, union)
        for name in written:
            os.replace(staging / name, out_dir / name)
        for name in sorted(set(previous) - set(written)):
            stale = out_dir / name
            if matches_record(stale, previous[name]):  # checked again just before: still the file we wrote
                stale.unlink()
        _write_manifest(out_dir, staging, new)
    except OSError as exc:
        _discard(staging, written, out_dir if created else None)
        reason = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or str(exc))
        raise InputError(f"could not write the result to {out_dir}: {reason}; earlier files there are unchanged") from None
    except BaseException:
        _discard(staging, written, out_dir if created else None)
        raise
    _discard(staging, written, None)
    return out_dir


def _discard(staging: Optional[Path], written, created_out: Optional[Path]) -> None:
    """Remove what this run created: its staging folder (our names only), and ``--out`` if it made it."""
    try:
        if staging is not None:
            remove_owned_files(staging, our_names() | set(written) | {MANIFEST_NAME})
        if created_out is not None:
            manifest = created_out / MANIFEST_NAME
            if manifest.is_file() and not manifest.is_symlink() \
                    and not any(e.name != MANIFEST_NAME for e in created_out.iterdir()):
                manifest.unlink()
            created_out.rmdir()  # only if empty: never a folder with anything else in it
    except OSError:
        pass


def check_out_dir(out_dir: os.PathLike, *, overwrite: bool = False) -> Path:
    """Backward-compatible name for :func:`prepare_out_dir`."""
    return prepare_out_dir(out_dir, overwrite=overwrite)


# ----------------------------------------------------------------------------------------------
# Cohort summary (several scans): one row per scan, beside the per-scan folders
# ----------------------------------------------------------------------------------------------
def check_summary_path(parent: os.PathLike, *, overwrite: bool = False) -> Path:
    """Where ``summary.csv`` goes; refused (one line, before any work) if a file there is not the tool's.

    The tool's own summary is recognised by its header (``SUMMARY_HEAD``); anything else under that
    name is the user's and is only replaced with ``overwrite``. A folder or link in the way is refused.
    """
    path = Path(parent).expanduser().resolve() / SUMMARY_NAME
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise InputError(f"{path} is in the way of the cohort summary (it is not a plain file): move it or choose "
                         "another --out")
    if path.is_file() and not overwrite and not _is_our_summary(path):
        raise InputError(f"{path} exists and was not written by zeroshot-ild: move it, choose another --out, or add "
                         "--overwrite to replace it")
    return path


def _is_our_summary(path: Path) -> bool:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            head = next(csv_files.reader(handle), [])
    except (OSError, UnicodeDecodeError, csv_files.csv.Error):
        return False
    return tuple(head[:len(SUMMARY_HEAD)]) == SUMMARY_HEAD


#: Separator of the notes in summary.csv's ``notes`` cell (a note may hold ";" and ",", never this).
NOTES_SEPARATOR = " | "


def summary_row(result: AnalysisResult, scan_input: str, folder: str) -> dict:
    """One scan's row: what it was, probabilities, extent by zone, lung volume, the notes' text and short flags.

    Units are in the column names and are the report's: extent in percent of the lung (or of the zone's
    lung) as ``extent_pct[prompt]``, ``extent_pct[prompt].zone``, its volume as ``extent_ml[prompt]``;
    probabilities ``p[...]`` from 0 to 1. Nothing from a DICOM header is written (no patient names);
    ``input`` is the path as the user gave it.
    """
    row = {"input": str(scan_input), "folder": folder, "model": result.model_name,
           "model_meaningful": int(bool(result.model_meaningful)),
           "lung_volume_ml": f"{float(result.lung_volume_ml):.1f}", "candidates": len(result.patches)}
    for k, v in result.finding_probabilities.items():
        row[f"p[{k}]"] = _fmt(v)
    for k, v in result.subtype_probabilities.items():
        row[f"p[{k}]"] = _fmt(v)
    from .extent import ZONES

    def extent_columns(name: str, record: dict) -> None:
        row[f"extent_pct[{name}]"] = _pct(record["lung_fraction"])
        row[f"extent_ml[{name}]"] = _ml(record, result.lung_volume_ml)
        for zone in ZONES:
            row[f"extent_pct[{name}].{zone}"] = _pct(record["by_zone"].get(zone))
        row[f"extent[{name}].predominance"] = record["predominance"]
        row[f"extent[{name}].calibrated"] = "yes" if record.get("calibrated") else "no"

    for k, record in result.extent.items():
        extent_columns(k, record)
    if result.patterns is not None:
        for name in result.patterns.names:
            if name in result.patterns.extent:
                row[f"pattern_pct[{name}]"] = _pct(result.patterns.extent[name]["lung_fraction"])
    row["notes"] = NOTES_SEPARATOR.join(" ".join(str(n).split()) for n in result.notes)
    row["flags"] = ";".join(_flags(result))
    return row


def _fmt(v) -> str:
    if v is None or not math.isfinite(float(v)):
        return ""
    return f"{float(v):.4f}"


def _pct(fraction) -> str:
    """A 0-1 fraction as percent with two decimals (the report shows one), "" when unknown."""
    if fraction is None or not math.isfinite(float(fraction)):
        return ""
    return f"{100.0 * float(fraction):.2f}"


def _ml(record: dict, lung_volume_ml: float) -> str:
    """The positive lung volume (mL) of an extent record: left + right positive mL (they split the lung)."""
    sides = [(record.get("positive_ml") or {}).get(k) for k in ("left", "right")]
    if None not in sides:
        return f"{sum(float(v) for v in sides):.1f}"
    fraction = record.get("lung_fraction")
    if fraction is None or not math.isfinite(float(fraction)):
        return ""
    return f"{float(fraction) * float(lung_volume_ml):.1f}"


def _flags(result: AnalysisResult) -> list:
    flags = []
    if not result.model_meaningful:
        flags.append("model-not-meaningful")
    if result.encoded_exactly is not None and result.encoded_exactly < len(result.patches):
        flags.append("fast-mode")
    text = " ".join(result.notes).lower()
    for needle, flag in (("lung mask read from", "lung-mask-given"), ("unevenly spaced", "interval-series"),
                         ("gantry", "gantry-tilt"),
                         ("remaining cells are black", "few-patches")):
        if needle in text and flag not in flags:
            flags.append(flag)
    return flags


def write_summary(rows: list, path: os.PathLike) -> Path:
    """Write the cohort summary atomically (a reader never sees half a file); columns in first-seen order."""
    columns: list = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    import io

    buffer = io.StringIO()
    writer = csv_files.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buffer.getvalue())
