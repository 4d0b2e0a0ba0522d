"""Candidate patches: a grid of square axial boxes over the lungs, and their pixels for a model.

Patch size is given in millimetres and converted per scan, so a patch covers the same anatomy at
any pixel spacing; pixels are resampled to the model's input size when they are read.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError
# slice_step_voxels lives in the torch-free geometry module; re-exported for existing imports.
from .geometry import index_to_ras, slice_step_voxels  # noqa: F401
from .results import PatchSet
from .settings import AnalysisSettings


def patch_side_px(spacing_mm, patch_mm: float = 32.0, patch_px: Optional[int] = None) -> tuple[int, int]:
    """Box side in voxels (rows, cols) for ``patch_mm`` at this in-plane spacing (or ``patch_px``)."""
    if patch_px:
        return int(patch_px), int(patch_px)
    sx, sy = float(spacing_mm[0]), float(spacing_mm[1])
    return max(2, int(round(patch_mm / sy))), max(2, int(round(patch_mm / sx)))


def _box_sums(mask_slice: np.ndarray, rows: int, cols: int, row0: np.ndarray, col0: np.ndarray) -> np.ndarray:
    """Sum of ``mask_slice`` over every box of the grid: column sums of each row band, then a running sum.

    One pass over the band's pixels instead of a whole-slice summed-area table in int64 (two
    cumulative sums of 512 x 512 per slice were most of this step's time).
    """
    bands = np.stack([np.count_nonzero(mask_slice[r:r + rows], axis=0) for r in row0])
    running = np.zeros((len(row0), mask_slice.shape[1] + 1), dtype=np.int64)
    np.cumsum(bands, axis=1, out=running[:, 1:])
    return running[:, col0 + cols] - running[:, col0]


def candidate_patches(lung_mask: np.ndarray, spacing_mm, *, patch_mm: float = 32.0, patch_px: Optional[int] = None,
                      stride_fraction: float = 1.0, slice_step_mm: float = 1.0, filter_threshold: float = 0.5,
                      origin_mm=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1),
                      slice_positions_mm=None) -> PatchSet:
    """Grid boxes on lung slices whose lung fraction is at least ``filter_threshold``.

    The grid is anchored at the lungs' bounding box and shared by all slices, so neighbouring slices
    have boxes at the same (row, col) and the heatmap lines up across slices. Slices are taken every
    ``slice_step_mm`` (rounded to whole slices). Patches with no lung at all are never kept, even with
    a threshold of 0. With ``slice_positions_mm`` (an interval series) ``spacing_mm[2]`` is the mean
    gap and every centre is placed at its slice's true position.
    """
    if lung_mask.ndim != 3:
        raise ValueError("lung_mask must be 3-D [z, y, x]")
    rows, cols = patch_side_px(spacing_mm, patch_mm, patch_px)
    nz, ny, nx = lung_mask.shape
    rows, cols = min(rows, ny), min(cols, nx)
    lung_slices = np.flatnonzero(lung_mask.any(axis=(1, 2)))
    empty = PatchSet(np.zeros(0, int), np.zeros(0, int), np.zeros(0, int), rows, cols, np.zeros(0), np.zeros((0, 3)))
    if lung_slices.size == 0:
        return empty
    step = slice_step_voxels(spacing_mm, slice_step_mm)
    # Anchor slices at the first lung slice so the same scan always gives the same set.
    slices = np.arange(lung_slices[0], lung_slices[-1] + 1, step)
    ys = np.flatnonzero(lung_mask.any(axis=(0, 2)))
    xs = np.flatnonzero(lung_mask.any(axis=(0, 1)))
    stride_r = max(1, int(round(rows * stride_fraction)))
    stride_c = max(1, int(round(cols * stride_fraction)))
    row0 = _grid_starts(ys[0], ys[-1], rows, stride_r, ny)
    col0 = _grid_starts(xs[0], xs[-1], cols, stride_c, nx)
    area = float(rows * cols)
    out_z, out_r, out_c, out_f = [], [], [], []
    for z in slices:
        sl = lung_mask[z]
        if not sl.any():
            continue
        frac = _box_sums(sl, rows, cols, row0, col0) / area
        keep = (frac >= filter_threshold) & (frac > 0)
        rr, cc = np.nonzero(keep)
        out_z.append(np.full(rr.size, z))
        out_r.append(row0[rr])
        out_c.append(col0[cc])
        out_f.append(frac[rr, cc])
    if not out_z:
        return empty
    z = np.concatenate(out_z).astype(np.int64)
    r = np.concatenate(out_r).astype(np.int64)
    c = np.concatenate(out_c).astype(np.int64)
    f = np.concatenate(out_f).astype(np.float64)
    centres = np.stack([z, r + (rows - 1) / 2.0, c + (cols - 1) / 2.0], axis=1)
    ras = index_to_ras(centres, spacing_mm, origin_mm, direction, slice_positions_mm)
    return PatchSet(z, r, c, rows, cols, f, ras)


def _grid_starts(lo: int, hi: int, size: int, stride: int, limit: int) -> np.ndarray:
    """Box starts covering [lo, hi] with boxes of ``size`` that stay inside [0, limit)."""
    extent = hi - lo + 1
    count = max(1, math.ceil(max(extent - size, 0) / stride) + 1)
    span = (count - 1) * stride + size
    start = lo - (span - extent) // 2  # centre the grid on the lungs
    starts = start + stride * np.arange(count)
    return np.clip(starts, 0, max(limit - size, 0)).astype(np.int64)


def candidates_for(lung_mask: np.ndarray, spacing_mm, settings: AnalysisSettings, origin_mm=(0, 0, 0),
                   direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), slice_positions_mm=None) -> PatchSet:
    return candidate_patches(
        lung_mask, spacing_mm, patch_mm=settings.patch_mm, patch_px=settings.patch_px,
        stride_fraction=settings.stride_fraction, slice_step_mm=settings.slice_step_mm,
        filter_threshold=settings.filter_threshold, origin_mm=origin_mm, direction=direction,
        slice_positions_mm=slice_positions_mm,
    )


def scored_patches(lung_mask: np.ndarray, spacing_mm, settings: AnalysisSettings, origin_mm=(0, 0, 0),
                   direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), slice_positions_mm=None) -> PatchSet:
    """Every grid box the analysis scores: those with at least ``scored_min_lung_fraction`` of lung.

    The same grid as ``candidates_for`` (the montage's candidates are the boxes of this set whose
    lung fraction passes ``filter_threshold``), extended to the boxes that straddle the pleura: the
    filter would drop ~20 % of the lung and half of the subpleural rind, exactly where UIP lies.
    """
    return candidate_patches(
        lung_mask, spacing_mm, patch_mm=settings.patch_mm, patch_px=settings.patch_px,
        stride_fraction=settings.stride_fraction, slice_step_mm=settings.slice_step_mm,
        filter_threshold=min(settings.scored_min_lung_fraction, settings.filter_threshold), origin_mm=origin_mm,
        direction=direction, slice_positions_mm=slice_positions_mm,
    )


def window_hu(values: torch.Tensor, hu_window=(-1350.0, 150.0)) -> torch.Tensor:
    """HU -> [0, 1] through a window (low, high); values outside are clipped."""
    lo, hi = float(hu_window[0]), float(hu_window[1])
    return ((values.float() - lo) / (hi - lo)).clamp_(0.0, 1.0)


def _slice_tensor(hu, z: int, device: torch.device) -> torch.Tensor:
    """One axial slice as a tensor on ``device``; numpy slices go through pinned memory to a GPU."""
    if isinstance(hu, torch.Tensor):
        return hu[z].to(device, non_blocking=True)
    sl = torch.from_numpy(np.ascontiguousarray(hu[z]))
    if device.type == "cuda":
        sl = sl.pin_memory().to(device, non_blocking=True)
    return sl


def patch_pixels(hu, patches: PatchSet, indices: np.ndarray, *, image_size: int,
                 hu_window=(-1350.0, 150.0), device: torch.device | str = "cpu") -> torch.Tensor:
    """Pixels of ``patches[indices]`` as (n, 1, image_size, image_size) float32 in [0, 1].

    ``hu`` is the [z, y, x] volume as a numpy array or a torch tensor (e.g. already on the GPU).
    All boxes of a slice are cut out with one advanced-indexing op, and all boxes of the call are
    resized together with one interpolation, rather than a Python loop per patch.
    """
    device = torch.device(device)
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size == 0:
        return torch.empty((0, 1, image_size, image_size), dtype=torch.float32, device=device)
    rows, cols = patches.size_rows, patches.size_cols
    dr = torch.arange(rows, device=device)
    dc = torch.arange(cols, device=device)
    zs = patches.slice_index[indices]
    order = np.argsort(zs, kind="stable")
    bounds = np.flatnonzero(np.diff(zs[order])) + 1
    crops = []
    for group in np.split(order, bounds):
        sl = _slice_tensor(hu, int(zs[group[0]]), device)
        r0 = torch.as_tensor(patches.row0[indices[group]], device=device)
        c0 = torch.as_tensor(patches.col0[indices[group]], device=device)
        crops.append(sl[(r0[:, None] + dr)[:, :, None], (c0[:, None] + dc)[:, None, :]])  # (g, rows, cols)
    # Window after cutting: the cost follows the patch pixels, not whole slices (a montage of 16
    # patches from 16 slices is what a re-prompt needs).
    pixels = window_hu(torch.cat(crops), hu_window)[:, None]
    if (rows, cols) != (image_size, image_size):
        pixels = F.interpolate(pixels, size=(image_size, image_size), mode="bicubic", align_corners=False,
                               antialias=rows > image_size or cols > image_size)
    out = torch.empty_like(pixels)
    out[torch.as_tensor(order, device=device)] = pixels.clamp_(0.0, 1.0)
    return out


def iter_patch_batches(hu, patches: PatchSet, indices: np.ndarray, *, batch_size: int, image_size: int,
                       hu_window=(-1350.0, 150.0), device="cpu") -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Yield (indices, pixels) batches in slice order, so each slice is windowed once per batch."""
    indices = np.asarray(indices, dtype=np.int64)
    order = indices[np.argsort(patches.slice_index[indices], kind="stable")]
    for start in range(0, order.size, batch_size):
        chunk = order[start:start + batch_size]
        yield chunk, patch_pixels(hu, patches, chunk, image_size=image_size, hu_window=hu_window, device=device)


def require_candidates(patches: PatchSet, source: str, filter_threshold: float, eligible: Optional[int] = None) -> None:
    """Refuse a scan with no montage candidate (``eligible``: how many pass the filter; default all)."""
    if len(patches) == 0 or eligible == 0:
        raise InputError(
            f"no lung patches in {source} pass the filter threshold {filter_threshold}: "
            "lower --filter-threshold or --patch-mm, or check that the scan covers the lungs"
        )
