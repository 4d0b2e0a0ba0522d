"""Rasterising tubes and spheres into the volume being painted."""
from __future__ import annotations

import numpy as np

from .fields import _Grid

def _tube_chunks(grid: _Grid, p0, p1, r0, r1, edge_mm, max_elems=1_500_000):
    """Rasterise capsules (segments p0-p1 in (x, y, z) mm, radii r0-r1 mm) with a soft edge.

    Yields ``(flat_index, weight)`` chunks, weight in (0, 1] = 1 inside, ramping to 0 over
    ``edge_mm`` around the surface (a crude partial-volume effect). Segments are grouped by box
    size so that thousands of small ones are rasterised in a few vectorised batches.
    """
    p0 = np.atleast_2d(np.asarray(p0, np.float64))
    p1 = np.atleast_2d(np.asarray(p1, np.float64))
    n_seg = len(p0)
    if n_seg == 0:
        return
    r0 = np.broadcast_to(np.asarray(r0, np.float64), (n_seg,))
    r1 = np.broadcast_to(np.asarray(r1, np.float64), (n_seg,))
    edge = np.broadcast_to(np.asarray(edge_mm, np.float64), (n_seg,))
    nz, ny, nx = grid.shape
    sp = np.array(grid.spacing)          # x, y, z
    org = np.array(grid.origin)
    n_axis = np.array([nx, ny, nz])
    ext = np.maximum(r0, r1) + edge
    lo = np.floor((np.minimum(p0, p1) - ext[:, None] - org) / sp).astype(np.int64)
    hi = np.ceil((np.maximum(p0, p1) + ext[:, None] - org) / sp).astype(np.int64)
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, n_axis - 1)
    valid = np.all(hi >= lo, axis=1)
    size = hi - lo + 1
    # box sizes rounded up to a ~1.25x ladder: few batches, little padding
    ladder = np.unique(np.ceil(1.25 ** np.arange(40)).astype(np.int64))
    k = np.where(valid[:, None], ladder[np.searchsorted(ladder, np.maximum(size, 1))], 0)
    k = np.minimum(k, n_axis)
    keys = k[:, 0] * 1_000_003 * 1_000_003 + k[:, 1] * 1_000_003 + k[:, 2]
    for key in np.unique(keys[valid]):
        sel = np.nonzero((keys == key) & valid)[0]
        kx, ky, kz = (int(v) for v in k[sel[0]])
        per = kx * ky * kz
        step = max(1, max_elems // per)
        for c in range(0, len(sel), step):
            idx = sel[c:c + step]
            anc = np.minimum(lo[idx], n_axis - np.array([kx, ky, kz]))
            ax = (anc[:, 0, None] + np.arange(kx))
            ay = (anc[:, 1, None] + np.arange(ky))
            az = (anc[:, 2, None] + np.arange(kz))
            xr = (org[0] + ax * sp[0] - p0[idx, 0, None]).astype(np.float32)[:, None, None, :]
            yr = (org[1] + ay * sp[1] - p0[idx, 1, None]).astype(np.float32)[:, None, :, None]
            zr = (org[2] + az * sp[2] - p0[idx, 2, None]).astype(np.float32)[:, :, None, None]
            d = (p1[idx] - p0[idx]).astype(np.float32)
            l2 = np.maximum((d ** 2).sum(1), 1e-9)
            dx, dy, dz = (d[:, i, None, None, None] for i in range(3))
            t = np.clip((xr * dx + yr * dy + zr * dz) / l2[:, None, None, None], 0.0, 1.0)
            dist = np.sqrt((xr - t * dx) ** 2 + (yr - t * dy) ** 2 + (zr - t * dz) ** 2)
            rr = (r0[idx, None, None, None] + t * (r1[idx] - r0[idx])[:, None, None, None])
            w = np.clip((rr - dist) / edge[idx, None, None, None] + 0.5, 0.0, 1.0).astype(np.float32)
            flat = (az[:, :, None, None] * ny + ay[:, None, :, None]) * nx + ax[:, None, None, :]
            keep = w > 0
            if keep.any():
                yield np.broadcast_to(flat, w.shape)[keep], w[keep]


class _Canvas:
    """The float32 volume being painted, its masks, and a scratch buffer for union weights."""

    def __init__(self, grid: _Grid):
        self.grid = grid
        self.hu = np.empty(grid.shape, np.float32)
        self.lung = np.zeros(grid.shape, bool)
        self.disease = np.zeros(grid.shape, bool)
        self.airway = np.zeros(grid.shape, bool)
        self._scratch = None

    def paint(self, chunks, value, *, region=None, amplitude=1.0, only_below=None, above=None):
        """Blend ``value`` into the volume with the union (max) of the chunk weights.

        ``region`` (flat bool) limits where paint lands; ``only_below`` paints only voxels
        currently below that HU (so e.g. ground glass spares vessels), ``above`` only voxels
        above that HU. Returns the flat indices painted and their weights.
        """
        if self._scratch is None:
            self._scratch = np.zeros(self.hu.size, np.float32)
        scratch = self._scratch
        region_flat = None if region is None else region.reshape(-1)
        parts = []
        for idx, w in chunks:
            if region_flat is not None:
                w = w * region_flat[idx]
            np.maximum.at(scratch, idx, w)
            parts.append(idx)
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        # duplicates are fine: every copy reads the same union weight and writes the same value
        idx = np.concatenate(parts)
        w = scratch[idx] * np.float32(amplitude)
        scratch[idx] = 0
        flat = self.hu.reshape(-1)
        v = flat[idx]
        if only_below is not None:
            w = w * (v < only_below)
        if above is not None:
            w = w * (v > above)
        flat[idx] = v + w * (np.float32(value) - v)
        return idx, w
