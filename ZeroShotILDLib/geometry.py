"""Voxel index <-> patient coordinate conversions, and the slice geometry of interval series (pure numpy).

A scan's slices are either evenly spaced (``spacing_mm[2]`` apart) or sit at their own positions
along the slice normal (``slice_positions_mm``, interval HRCT: thin slices 1 mm then 9 mm apart).
Every function here takes the positions as an optional argument; ``None`` means even spacing.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

#: Most planes a uniform output grid may have (an 0.1 mm gap in a 400 mm series would ask for 4000).
MAX_OUTPUT_PLANES = 4096


def slice_step_voxels(spacing_mm, slice_step_mm: float) -> int:
    """Scan slices between two candidate slices for a ``slice_step_mm`` step (at least 1).

    Here rather than in ``patches`` (which needs torch) because Slicer's process paints heatmaps and
    pattern maps with it and must never import torch.
    """
    return max(1, int(round(slice_step_mm / float(spacing_mm[2]))))


def index_to_ras(zyx: np.ndarray, spacing_mm, origin_mm, direction, slice_positions_mm=None) -> np.ndarray:
    """Continuous voxel indices ``[z, y, x]`` (N,3) -> RAS millimetres (N,3).

    SimpleITK's physical space is LPS: ``p = origin + D @ (spacing * ijk)`` with ``ijk = (x, y, z)``.
    RAS flips the first two axes. With ``slice_positions_mm`` (offset of each slice from slice 0
    along the slice normal) the z index is mapped through those positions instead of ``spacing_mm[2]``,
    linearly between slices.
    """
    zyx = np.atleast_2d(np.asarray(zyx, dtype=np.float64))
    ijk = zyx[:, ::-1] * np.asarray(spacing_mm, dtype=np.float64)
    if slice_positions_mm is not None:
        ijk[:, 2] = slice_offset_mm(zyx[:, 0], slice_positions_mm)
    lps = ijk @ np.asarray(direction, dtype=np.float64).reshape(3, 3).T + np.asarray(origin_mm, dtype=np.float64)
    return lps * np.array([-1.0, -1.0, 1.0])


def slice_offset_mm(z: np.ndarray, slice_positions_mm) -> np.ndarray:
    """Offset along the normal (mm from slice 0) of continuous slice indices; linear beyond the ends."""
    pos = np.asarray(slice_positions_mm, dtype=np.float64)
    z = np.asarray(z, dtype=np.float64)
    if pos.size == 1:
        return np.zeros_like(z)
    out = np.interp(z, np.arange(pos.size), pos)
    lo, hi = z < 0, z > pos.size - 1
    out[lo] = pos[0] + z[lo] * (pos[1] - pos[0])
    out[hi] = pos[-1] + (z[hi] - pos.size + 1) * (pos[-1] - pos[-2])
    return out


def slab_thickness_mm(slice_positions_mm) -> np.ndarray:
    """How much of the body each sampled slice stands for: a slab reaching halfway to each neighbour.

    The first and last slices reach as far outwards as inwards, so evenly spaced slices all get the
    spacing, and the slabs of an interval series add up to its extent plus one mean end gap.
    """
    pos = np.asarray(slice_positions_mm, dtype=np.float64)
    if pos.size < 2:
        return np.ones(pos.size)
    gaps = np.diff(pos)
    left = np.concatenate([[gaps[0]], gaps])
    right = np.concatenate([gaps, [gaps[-1]]])
    return (left + right) / 2.0


def uniform_grid(slice_positions_mm, *, tolerance_mm: float = 0.05) -> tuple[float, np.ndarray, float]:
    """A regular grid of planes that holds every sampled slice: (step_mm, plane of each slice, worst misplacement mm).

    The step is the smallest gap, or a whole fraction of it when the slices do not fall on that
    grid (1.25 mm then 8.75 mm gaps: 1.25 mm; 1 mm then 9.5 mm: 0.5 mm), so that every sampled slice
    lies on a plane. Where no fraction down to a tenth fits, the tenth is used and each slice goes
    to its nearest plane (the worst distance is returned and stated in the notes).
    """
    pos = np.asarray(slice_positions_mm, dtype=np.float64)
    pos = pos - pos[0]
    if pos.size < 2:
        return 1.0, np.zeros(pos.size, dtype=np.int64), 0.0
    extent = float(pos[-1])
    smallest = float(np.diff(pos).min())
    best = None
    for parts in range(1, 11):
        step = smallest / parts
        if extent / step > MAX_OUTPUT_PLANES:
            break
        planes = np.rint(pos / step)
        worst = float(np.abs(planes * step - pos).max())
        best = (step, planes.astype(np.int64), worst)
        if worst <= tolerance_mm:
            return best
    if best is None:  # a tiny gap in a long series: as fine as the plane cap allows
        step = extent / MAX_OUTPUT_PLANES
        planes = np.rint(pos / step)
        best = (step, planes.astype(np.int64), float(np.abs(planes * step - pos).max()))
    return best


def nearest_sampled_slice(slice_positions_mm, step_mm: float) -> np.ndarray:
    """For each plane of the uniform grid (``step_mm`` apart from slice 0), the nearest sampled slice.

    This is the slab rule of ``slab_thickness_mm``: a plane between two sampled slices belongs to the
    one it is closer to (the lower one on a tie).
    """
    pos = np.asarray(slice_positions_mm, dtype=np.float64)
    pos = pos - pos[0]
    n_planes = int(math.floor(pos[-1] / step_mm + 0.5)) + 1
    planes = np.arange(n_planes) * step_mm
    if pos.size == 1:
        return np.zeros(n_planes, dtype=np.int64)
    upper = np.clip(np.searchsorted(pos, planes), 1, pos.size - 1)
    lower = upper - 1
    take_upper = (pos[upper] - planes) < (planes - pos[lower])
    return np.where(take_upper, upper, lower).astype(np.int64)


def to_uniform_slices(volume: np.ndarray, slice_positions_mm, step_mm: float,
                      slice_planes: Optional[np.ndarray] = None) -> np.ndarray:
    """A per-sampled-slice volume [n, y, x] on the uniform grid [planes, y, x], nearest sampled slice per plane.

    ``slice_planes`` (from ``uniform_grid``) puts every sampled slice on its own plane exactly, even
    where rounding of the nearest-slice rule would pick a neighbour.
    """
    index = nearest_sampled_slice(slice_positions_mm, step_mm)
    if slice_planes is not None:
        inside = (slice_planes >= 0) & (slice_planes < index.size)
        index[slice_planes[inside]] = np.flatnonzero(inside)
    return np.ascontiguousarray(volume[index])
