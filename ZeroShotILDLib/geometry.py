"""Voxel index <-> patient coordinate conversions (pure numpy)."""
from __future__ import annotations

import numpy as np


def index_to_ras(zyx: np.ndarray, spacing_mm, origin_mm, direction) -> np.ndarray:
    """Continuous voxel indices ``[z, y, x]`` (N,3) -> RAS millimetres (N,3).

    SimpleITK's physical space is LPS: ``p = origin + D @ (spacing * ijk)`` with ``ijk = (x, y, z)``.
    RAS flips the first two axes.
    """
    zyx = np.atleast_2d(np.asarray(zyx, dtype=np.float64))
    ijk = zyx[:, ::-1] * np.asarray(spacing_mm, dtype=np.float64)
    lps = ijk @ np.asarray(direction, dtype=np.float64).reshape(3, 3).T + np.asarray(origin_mm, dtype=np.float64)
    return lps * np.array([-1.0, -1.0, 1.0])
