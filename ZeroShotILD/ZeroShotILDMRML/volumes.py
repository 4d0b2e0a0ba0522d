"""Slicer volume nodes <-> the engine's geometry conventions.

Slicer keeps a volume's geometry as one IJK-to-RAS matrix; the engine (like SimpleITK) keeps
``spacing_mm`` (x, y, z), an LPS origin and a row-major LPS direction matrix, and indexes voxels
[z, y, x]. ``arrayFromVolume`` already returns [k, j, i] = [z, y, x], so only the geometry needs
converting. Coordinates are the volume's own (local) frame: result nodes are put under the same
parent transform as the input, so they move with it.
"""
from __future__ import annotations

import numpy as np
import slicer
import vtk

from ZeroShotILDLib.errors import InputError

_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


def ijk_to_ras(volume_node) -> np.ndarray:
    """The volume's 4x4 IJK-to-RAS matrix as numpy."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def set_ijk_to_ras(volume_node, matrix4: np.ndarray) -> None:
    volume_node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(np.asarray(matrix4, dtype=np.float64)))


def volume_geometry(volume_node) -> tuple[tuple, tuple, tuple]:
    """(spacing_mm (x, y, z), origin_mm LPS, direction 9-tuple LPS row-major) of a volume node."""
    m = ijk_to_ras(volume_node)
    axes = m[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing <= 0):
        raise InputError(f"volume '{volume_node.GetName()}' has a zero voxel spacing: fix its geometry in the Volumes module")
    direction_lps = _LPS_FROM_RAS @ (axes / spacing)
    origin_lps = _LPS_FROM_RAS @ m[:3, 3]
    return tuple(float(s) for s in spacing), tuple(float(o) for o in origin_lps), tuple(float(d) for d in direction_lps.ravel())


def index_to_ras(volume_node, zyx) -> np.ndarray:
    """Continuous voxel indices [z, y, x] (N, 3) -> RAS millimetres (N, 3) in the volume's frame."""
    zyx = np.atleast_2d(np.asarray(zyx, dtype=np.float64))
    ijk1 = np.concatenate([zyx[:, ::-1], np.ones((zyx.shape[0], 1))], axis=1)
    return (ijk1 @ ijk_to_ras(volume_node).T)[:, :3]


def check_ct_volume(volume_node) -> None:
    """Refuse inputs the engine cannot analyse, with a one-line reason."""
    if volume_node is None:
        raise InputError("no input volume: select a chest CT volume")
    if volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(f"'{volume_node.GetName()}' is a labelmap: select the CT volume itself")
    image = volume_node.GetImageData()
    if image is None or image.GetNumberOfPoints() == 0:
        raise InputError(f"volume '{volume_node.GetName()}' has no voxels: load the CT again")
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(f"volume '{volume_node.GetName()}' has {image.GetNumberOfScalarComponents()} components "
                         "(colour or vector image): select a single-component CT volume in HU")
    dims = image.GetDimensions()
    if min(dims) < 2 and sorted(dims)[1] < 16:
        raise InputError(f"volume '{volume_node.GetName()}' is {dims[0]}x{dims[1]}x{dims[2]} voxels: too small for a chest CT")


def scan_inputs(volume_node) -> dict:
    """The arguments of ``ZeroShotILDLib.scan.scan_from_array`` for a CT volume node.

    ``hu`` is ``arrayFromVolume``'s view of the node's own voxels (no copy); the geometry is
    converted to the engine's conventions. The one conversion for both ways of analysing: here
    (:func:`scan_from_volume_node`) and in the analysis worker, which gets the same values by file.
    """
    check_ct_volume(volume_node)
    spacing, origin, direction = volume_geometry(volume_node)
    return {"hu": slicer.util.arrayFromVolume(volume_node), "spacing_mm": spacing, "origin_mm": origin,
            "direction": direction, "source": volume_node.GetName()}


def scan_from_volume_node(volume_node):
    """The engine's ``Scan`` from a CT volume node: a private copy of the voxels plus geometry.

    ``scan_from_array`` copies the voxels into a new int16 array (padding mapped to air), so edits
    to the node after Apply do not leak into the kept analysis.
    """
    from ZeroShotILDLib.scan import scan_from_array

    return scan_from_array(**scan_inputs(volume_node))
