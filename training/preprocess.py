"""Manifest -> cached montage PNGs, the images DAPT trains on.

Each scan's montage is built by the engine (``ZeroShotILDLib.pipeline``; random or CLIP-retrieved
with a given model, montage size, filter threshold and seed) and written as
``<out>/montages/<key>.png`` plus a ``<key>.json`` sidecar. The key hashes the scan's content
(its file, or every file of a DICOM folder; ``file_hashes`` remembers hashes by stat) with the
scan id and the montage settings, so two cohorts sharing a cache, a relative ``scan_path`` or a
scan id pointed at a new file never receive another scan's montage. The sidecar is written last,
both through ``atomic_files``, and records the PNG's SHA-256: an item counts as finished only when
both exist and agree, so a crash, a killed job or a damaged file is redone, never taken for a
finished item, and re-running skips finished items (resume). ``shard=(i, n)`` takes every n-th record starting at i, so a cluster job
array splits thousands of scans without coordination; ``workers`` processes run in parallel.

2-D images (PNG/JPG slices such as the COVID-CT figure crops) are taken as one-slice scans: their
grey levels are mapped back through the HU window, so windowing returns the original pixels, and
when no lungs are found in them the whole image counts as lung. Their pixel size comes from the
manifest's ``pixel_spacing_mm`` column (or ``--pixel-spacing-mm``); without either, 1 mm per pixel
is assumed and said (``DEFAULT_PIXEL_SPACING_MM``).
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from ZeroShotILDLib.atomic_files import atomic_write_bytes, atomic_write_text, special_file
from ZeroShotILDLib.errors import InputError
from ZeroShotILDLib.file_hashes import sha256_path
from ZeroShotILDLib.progress import CancelToken, ProgressCallback, no_progress
from ZeroShotILDLib.settings import AnalysisSettings

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
#: Montages of random retrieval need no model; they are stored at this size and resized on loading.
RANDOM_MONTAGE_PX = 224
#: Largest 2-D image taken (pixels); PIL's own bomb limit is ~89 M, a figure crop is far smaller.
MAX_IMAGE_PIXELS = 50_000_000
#: Pixel size assumed for a 2-D image whose spacing nobody gave (patch sizes are in mm).
DEFAULT_PIXEL_SPACING_MM = 1.0

log = logging.getLogger(__name__)


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


def item_key(scan_id: str, settings: AnalysisSettings, scan_path=None, pixel_spacing_mm=None) -> str:
    """Cache key of one montage: scan id, the scan's content hash and the montage settings.

    ``scan_path`` is hashed (file or DICOM folder) when given and readable; an unreadable path
    keys on the id alone, and the item then fails with the reader's message when processed.
    """
    content = None
    if scan_path is not None:
        try:
            content = sha256_path(scan_path)
        except OSError:
            content = None
    payload = {"scan": scan_id, "content": content, "settings": settings_key(settings)}
    if pixel_spacing_mm is not None:  # only then: caches of the 1-mm default stay valid
        payload["pixel_spacing_mm"] = float(pixel_spacing_mm)
    blob = json.dumps(payload, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:20]


def montage_path(out_dir, scan_id: str, settings: AnalysisSettings, scan_path=None, pixel_spacing_mm=None) -> Path:
    return Path(out_dir) / "montages" / f"{item_key(scan_id, settings, scan_path, pixel_spacing_mm)}.png"


def is_finished(png: Path) -> bool:
    """Both files present, the sidecar readable and the PNG the one it records (else: redo it)."""
    sidecar = png.with_suffix(".json")
    if not (png.is_file() and sidecar.is_file()):
        return False
    try:
        recorded = json.loads(sidecar.read_text(encoding="utf-8")).get("png_sha256")
        found = hashlib.sha256(png.read_bytes()).hexdigest()
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("cached montage %s is damaged (%s); recomputing it", png.name, type(exc).__name__)
        return False
    if recorded != found:
        log.warning("cached montage %s is damaged (its PNG does not match its sidecar); recomputing it", png.name)
        return False
    return True


def finished_montages(records: Sequence, out_dir, settings: AnalysisSettings) -> dict:
    """scan_id -> montage path for every finished item (what ``data.pairs_from_manifest`` takes)."""
    out = {}
    for r in records:
        png = montage_path(out_dir, r.scan_id, settings, r.scan_path, getattr(r, "pixel_spacing_mm", None))
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
def is_image(scan_path) -> bool:
    """A 2-D image file (PNG/JPG/...) rather than a scan."""
    return Path(scan_path).suffix.lower() in IMAGE_SUFFIXES


def image_as_scan(path: Path, hu_window=(-1350.0, 150.0), pixel_spacing_mm=None):
    """A 2-D 8-bit image as a one-slice scan whose windowed pixels equal the image's grey levels."""
    from ZeroShotILDLib.scan import scan_from_array

    try:
        with Image.open(path) as im:
            width, height = im.size
            if width * height > MAX_IMAGE_PIXELS:
                raise InputError(f"{path.name} declares {width} x {height} pixels, more than the "
                                 f"{MAX_IMAGE_PIXELS // 1_000_000} million taken for a 2-D image: check the file")
            gray = np.asarray(im.convert("L"), dtype=np.float32)
    except InputError:
        raise
    except Image.DecompressionBombError:
        raise InputError(f"{path.name} declares more pixels than an image can sensibly hold "
                         "(a decompression bomb?): check the file") from None
    except (OSError, ValueError, SyntaxError) as exc:  # PIL raises all three for damaged files
        raise InputError(f"{path.name} is not a readable image ({type(exc).__name__}): check the file") from None
    lo, hi = hu_window
    hu = (lo + gray / 255.0 * (hi - lo)).round().astype(np.int16)[None]
    return _Image2D(hu=hu, source=path.name, scan_from_array=scan_from_array,
                    pixel_spacing_mm=float(pixel_spacing_mm or DEFAULT_PIXEL_SPACING_MM))


class _Image2D:
    """Holds a one-slice pseudo-HU array until the engine turns it into a Scan."""

    def __init__(self, hu, source, scan_from_array, pixel_spacing_mm=DEFAULT_PIXEL_SPACING_MM):
        self.hu, self.source, self._make = hu, source, scan_from_array
        self.pixel_spacing_mm = pixel_spacing_mm

    def scan(self):
        # scan_from_array validates HU content; a figure crop is not HU, so build the Scan directly.
        from ZeroShotILDLib.scan import Scan

        d = self.pixel_spacing_mm
        return Scan(hu=self.hu, spacing_mm=(d, d, 1.0), origin_mm=(0.0, 0.0, 0.0),
                    direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), source=self.source, notes=["2-D image input"])


def read_any_scan(scan_path, settings: AnalysisSettings, pixel_spacing_mm=None):
    """A scan file or DICOM folder, or a 2-D image as a one-slice scan (``pixel_spacing_mm`` per pixel)."""
    from ZeroShotILDLib.scan import read_scan

    if is_image(scan_path):
        return image_as_scan(Path(scan_path), settings.hu_window, pixel_spacing_mm).scan()
    return read_scan(scan_path)


def build_montage_for(scan_path: Path, settings: AnalysisSettings, analyzer=None, pixel_spacing_mm=None):
    """(montage uint8, info) for one scan or image, with the engine's own pipeline."""
    from ZeroShotILDLib import pipeline
    from ZeroShotILDLib.scan import read_scan

    if is_image(scan_path):
        scan = read_any_scan(scan_path, settings, pixel_spacing_mm)
        return pipeline.montage_for_scan(scan, settings, analyzer=analyzer, whole_image_if_no_lungs=True,
                                         image_size=RANDOM_MONTAGE_PX)
    return pipeline.montage_for_scan(read_scan(scan_path), settings, analyzer=analyzer, image_size=RANDOM_MONTAGE_PX)


_WORKER: dict = {}


def _worker_init(settings_dict: dict, threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))
    _WORKER["settings"] = AnalysisSettings.from_dict(settings_dict)
    _WORKER["analyzer"] = None


def _process_one(scan_id: str, scan_path: str, png: str, pixel_spacing_mm=None) -> tuple[str, Optional[str]]:
    from ZeroShotILDLib.pipeline import Analyzer

    settings: AnalysisSettings = _WORKER["settings"]
    if settings.retrieval == "clip" and _WORKER.get("analyzer") is None:
        _WORKER["analyzer"] = Analyzer(settings)
    try:
        montage, info = build_montage_for(Path(scan_path), settings, _WORKER.get("analyzer"), pixel_spacing_mm)
    except InputError as exc:
        return scan_id, str(exc)
    except (OSError, ValueError, MemoryError) as exc:  # one bad item never aborts a cohort
        return scan_id, f"{Path(scan_path).name} could not be processed ({type(exc).__name__}): check the file"
    write_item(Path(png), montage, dict(info, scan_id=scan_id, settings=settings_key(settings)))
    return scan_id, None


def write_item(png: Path, montage: np.ndarray, info: dict) -> None:
    """PNG first, sidecar (with the PNG's SHA-256) last, each written atomically."""
    png.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(montage).save(buffer, format="PNG")
    data = buffer.getvalue()
    atomic_write_bytes(png, data)
    info = dict(info, png_sha256=hashlib.sha256(data).hexdigest())
    atomic_write_bytes(png.with_suffix(".json"), json.dumps(info, indent=1).encode("utf-8"))


def preprocess(records: Sequence, out_dir, settings: AnalysisSettings, *, workers: int = 1,
               shard: tuple[int, int] = (0, 1), progress: ProgressCallback = no_progress,
               cancel: Optional[CancelToken] = None) -> PreprocessSummary:
    """Write the montage of every record of this shard that is not finished yet."""
    settings.validate()
    out_dir = Path(out_dir)
    mine = shard_records(records, shard)
    todo, summary = [], PreprocessSummary(out_dir=str(out_dir))
    for r in mine:
        spacing = getattr(r, "pixel_spacing_mm", None)
        png = montage_path(out_dir, r.scan_id, settings, r.scan_path, spacing)
        if special_file(png) or special_file(png.with_suffix(".json")):
            # A FIFO would block the reader and a device be read forever: neither read nor replaced.
            summary.failed.append((r.scan_id, f"a FIFO or device is at its cache path {png.name}: remove it"))
            if len(summary.failed) == 1 or not any("FIFO" in f[1] for f in summary.failed[:-1]):
                log.warning("ignoring %s in the cache: it is not a regular file (FIFO or device)", png.name)
            continue
        if is_finished(png):
            summary.skipped += 1
        else:
            todo.append((r.scan_id, str(r.scan_path), str(png), spacing))
    (out_dir / "montages").mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "settings.json", json.dumps(settings_key(settings), indent=1, sort_keys=True))
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
