"""Writing a result to a folder: result.json, patches.csv, montage.png, heatmap.nii.gz, lung_mask.nii.gz, overlay.png,
report.html, and for a DICOM input the DICOM results (lung_mask.seg.dcm, patterns.seg.dcm, result.sr.dcm).

The tool only ever replaces or removes files it wrote itself. Every result folder holds a manifest
(``.zeroshot-ild-manifest.json``) naming the files the tool wrote there; anything else in the folder
(the user's notes, a ``review/`` folder, the input scan) is never touched. A folder that is neither
empty nor an earlier result is refused before any work, unless the caller passes ``overwrite``, which
still writes only the output names above.

The files are built in a hidden staging folder inside the result folder (same file system) and then
renamed into place one by one, so a kill leaves each output either in its old or its new version and
never half-written. Staging folders carry the writer's process id; the next run into the same place
removes those of dead processes (only the file names the tool writes, never a whole tree).
"""
from __future__ import annotations

import csv
import errno
import json
import logging
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from . import __version__
from .atomic_files import PARTIAL_SUFFIX, atomic_write_text
from .errors import InputError
from .results import AnalysisResult
from .scan import Scan

RESULT_SCHEMA = "zeroshot-ild-result/1"
#: The JSON Schema of result.json, shipped with the package.
RESULT_SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "result.schema.json"
MANIFEST_FORMAT = "zeroshot-ild-manifest/1"
#: The list of files the tool wrote into a result folder; the only files it will ever replace or remove there.
MANIFEST_NAME = ".zeroshot-ild-manifest.json"
#: Every file a run writes into ``--out``, in the order they are moved into place (result.json last).
OUTPUT_FILES = ("patches.csv", "montage.png", "heatmap.nii.gz", "lung_mask.nii.gz", "overlay.png", "report.html",
                "result.json")
#: Files only some runs write (DICOM results of a DICOM input); ours all the same, in the manifest when written.
OPTIONAL_OUTPUT_FILES = ("lung_mask.seg.dcm", "patterns.seg.dcm", "result.sr.dcm")
STAGING_PREFIX = ".zeroshot-ild-partial-"
#: Earlier versions staged beside ``--out``: ``.NAME.partial-XXXX`` and ``.NAME.old-PID``.
_LEGACY_PARTIAL = re.compile(r"^\.(?P<name>.+)\.partial-[A-Za-z0-9_]+$")
_LEGACY_OLD = re.compile(r"^\.(?P<name>.+)\.old-(?P<pid>\d+)$")
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
        "notes": list(result.notes),
        "timings_s": {k: round(float(v), 3) for k, v in result.timings_s.items()},
    }


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
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove_our_files(folder: Path) -> bool:
    """Remove the tool's own file names (and partial files) from a leftover folder; rmdir it if then empty."""
    ours = set(OUTPUT_FILES) | set(OPTIONAL_OUTPUT_FILES) | {MANIFEST_NAME}
    for entry in list(folder.iterdir()):
        if entry.is_file() and not entry.is_symlink() and (entry.name in ours or _is_our_partial(entry.name)):
            entry.unlink()
    try:
        folder.rmdir()
        return True
    except OSError:
        return False


def _is_our_partial(name: str) -> bool:
    ours = set(OUTPUT_FILES) | set(OPTIONAL_OUTPUT_FILES) | {MANIFEST_NAME}
    return name.endswith(PARTIAL_SUFFIX) and any(name.startswith(f".{n}.") for n in ours)


def clean_leftovers(out_dir: Path) -> None:
    """Remove what killed runs left in and beside ``out_dir``: only ours, only from dead processes."""
    if out_dir.is_dir():
        for entry in out_dir.iterdir():
            if entry.name.startswith(STAGING_PREFIX) and entry.is_dir() and not entry.is_symlink():
                pid = entry.name[len(STAGING_PREFIX):]
                if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                    _remove_our_files(entry)
            elif _is_our_partial(entry.name) and entry.is_file() and entry.stat().st_mtime < RUN_STARTED:
                entry.unlink()
    parent = out_dir.parent
    if not parent.is_dir():
        return
    for entry in parent.iterdir():
        if not entry.is_dir() or entry.is_symlink():
            continue
        old, partial = _LEGACY_OLD.match(entry.name), _LEGACY_PARTIAL.match(entry.name)
        if old and old["name"] == out_dir.name and not _pid_alive(int(old["pid"])):
            if not _remove_our_files(entry):
                log.warning(f"kept {entry}: a killed earlier run left it and it holds files the tool did not write")
        elif partial and partial["name"] == out_dir.name and entry.stat().st_mtime < RUN_STARTED:
            _remove_our_files(entry)


def _earlier_result(out_dir: Path) -> Optional[list]:
    """The files an earlier run wrote into ``out_dir`` (from its manifest), or None if it holds no result."""
    manifest = out_dir / MANIFEST_NAME
    if manifest.is_file():
        try:
            doc = json.loads(manifest.read_text(encoding="utf-8"))
            if doc.get("format") == MANIFEST_FORMAT:
                return [str(n) for n in doc.get("files", []) if "/" not in str(n) and not str(n).startswith(".")]
        except (ValueError, OSError, AttributeError):
            pass
    result = out_dir / "result.json"
    if result.is_file():  # written before manifests existed: our names only
        try:
            if json.loads(result.read_text(encoding="utf-8")).get("schema") == RESULT_SCHEMA:
                return [n for n in OUTPUT_FILES if (out_dir / n).is_file()]
        except (ValueError, OSError, AttributeError):
            pass
    return None


def _visible_entries(out_dir: Path) -> list:
    return [e for e in out_dir.iterdir() if not e.name.startswith(STAGING_PREFIX) and not _is_our_partial(e.name)]


def prepare_out_dir(out_dir: os.PathLike, *, overwrite: bool = False, clean: bool = True) -> Path:
    """Check ``out_dir`` before any work; return it resolved. Nothing is created.

    Accepted: a new or empty folder, or an earlier result (its manifest, or a ``result.json`` of this
    schema). Refused with one line: a file in the way, a folder that holds other things (unless
    ``overwrite``), an output name taken by a folder, or a place the process cannot write to.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    if clean:
        try:
            clean_leftovers(out_dir)
        except OSError as exc:
            log.warning(f"could not clean leftovers of an earlier run near {out_dir}: {exc.strerror or exc}")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise InputError(f"output {out_dir} exists and is not a folder: choose another --out")
        for name in OUTPUT_FILES + OPTIONAL_OUTPUT_FILES + (MANIFEST_NAME,):
            p = out_dir / name
            if (p.exists() or p.is_symlink()) and not p.is_file():
                raise InputError(f"{p} is in the way of an output file (it is not a plain file): move it or choose "
                                 "another --out")
        if _visible_entries(out_dir) and _earlier_result(out_dir) is None and not overwrite:
            raise InputError(f"output folder {out_dir} is not empty and holds no earlier zeroshot-ild result: choose "
                             "a new or empty --out, or add --overwrite to write the result files into it (nothing "
                             "else there is touched)")
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
    """Every candidate, ranked by the first prompt (rank 1 = most probable)."""
    p = result.patches
    prompts = list(result.patch_probabilities)
    order = np.lexsort((np.arange(len(p)), -result.patch_probabilities[prompts[0]]))
    with open(path, "w", newline="", encoding="utf-8") as handle:
        w = csv.writer(handle)
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
    from .report import write_report

    # First: whether they were written (or why not) is a note in result.json and the report.
    # extent / pattern_* are optional fields of the result (absent: those parts are left out).
    optional = tuple(write_dicom_results(
        result, scan, folder, enabled=dicom, extent=getattr(result, "extent", None),
        pattern_map=getattr(result, "pattern_map", None), pattern_names=getattr(result, "pattern_names", None),
        pattern_extent=getattr(result, "pattern_extent", None)))
    with open(folder / "result.json", "w", encoding="utf-8") as handle:
        handle.write(json_text(result_to_dict(result)))
    write_patches_csv(result, folder / "patches.csv")
    Image.fromarray(result.montage).save(folder / "montage.png")
    slab = slice_step_voxels(scan.spacing_mm, result.settings.slice_step_mm)
    heat = paint_heatmap(result.patches, result.patch_probabilities[result.primary_prompt], scan.hu.shape,
                         slab_voxels=slab)
    # to_output_sitk: an interval series is written on a regular grid that overlays its slices.
    sitk.WriteImage(scan.to_output_sitk(heat), str(folder / "heatmap.nii.gz"), useCompression=True)
    overlay_figure(scan, result, heat).save(folder / "overlay.png")
    write_report(result, scan, folder / "report.html", heat, extent=getattr(result, "extent", None),
                 pattern_extent=getattr(result, "pattern_extent", None),
                 output_files=[n for n in OUTPUT_FILES + optional])
    del heat
    sitk.WriteImage(scan.to_output_sitk(result.lung_mask.astype(np.uint8)), str(folder / "lung_mask.nii.gz"),
                    useCompression=True)
    return optional


def _write_manifest(out_dir: Path, files) -> None:
    atomic_write_text(out_dir / MANIFEST_NAME, json.dumps(
        {"format": MANIFEST_FORMAT, "software": {"name": "zeroshot-ild", "version": __version__},
         "note": "files the zeroshot-ild tool wrote here; a later run replaces or removes only these",
         "files": sorted(files)}, indent=2) + "\n")


def write_outputs(result: AnalysisResult, scan: Scan, out_dir: os.PathLike, *, overwrite: bool = False,
                  dicom: Optional[bool] = None) -> Path:
    """Write every output into ``out_dir``, replacing only files an earlier run wrote there.

    ``dicom``: write DICOM SEG/SR results (None: when the scan was read from DICOM and highdicom
    is installed; see ``dicom_results``). See the module docstring for what is and is not touched.
    A failed write (full disk, permissions) raises ``InputError`` with one line; the staging folder is removed and the earlier files stay.
    """
    out_dir = prepare_out_dir(out_dir, overwrite=overwrite)
    created = not out_dir.exists()
    staging = out_dir / f"{STAGING_PREFIX}{os.getpid()}"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)  # plain mkdir: the umask decides who may read it
        if staging.exists():
            _remove_our_files(staging)
        staging.mkdir()
        optional = _write_files(result, scan, staging, dicom=dicom)
        # result.json last: a folder with a new result.json holds every other new file.
        written = [n for n in OUTPUT_FILES if n != "result.json"] + list(optional) + ["result.json"]
        previous = _earlier_result(out_dir) or []
        # Name the union first: a kill while moving leaves a manifest that covers every file of ours.
        _write_manifest(out_dir, set(previous) | set(written))
        for name in written:
            os.replace(staging / name, out_dir / name)
        for name in set(previous) - set(written):
            stale = out_dir / name
            if stale.is_file() and not stale.is_symlink():
                stale.unlink()
        _write_manifest(out_dir, written)
    except OSError as exc:
        _discard(staging, out_dir if created else None)
        reason = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or str(exc))
        raise InputError(f"could not write the result to {out_dir}: {reason}; earlier files there are unchanged") from None
    except BaseException:
        _discard(staging, out_dir if created else None)
        raise
    _discard(staging, None)
    return out_dir


def _discard(staging: Path, created_out: Optional[Path]) -> None:
    try:
        if staging.is_dir():
            _remove_our_files(staging)
        if created_out is not None:
            manifest = created_out / MANIFEST_NAME
            if manifest.is_file() and not any(e.name != MANIFEST_NAME for e in created_out.iterdir()):
                manifest.unlink()
            created_out.rmdir()  # only if empty: never a folder with anything else in it
    except OSError:
        pass


def check_out_dir(out_dir: os.PathLike, *, overwrite: bool = False) -> Path:
    """Backward-compatible name for :func:`prepare_out_dir`."""
    return prepare_out_dir(out_dir, overwrite=overwrite)
