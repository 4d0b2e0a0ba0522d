"""What every ``zeroshot-ild-train`` command shares: its name, file names, output writers and manifest/cache readers."""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ZeroShotILDLib import csv_files
from ZeroShotILDLib.errors import InputError
from ZeroShotILDLib.settings import AnalysisSettings

from .dapt_config import DEFAULT_RECIPE as _DEFAULT_RECIPE, RECIPES as _RECIPES  # torch-free
from .files import atomic_path, atomic_write_text, staged_output

PROG = "zeroshot-ild-train"
# One text default for every command that reads report text (train, sweep, preview-text, alignment).
DEFAULT_TEXT = _RECIPES[_DEFAULT_RECIPE]["text_choice"]
#: Written by ``preprocess`` beside the montages: the engine settings they were built with.
CACHE_SETTINGS = "preprocess_settings.json"
#: Folder inside an evaluate/grid --out where finished per-scan scores are kept (a re-run skips those scans).
SCORE_CACHE = ".scan_scores"
log = logging.getLogger(PROG)


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------
def _bar(iterable, *, total: Optional[int] = None, desc: str, quiet: bool):
    from tqdm import tqdm

    if not quiet and not sys.stderr.isatty():
        # A log file gets one line per stage, not a carriage-return bar.
        print(f"{PROG}: {desc}", file=sys.stderr, flush=True)
        quiet = True
    return tqdm(iterable, total=total, desc=desc, disable=quiet, file=sys.stderr, leave=False, dynamic_ncols=True)


def _staged_output(out: Path):
    """Staging inside ``out`` (``training.files.staged_output``): files move into ``out`` one atomic rename each."""
    return staged_output(out)


def _write_json(path: Path, payload) -> Path:
    """Strict JSON (non-finite numbers become null, with a note): bare NaN breaks every other JSON reader."""
    from ZeroShotILDLib.outputs import json_text

    return atomic_write_text(path, json_text(payload, default=_plain))


def _plain(value):
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return str(value)


def _write_rows(path: Path, rows: Sequence[dict]) -> Path:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv_files.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _csv_list(text: Optional[str], cast=str, *, what: str) -> list:
    if text is None:
        return []
    try:
        return [cast(v.strip()) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{what} {text!r} is not a comma-separated list of {cast.__name__} values") from None


def _read_manifest(path: str, **kwargs):
    from .manifest import read_manifest

    return read_manifest(path, **kwargs)


def _cache_settings(cache: str) -> AnalysisSettings:
    path = Path(cache).expanduser() / CACHE_SETTINGS
    if not path.is_file():
        raise InputError(f"{cache} holds no {CACHE_SETTINGS}: run `{PROG} preprocess MANIFEST --cache {cache}` first")
    return AnalysisSettings.from_dict(json.loads(path.read_text(encoding="utf-8")))


def _pairs(records, cache: str, class_names=None, label: str = "ild"):
    """PairRecords for the records whose montage is in the cache; one-line error if any is missing."""
    from . import preprocess
    from .data import pairs_from_manifest

    settings = _cache_settings(cache)
    montages = preprocess.finished_montages(records, cache, settings)
    missing = [r for r in records if r.scan_id not in montages]
    if missing:
        raise InputError(f"{len(missing)} of {len(records)} scans have no finished montage in {cache} "
                         f"(first: {missing[0].source}): run preprocess (every shard) with the same settings")
    return pairs_from_manifest(records, montages, class_names, label=label), settings


def _with_pixel_spacing(records, spacing_mm: Optional[float]):
    """Records whose 2-D image rows carry a pixel size (the column, else ``--pixel-spacing-mm``), and a
    one-line note when some have neither (then 1 mm per pixel is assumed, and said)."""
    from .preprocess import DEFAULT_PIXEL_SPACING_MM, is_image

    if spacing_mm is not None and not 0 < spacing_mm < 100:
        raise InputError(f"--pixel-spacing-mm {spacing_mm}: give millimetres per pixel, e.g. 0.7")
    out, missing = [], 0
    for r in records:
        if is_image(r.scan_path) and r.pixel_spacing_mm is None:
            if spacing_mm is None:
                missing += 1
            else:
                r = dataclasses.replace(r, pixel_spacing_mm=float(spacing_mm))
        out.append(r)
    note = None
    if missing:
        note = (f"{missing} 2-D image row(s) have no pixel size (manifest column pixel_spacing_mm or "
                f"--pixel-spacing-mm): {DEFAULT_PIXEL_SPACING_MM:g} mm per pixel assumed, so patch sizes in mm are guesses")
        log.warning(note)
    return out, note


