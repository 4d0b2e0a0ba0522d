"""Patch embeddings: image features computed once per (scan, model, patch settings) and kept.

Encoding runs in batches (autocast on CUDA, fp32 on CPU); a batch that runs out of GPU memory is
split and the batch size backs off, and when even one image does not fit the work moves to the CPU.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
import zlib
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

from .atomic_files import atomic_path, check_cache_folder, special_file
from .models import LoadedModel
from .progress import CancelToken, ProgressCallback, no_progress

log = logging.getLogger(__name__)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


class ImageEncoder:
    """Encodes [0,1] grayscale pixels with a LoadedModel; remembers a batch size that fits."""

    def __init__(self, model: LoadedModel, batch_size: int = 64):
        self.model = model
        self.batch_size = max(1, int(batch_size))
        self.images_encoded = 0  # counted so tests can prove a re-prompt encoded nothing

    def _forward(self, pixels01: torch.Tensor) -> torch.Tensor:
        device = self.model.device
        x = self.model.normalize(pixels01.to(device, non_blocking=True))
        with torch.inference_mode():
            if device.type == "cuda":
                with torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16):
                    feats = self.model.model.encode_image(x)
            else:
                feats = self.model.model.encode_image(x)
        feats = feats.float()
        return feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def encode(self, pixels01: torch.Tensor) -> torch.Tensor:
        """(n,1|3,S,S) -> (n,D) L2-normalised float32 features on the CPU."""
        outs = []
        start = 0
        n = pixels01.shape[0]
        while start < n:
            size = min(self.batch_size, n - start)
            try:
                outs.append(self._forward(pixels01[start:start + size]).cpu())
                start += size
            except Exception as exc:  # noqa: BLE001 - only OOM is handled, the rest re-raised
                if not _is_oom(exc):
                    raise
                if self.model.device.type == "cuda":
                    torch.cuda.empty_cache()
                if size > 1:
                    self.batch_size = max(1, size // 2)
                    log.warning("out of memory with a batch of %d; retrying with %d", size, self.batch_size)
                elif self.model.device.type == "cuda":
                    log.warning("out of GPU memory even for one image; continuing on the CPU")
                    self.model.model.to("cpu")
                    self.model.device = torch.device("cpu")
                else:
                    raise
        self.images_encoded += n
        return torch.cat(outs) if outs else torch.zeros((0, 0))

    def encode_batches(self, batches: Iterable[tuple[np.ndarray, torch.Tensor]], total: int, *,
                       progress: ProgressCallback = no_progress, cancel: Optional[CancelToken] = None,
                       stage: str = "encoding patches") -> tuple[np.ndarray, np.ndarray]:
        """Encode (indices, pixels) batches; returns (indices, features) in the order encoded."""
        idx_out, feat_out = [], []
        done = 0
        progress(stage, 0, total)
        for indices, pixels in batches:
            if cancel is not None:
                cancel.raise_if_cancelled()
            feat_out.append(self.encode(pixels).numpy())
            idx_out.append(indices)
            done += len(indices)
            progress(stage, done, total)
        if not idx_out:
            return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
        return np.concatenate(idx_out), np.concatenate(feat_out).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Reuse across prompts and sessions
# ----------------------------------------------------------------------------------------------
def scan_fingerprint(hu: np.ndarray, spacing_mm) -> str:
    """Content hash of a scan: the same voxels and spacing give the same key wherever they come from."""
    h = hashlib.sha1()
    h.update(str(hu.shape).encode())
    h.update(str(hu.dtype).encode())
    h.update(np.asarray(spacing_mm, dtype=np.float64).tobytes())
    h.update(np.ascontiguousarray(hu).view(np.uint8).data)
    return h.hexdigest()


def cache_key(scan_fingerprint_: str, model_identity: str, patch_key: dict, mode: str) -> str:
    blob = json.dumps({"scan": scan_fingerprint_, "model": model_identity, "patches": patch_key, "mode": mode},
                      sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()


class EmbeddingCache:
    """Keeps patch embeddings in memory and, if given a folder, on disk as ``<key>.npz``.

    Keys are content hashes (scan voxels, model weights' SHA-256, patch settings), never file names
    or times. Disk writes go through ``atomic_files``, so a crash never leaves a half-written entry
    under its name; an entry damaged anyway (truncated, bit-flipped: the zip CRC catches it) is
    reported in one line, removed and recomputed.
    """

    def __init__(self, folder: Optional[os.PathLike] = None, max_entries: int = 4):
        # Checked now, before any work: one line if it is a file or cannot be written.
        self.folder = check_cache_folder(folder, option="--cache-dir") if folder else None
        self.max_entries = max_entries
        self._memory: dict[str, dict] = {}
        self._warned_special = False

    def _special(self, path: Path) -> bool:
        """A FIFO or device under an entry's name is never read (it would block) nor replaced."""
        if not special_file(path):
            return False
        if not self._warned_special:
            self._warned_special = True
            log.warning("ignoring %s in the cache folder: it is not a regular file (FIFO or device); that entry "
                        "is neither read nor written", path.name)
        return True

    def get(self, key: str) -> Optional[dict]:
        if key in self._memory:
            return self._memory[key]
        if self.folder is not None:
            path = self.folder / f"{key}.npz"
            if not self._special(path) and path.is_file():
                entry = read_npz(path, what="embedding cache entry")
                if entry is None:
                    return None
                self._remember(key, entry)
                return entry
        return None

    def put(self, key: str, entry: dict) -> None:
        self._remember(key, entry)
        if self.folder is not None and not self._special(self.folder / f"{key}.npz"):
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                with atomic_path(self.folder / f"{key}.npz") as tmp:
                    with open(tmp, "wb") as handle:
                        np.savez(handle, **entry)
            except OSError as exc:
                # The cache only saves time: a full disk there must not cost the result.
                log.warning("could not keep the embeddings in the cache %s (%s); the result is not affected",
                            self.folder, exc.strerror or exc)

    def _remember(self, key: str, entry: dict) -> None:
        self._memory[key] = entry
        while len(self._memory) > self.max_entries:
            self._memory.pop(next(iter(self._memory)))


#: What reading a damaged .npz raises: bad zip structure or CRC, short read, bad .npy header.
_DAMAGED = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


def read_npz(path: Path, *, what: str = "cache entry") -> Optional[dict]:
    """Every array of an .npz (no pickles), or None after a one-line warning when it is damaged.

    The damaged file is removed so the value is recomputed and written afresh.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except _DAMAGED as exc:
        log.warning("%s %s is damaged (%s); recomputing it", what, path.name, type(exc).__name__)
        try:
            path.unlink()
        except OSError:
            pass
        return None
