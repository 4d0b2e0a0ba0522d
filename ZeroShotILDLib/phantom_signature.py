"""A mark the phantom generator writes into the voxels, so "is this a phantom?" is read from content.

Why in the voxels: a file name says nothing (a real CT copied to ``phantom_patient42.nii.gz`` is
still a real CT), and header fields (NIfTI ``descrip``, DICOM tags) are lost or forged by any
conversion. A short run of exact air values in the first rows of each slice, inside the circular
field of view but above the body, survives every lossless format SimpleITK writes (int16 NIfTI,
NRRD, MHA, DICOM) and our own padding map (the values are ordinary air, not padding, and not a
constant frame). Resampling or lossy compression destroys it, which fails safe: the scan is then
treated as real, and a phantom-trained model is flagged as meaningless on it.

A real CT cannot carry it by chance: ``CODE`` is 24 exact int16 values in a row, in at least
half of the slices.
"""
from __future__ import annotations

import numpy as np

#: 24 air values (HU) around -1000; a fixed pseudo-random pattern, never a constant run.
CODE = np.array([-1003, -997, -1001, -996, -1004, -999, -998, -1002, -995, -1000, -1005, -994,
                 -1001, -1003, -996, -998, -1004, -997, -1000, -995, -1002, -999, -1005, -994], dtype=np.int16)
#: Row of each axial slice that holds the code (second row: the first may be a scanner's frame).
ROW = 1


def _columns(nx: int) -> slice:
    start = max(0, nx // 2 - CODE.size // 2)
    return slice(start, start + CODE.size)


def stamp(hu: np.ndarray) -> np.ndarray:
    """Write the code into every slice of ``hu`` ([z, y, x] int16, changed in place; also returned).

    The code sits at the top centre of each slice: inside the inscribed field-of-view circle (its
    top edge is the centre column) and in front of the body, where a phantom has only air.
    """
    if hu.ndim != 3 or hu.shape[1] <= ROW or hu.shape[2] < CODE.size:
        return hu
    hu[:, ROW, _columns(hu.shape[2])] = CODE.astype(hu.dtype)
    return hu


def carries_signature(hu: np.ndarray) -> bool:
    """True when at least half of the slices of ``hu`` ([z, y, x], any axial orientation handled by
    the reader) hold the generator's code, in the same place or mirrored left-right or top-bottom."""
    hu = np.asarray(hu)
    if hu.ndim != 3 or hu.shape[1] <= ROW or hu.shape[2] < CODE.size or hu.shape[0] == 0:
        return False
    cols = _columns(hu.shape[2])
    rows = (ROW, hu.shape[1] - 1 - ROW)
    best = 0
    for r in rows:
        band = hu[:, r, :]
        for codes, where in ((CODE, cols), (CODE[::-1], slice(hu.shape[2] - cols.stop, hu.shape[2] - cols.start))):
            if where.start < 0:
                continue
            best = max(best, int(np.count_nonzero(np.all(band[:, where] == codes, axis=1))))
    return best * 2 >= hu.shape[0]
