"""Space-filling airway and vessel trees."""
from __future__ import annotations

import numpy as np

def _partition_tree(rng, points, root, *, r_term, alpha=(0.45, 0.65), wiggle=0.12, split=(0.35, 0.65)):
    """A space-filling vessel tree built by recursively halving a territory of points.

    Every node owns a set of target points (its territory). Its branch runs from the parent's
    end a fraction ``alpha`` of the way to the territory's centroid (the whole way for a single
    point), then the territory is cut across its longest axis into two children. Radii follow
    Murray's law, ``r = r_term * n_points ** (1/3)``. Vectorised per level.

    Returns ``(p0, p1, r0, r1, n_points)`` for all segments (positions (x, y, z) mm).
    """
    pts = np.asarray(points, float)
    n = len(pts)
    if n == 0:
        e3, e1 = np.zeros((0, 3)), np.zeros(0)
        return e3, e3, e1, e1, e1
    node = np.zeros(n, np.intp)
    starts = np.asarray(root, float)[None]
    out = [[], [], [], [], []]
    for _ in range(64):
        m = len(starts)
        cnt = np.bincount(node, minlength=m).astype(float)
        cen = np.stack([np.bincount(node, pts[:, i], minlength=m) for i in range(3)], 1) / cnt[:, None]
        leaf = cnt <= 1
        a = rng.uniform(*alpha, m)
        a[leaf] = 1.0
        vec = cen - starts
        length = np.linalg.norm(vec, axis=1)
        jit = rng.normal(0, wiggle, (m, 3)) * length[:, None]
        jit[leaf] = 0
        ends = starts + a[:, None] * vec + jit * a[:, None]
        r = r_term * cnt ** (1 / 3)
        out[0].append(starts), out[1].append(ends), out[2].append(r)
        out[3].append(r * 0.97), out[4].append(cnt)
        # split each territory with >= 2 points across its longest axis
        alive = ~leaf[node]
        if not alive.any():
            break
        pts_a, node_a = pts[alive], node[alive]
        d = pts_a - cen[node_a]
        cov = np.zeros((m, 3, 3))
        for i in range(3):
            for j in range(i, 3):
                cov[:, i, j] = cov[:, j, i] = np.bincount(node_a, d[:, i] * d[:, j], minlength=m)
        axis = np.linalg.eigh(cov)[1][:, :, -1]
        proj = (d * axis[node_a]).sum(1)
        order = np.lexsort((proj, node_a))
        rank = np.empty(len(order), np.intp)
        first = np.searchsorted(node_a[order], np.arange(m))
        rank[order] = np.arange(len(order)) - first[node_a[order]]
        frac = rng.uniform(*split, m)
        cut = np.clip(np.rint(frac * cnt), 1, np.maximum(cnt - 1, 1))
        child = (rank >= cut[node_a]).astype(np.intp)
        key = node_a * 2 + child
        uniq, new_node = np.unique(key, return_inverse=True)
        pts, node = pts_a, new_node.reshape(-1)
        starts = ends[uniq // 2]
    return tuple(np.concatenate(v) for v in out)


def _territory_points(rng, lung_c, origin_zyx, cs, side, spacing_mm, depth_c=None, min_depth=0.0):
    """Roughly uniform random points (x, y, z mm) in one lung of a coarse mask, ``spacing_mm`` apart."""
    xs = origin_zyx[2] + np.arange(lung_c.shape[2]) * cs
    mask = lung_c & ((xs < 0) if side < 0 else (xs >= 0))[None, None, :]
    if depth_c is not None:
        mask &= depth_c > min_depth
    kz, ky, kx = np.nonzero(mask)
    if len(kz) == 0:
        return np.zeros((0, 3))
    n = int(min(len(kz) * cs ** 3 / spacing_mm ** 3, 8000))
    n = max(n, 2)
    pick = rng.integers(len(kz), size=n)
    jit = rng.uniform(-0.5, 0.5, (n, 3)) * cs
    return np.stack([origin_zyx[2] + kx[pick] * cs, origin_zyx[1] + ky[pick] * cs,
                     origin_zyx[0] + kz[pick] * cs], 1) + jit
