"""Patch probabilities painted back into the scan's voxel grid."""
from __future__ import annotations

from typing import Optional

import numpy as np

from .results import PatchSet


def paint_heatmap(patches: PatchSet, probabilities: np.ndarray, shape_zyx, *, slab_voxels: int = 1,
                  lung_mask: Optional[np.ndarray] = None) -> np.ndarray:
    """float32 [z,y,x] volume: each patch's box holds its probability, 0 elsewhere.

    Boxes are painted through ``slab_voxels`` slices centred on their own slice (the slice step), so
    a heatmap from every k-th slice still covers the lungs without gaps; where boxes overlap the
    highest probability wins. With ``lung_mask`` the heatmap is limited to the lungs.
    """
    heat = np.zeros(shape_zyx, dtype=np.float32)
    nz = shape_zyx[0]
    half_lo = (slab_voxels - 1) // 2
    half_hi = slab_voxels // 2
    order = np.argsort(probabilities, kind="stable")  # low first, so higher values overwrite
    for i in order:
        z = int(patches.slice_index[i])
        r, c = int(patches.row0[i]), int(patches.col0[i])
        z0, z1 = max(0, z - half_lo), min(nz, z + half_hi + 1)
        box = heat[z0:z1, r:r + patches.size_rows, c:c + patches.size_cols]
        np.maximum(box, np.float32(probabilities[i]), out=box)
    if lung_mask is not None:
        heat *= lung_mask
    return heat
