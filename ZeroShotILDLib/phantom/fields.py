"""The image grid and smooth 3-D fields (mm coordinates) the painters read."""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

class _Grid:
    """Image grid: shape (z, y, x), spacing (x, y, z) mm, origin centred on 0."""

    def __init__(self, shape, spacing):
        self.shape = shape
        self.spacing = spacing
        nz, ny, nx = shape
        sx, sy, sz = spacing
        self.origin = (-(nx - 1) * sx / 2.0, -(ny - 1) * sy / 2.0, -(nz - 1) * sz / 2.0)
        self.xs = (self.origin[0] + np.arange(nx) * sx).astype(np.float32)
        self.ys = (self.origin[1] + np.arange(ny) * sy).astype(np.float32)
        self.zs = self.origin[2] + np.arange(nz) * sz
        self.fov_radius = min(nx * sx, ny * sy) / 2.0
        self.voxel_mm = float(np.cbrt(sx * sy * sz))


def _normalize(v):
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(n, 1e-9)


def _rotate(v, axis, angle):
    """Rotate unit vectors ``v`` (N,3) about unit axes ``axis`` (N,3) perpendicular to them."""
    c, s = np.cos(angle)[:, None], np.sin(angle)[:, None]
    return v * c + np.cross(axis, v) * s


def _random_perpendicular(rng, d):
    a = _normalize(np.cross(d, _normalize(rng.normal(size=d.shape))))
    return a


def _ellipse_q(x, y, cx, cy, a, b_ant, b_post):
    """Squared normalised radius of an ellipse whose anterior (-y) and posterior halves differ."""
    dy = y - cy
    b = np.where(dy < 0, b_ant, b_post)
    return ((x - cx) / a) ** 2 + (dy / b) ** 2


def _capsule_d2(x, y, p, q):
    """Squared in-plane distance to the segment p-q (broadcast x (1,nx), y (ny,1))."""
    dx, dy = q[0] - p[0], q[1] - p[1]
    l2 = max(dx * dx + dy * dy, 1e-9)
    t = np.clip(((x - p[0]) * dx + (y - p[1]) * dy) / l2, 0.0, 1.0)
    return (x - p[0] - t * dx) ** 2 + (y - p[1] - t * dy) ** 2


def _smoothstep(x, lo, hi):
    t = np.clip((x - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


class _Field:
    """A scalar field sampled on a regular 3-D lattice (mm), read by trilinear interpolation."""

    def __init__(self, data, origin_zyx, step_mm):
        self.data = np.ascontiguousarray(data, dtype=np.float32)
        self.origin = np.asarray(origin_zyx, dtype=np.float64)
        self.step = float(step_mm)
        self._prep = None

    def at(self, pts_xyz):
        """Values at points ``(N, 3)`` given as (x, y, z) mm; nearest edge value outside."""
        pts = np.asarray(pts_xyz, dtype=np.float64)
        coords = np.stack([(pts[:, 2] - self.origin[0]) / self.step,
                           (pts[:, 1] - self.origin[1]) / self.step,
                           (pts[:, 0] - self.origin[2]) / self.step])
        return ndimage.map_coordinates(self.data, coords, order=1, mode="nearest")

    def prepare(self, ys, xs):
        """Cache bilinear weights for the in-plane pixel centres ``ys``, ``xs`` (mm)."""
        def axis(vals, o, n):
            f = np.clip((np.asarray(vals, np.float64) - o) / self.step, 0, n - 1)
            i0 = np.minimum(np.floor(f).astype(np.intp), max(n - 2, 0))
            i1 = np.minimum(i0 + 1, n - 1)
            return i0, i1, (f - i0).astype(np.float32)
        self._prep = (axis(ys, self.origin[1], self.data.shape[1]),
                      axis(xs, self.origin[2], self.data.shape[2]))

    def plane(self, z):
        """Values on the prepared pixel grid at height ``z`` (mm), float32 (len(ys), len(xs))."""
        nz = self.data.shape[0]
        f = min(max((z - self.origin[0]) / self.step, 0.0), nz - 1)
        k0 = min(int(math.floor(f)), max(nz - 2, 0))
        k1 = min(k0 + 1, nz - 1)
        fz = np.float32(f - k0)
        p = self.data[k0] * (1 - fz) + self.data[k1] * fz
        (j0, j1, fy), (i0, i1, fx) = self._prep
        rows = p[j0] * (1 - fy)[:, None] + p[j1] * fy[:, None]
        return rows[:, i0] * (1 - fx) + rows[:, i1] * fx


def _smooth_noise(rng, shape, sigma_cells):
    """Zero-mean, unit-variance Gaussian-smoothed white noise (float32)."""
    n = rng.standard_normal(shape, dtype=np.float32)
    n = ndimage.gaussian_filter(n, sigma_cells, mode="wrap", truncate=3.0)
    n -= n.mean()
    n /= max(float(n.std()), 1e-6)
    return n


def _noise_field(rng, lo_zyx, hi_zyx, feature_mm):
    """A smooth random field over the box lo..hi (mm) with blobs about ``feature_mm`` across."""
    step = feature_mm / 2.5
    lo = np.asarray(lo_zyx, float) - 2 * step
    shape = tuple(int(math.ceil((h - l) / step)) + 3 for l, h in zip(lo, hi_zyx))
    return _Field(_smooth_noise(rng, shape, 1.0), lo, step)
