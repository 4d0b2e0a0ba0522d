"""Manifest -> cached montage PNGs, the images DAPT trains on.

Each scan's montage is built by the engine (``ZeroShotILDLib.pipeline``; random or CLIP-retrieved
with a given model, montage size, filter threshold and seed) and written as
``<out>/montages/<key>.png`` plus a ``<key>.json`` sidecar. The sidecar is written last and
atomically, so an item counts as finished only when both exist: a crash or a killed job never
leaves a half-written item that a later run would take for a finished one, and re-running skips
finished items (resume). ``shard=(i, n)`` takes every n-th record starting at i, so a cluster job
array splits thousands of scans without coordination; ``workers`` processes run in parallel.

2-D images (PNG/JPG slices such as the COVID-CT figure crops) are taken as one-slice scans: their
grey levels are mapped back through the HU window, so windowing returns the original pixels, and
when no lungs are found in them the whole image counts as lung.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from ZeroShotILDLib.errors import InputError
from ZeroShotILDLib.progress import CancelToken, ProgressCallback, no_progress
from ZeroShotILDLib.settings import AnalysisSettings

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
#: Montages of random retrieval need no model; they are stored at this size and resized on loading.
RANDOM_MONTAGE_PX = 224


@dataclass
class PreprocessSummary:
    done: int = 0
    skipped: int = 0
    failed: list = field(default_factory=list)  # (scan_id, one-line reason)
    out_dir: str = ""

    def line(self) -> str:
        return f"{self.done} montages written, {self.skipped} already finished, {len(self.failed)} failed"


def settings_key(settings: AnalysisSettings) -> dict:
    """The settings that decide a montage's pixels (prompts only matter for CLIP retrieval)."""
    key = dict(settings.patch_key(), retrieval=settings.retrieval, montage_size=settings.montage_size,
               seed=settings.seed)
    if settings.retrieval == "clip":
        key.update(model=settings.model, checkpoint=settings.checkpoint, prompts=settings.prompts,
                   negatives=settings.negatives)
    return key


def item_key(scan_id: str, settings: AnalysisSettings) -> str:
    blob = json.dumps({"scan": scan_id, "settings": settings_key(settings)}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:20]


def montage_path(out_dir, scan_id: str, settings: AnalysisSettings) -> Path:
    return Path(out_dir) / "montages" / f"{item_key(scan_id, settings)}.png"


def is_finished(png: Path) -> bool:
    return png.is_file() and png.with_suffix(".json").is_file()


def finished_montages(records: Sequence, out_dir, settings: AnalysisSettings) -> dict:
    """scan_id -> montage path for every finished item (what ``data.pairs_from_manifest`` takes)."""
    out = {}
    for r in records:
        png = montage_path(out_dir, r.scan_id, settings)
        if is_finished(png):
            out[r.scan_id] = png
    return out


def shard_records(records: Sequence, shard: tuple[int, int] = (0, 1)) -> list:
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise InputError(f"shard {index}/{count} is invalid: use i/N with 0 <= i < N")
    ordered = sorted(records, key=lambda r: r.scan_id)  # the same split whatever the manifest order
    return ordered[index::count]


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise InputError(f"--shard {text!r} is not of the form i/N (e.g. 0/8)") from None
    shard_records([], (i, n))
    return i, n


# ----------------------------------------------------------------------------------------------
def image_as_scan(path: Path, hu_window=(-1350.0, 150.0)):
    """A 2-D 8-bit image as a one-slice scan whose windowed pixels equal the image's grey levels."""
    from ZeroShotILDLib.scan import scan_from_array

    try:
        with Image.open(path) as im:
            gray = np.asarray(im.convert("L"), dtype=np.float32)
    except OSError as exc:
        raise InputError(f"{path.name} is not a readable image ({exc}): check the file") from None
    lo, hi = hu_window
    hu = (lo + gray / 255.0 * (hi - lo)).round().astype(np.int16)[None]
    return _Image2D(hu=hu, source=path.name, scan_from_array=scan_from_array)


class _Image2D:
    """Holds a one-slice pseudo-HU array until the engine turns it into a Scan."""

    def __init__(self, hu, source, scan_from_array):
        self.hu, self.source, self._make = hu, source, scan_from_array

    def scan(self):
        # scan_from_array validates HU content; a figure crop is not HU, so build the Scan directly.
        from ZeroShotILDLib.scan import Scan

        return Scan(hu=self.hu, spacing_mm=(1.0, 1.0, 1.0), origin_mm=(0.0, 0.0, 0.0),
                    direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), source=self.source, notes=["2-D image input"])


def build_montage_for(scan_path: Path, settings: AnalysisSettings, analyzer=None):
    """(montage uint8, info) for one scan or image, with the engine's own pipeline."""
    from ZeroShotILDLib import pipeline
    from ZeroShotILDLib.scan import read_scan

    if scan_path.suffix.lower() in IMAGE_SUFFIXES:
        scan = image_as_scan(scan_path, settings.hu_window).scan()
        return pipeline.montage_for_scan(scan, settings, analyzer=analyzer, whole_image_if_no_lungs=True,
                                         image_size=RANDOM_MONTAGE_PX)
    return pipeline.montage_for_scan(read_scan(scan_path), settings, analyzer=analyzer, image_size=RANDOM_MONTAGE_PX)


_WORKER: dict = {}


def _worker_init(settings_dict: dict, threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))
    _WORKER["settings"] = AnalysisSettings.from_dict(settings_dict)
    _WORKER["analyzer"] = None


def _process_one(scan_id: str, scan_path: str, png: str) -> tuple[str, Optional[str]]:
    from ZeroShotILDLib.pipeline import Analyzer

    settings: AnalysisSettings = _WORKER["settings"]
    if settings.retrieval == "clip" and _WORKER.get("analyzer") is None:
        _WORKER["analyzer"] = Analyzer(settings)
    try:
        montage, info = build_montage_for(Path(scan_path), settings, _WORKER.get("analyzer"))
    except InputError as exc:
        return scan_id, str(exc)
    write_item(Path(png), montage, dict(info, scan_id=scan_id, settings=settings_key(settings)))
    return scan_id, None


def write_item(png: Path, montage: np.ndarray, info: dict) -> None:
    """PNG first, sidecar last, each through a temporary file renamed into place."""
    png.parent.mkdir(parents=True, exist_ok=True)
    for target, writer in ((png, lambda f: Image.fromarray(montage).save(f, format="PNG")),
                           (png.with_suffix(".json"), lambda f: f.write(json.dumps(info, indent=1).encode()))):
        fd, tmp = tempfile.mkstemp(dir=png.parent, suffix=".partial")
        try:
            with os.fdopen(fd, "wb") as handle:
                writer(handle)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def preprocess(records: Sequence, out_dir, settings: AnalysisSettings, *, workers: int = 1,
               shard: tuple[int, int] = (0, 1), progress: ProgressCallback = no_progress,
               cancel: Optional[CancelToken] = None) -> PreprocessSummary:
    """Write the montage of every record of this shard that is not finished yet."""
    settings.validate()
    out_dir = Path(out_dir)
    mine = shard_records(records, shard)
    todo, summary = [], PreprocessSummary(out_dir=str(out_dir))
    for r in mine:
        png = montage_path(out_dir, r.scan_id, settings)
        if is_finished(png):
            summary.skipped += 1
        else:
            todo.append((r.scan_id, str(r.scan_path), str(png)))
    (out_dir / "montages").mkdir(parents=True, exist_ok=True)
    (out_dir / "settings.json").write_text(json.dumps(settings_key(settings), indent=1, sort_keys=True), encoding="utf-8")
    progress("preprocessing", 0, len(todo))
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    if workers <= 1:
        _worker_init(settings.to_dict(), threads)
        results = (_process_one(*item) for item in todo)
        pool = None
    else:
        import multiprocessing as mp

        pool = cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                      initargs=(settings.to_dict(), threads))
        results = pool.map(_process_one, *zip(*todo)) if todo else iter(())
    try:
        for k, (scan_id, error) in enumerate(results, start=1):
            if error:
                summary.failed.append((scan_id, error))
            else:
                summary.done += 1
            progress("preprocessing", k, len(todo))
            if cancel is not None:
                cancel.raise_if_cancelled()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return summary
