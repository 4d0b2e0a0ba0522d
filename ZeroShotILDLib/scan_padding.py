"""Constant-value padding around a scan: recognised as "outside the field of view", not as air.

A crop pasted onto a larger canvas, a gantry-tilted series resampled onto an upright grid (the shear
shifts each slice and fills the gap), or a series padded to a square matrix all carry bands of whole
rows or columns holding one exact value. Real air never does: detector noise varies every voxel. To
the lung mask such a band must behave like the array border, because a lung cut by the crop that
touches it is still lung, while air touching it is no evidence of "outside air" (the body mask's
rule for regions reaching the edge). ``segment_lungs`` therefore segments the scan without its
padding: the array is cut to the box that holds every slice's real pixels, and within that box the
bands a slice still has are filled by repeating its outermost real row or column (what the body
grid does at the array border), then removed from the mask again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class Padding:
    """Where a scan's real pixels are: a box (z0, z1, y0, y1, x0, x1) and, per slice inside it, the
    widths (top, bottom, left, right) of the constant bands that remain inside that box."""
    box: tuple
    bands: np.ndarray  # (z1 - z0, 4) int


def _run(flags: np.ndarray) -> int:
    off = np.flatnonzero(~flags)
    return int(off[0]) if off.size else int(flags.size)


def slice_bands(s: np.ndarray) -> Optional[tuple]:
    """(top, bottom, left, right) widths of whole rows/columns of one exact value at each side of a
    slice (each side's value is its own corner's), or None for a slice that is one value throughout."""
    if (s == s.flat[0]).all():
        return None
    ny, nx = s.shape
    top = _run((s == s[0, 0]).all(axis=1)) if (s[0] == s[0, 0]).all() else 0
    bottom = _run((s == s[-1, -1]).all(axis=1)[::-1]) if (s[-1] == s[-1, -1]).all() else 0
    left = _run((s == s[0, 0]).all(axis=0)) if (s[:, 0] == s[0, 0]).all() else 0
    right = _run((s == s[-1, -1]).all(axis=0)[::-1]) if (s[:, -1] == s[-1, -1]).all() else 0
    return top, bottom, left, right


def find_padding(hu: np.ndarray) -> Optional[Padding]:
    """The scan's constant padding, or None when it has none (the usual case: nothing to do)."""
    nz, ny, nx = hu.shape
    per = [slice_bands(hu[z]) for z in range(nz)]
    real = [z for z, b in enumerate(per) if b is not None]
    if not real:
        return None
    z0, z1 = real[0], real[-1] + 1
    widths = np.array([per[z] for z in real], dtype=np.int64)
    if z0 == 0 and z1 == nz and len(real) == nz and not widths.any():
        return None
    y0, y1 = int(widths[:, 0].min()), ny - int(widths[:, 1].min())
    x0, x1 = int(widths[:, 2].min()), nx - int(widths[:, 3].min())
    if y1 - y0 < 3 or x1 - x0 < 3:
        return None
    inner = np.zeros((z1 - z0, 4), dtype=np.int64)
    inner[:, 0] = y1 - y0  # a slice of one value throughout (no real pixel): all band until set below
    for z, (t, b, left, r) in zip(real, widths):
        inner[z - z0] = (max(t - y0, 0), max(b - (ny - y1), 0), max(left - x0, 0), max(r - (nx - x1), 0))
    return Padding(box=(z0, z1, y0, y1, x0, x1), bands=inner)


def unpadded(hu: np.ndarray, padding: Padding) -> tuple:
    """(array cut to the padding's box with remaining bands filled by edge repetition, band mask)."""
    z0, z1, y0, y1, x0, x1 = padding.box
    out = np.array(hu[z0:z1, y0:y1, x0:x1], copy=True)
    band = np.zeros(out.shape, dtype=bool)
    ny, nx = out.shape[1:]
    for k, (t, b, left, r) in enumerate(padding.bands):
        if t + b >= ny or left + r >= nx:  # no real pixel in this slice: repeat the one before
            band[k] = True
            if k:
                out[k] = out[k - 1]
            continue
        if t or b or left or r:
            inner = out[k, t:ny - b, left:nx - r]
            out[k] = np.pad(inner, ((t, b), (left, r)), mode="edge")
            band[k, :t] = band[k, ny - b:] = True
            band[k, :, :left] = band[k, :, nx - r:] = True
    return out, band


def paste(mask_small: np.ndarray, band: np.ndarray, shape: tuple, padding: Padding) -> np.ndarray:
    """The mask of the unpadded box put back on the full grid; padding is never lung."""
    z0, z1, y0, y1, x0, x1 = padding.box
    full = np.zeros(shape, dtype=bool)
    full[z0:z1, y0:y1, x0:x1] = mask_small & ~band
    return full
