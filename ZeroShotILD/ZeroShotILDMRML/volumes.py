"""Slicer volume nodes <-> the engine's geometry conventions.

Slicer keeps a volume's geometry as one IJK-to-RAS matrix; the engine (like SimpleITK) keeps
``spacing_mm`` (x, y, z), an LPS origin and a row-major LPS direction matrix, and indexes voxels
[z, y, x]. ``arrayFromVolume`` already returns [k, j, i] = [z, y, x], so only the geometry needs
converting. Coordinates are the volume's own (local) frame: result nodes are put under the same
parent transform as the input, so they move with it.

Interval HRCT and gantry tilt in Slicer: the DICOM module (DICOMScalarVolumePlugin) loads any
series as a volume on an even grid and, when the slice corners from the DICOM headers differ from
that grid by more than a small tolerance, it logs "Irregular volume geometry detected" and, with
the application setting "Acquisition geometry regularization" at its default ("apply
regularization transform"), puts the volume under a grid transform node ("... acquisition
transform": one displacement per slice corner, taking each corner of the even grid to where the
headers say it is; the option "harden" resamples the volume instead, giving an even volume again).
The module works on the node as Slicer made it: voxels and patches on the even local grid, result
nodes under the same acquisition transform (so they overlay the warped CT exactly), and the true
slice positions read back through that transform for the lung volume and the patch centres in
the result (``acquisition_slice_positions``), as the command line reads them from the headers.
"""
from __future__ import annotations

from typing import Optional

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


def acquisition_slice_positions(volume_node) -> Optional[tuple]:
    """True offsets (mm from slice 0 along the slice normal) of the slices of a volume under a non-linear
    transform, such as the acquisition transform Slicer adds to an interval or tilted DICOM series;
    None when the node has no such transform or its slices stay evenly spaced.
    """
    parent = volume_node.GetParentTransformNode()
    if parent is None or parent.IsTransformToWorldLinear():
        return None
    image = volume_node.GetImageData()
    nz = int(image.GetDimensions()[2])
    if nz < 2:
        return None
    to_world = vtk.vtkGeneralTransform()
    parent.GetTransformToWorld(to_world)
    m = ijk_to_ras(volume_node)

    def world(i, j, k):
        return np.array(to_world.TransformPoint(*(m @ np.array([i, j, k, 1.0]))[:3]))

    corners = np.array([world(0, 0, k) for k in range(nz)])
    normal = np.cross(world(1, 0, 0) - corners[0], world(0, 1, 0) - corners[0])
    normal /= np.linalg.norm(normal)
    if normal @ (corners[-1] - corners[0]) < 0:
        normal = -normal
    offsets = (corners - corners[0]) @ normal
    gaps = np.diff(offsets)
    if np.any(gaps <= 1e-3):
        raise InputError(f"the transform of volume '{volume_node.GetName()}' folds its slices over each other: "
                         "remove or harden it (Data module) and apply again")
    if gaps.max() - gaps.min() <= max(0.01, 0.05 * float(np.median(gaps))):
        return None
    return tuple(float(v) for v in offsets)


def check_ct_volume(volume_node) -> None:
    """Refuse inputs the engine cannot analyse, with a one-line reason."""
    if volume_node is None:
        raise InputError("no input volume: select a chest CT volume")
    if volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(f"'{volume_node.GetName()}' is a labelmap: select the CT volume itself")
    from .mrml_results import ROLE_ATTRIBUTE

    role = volume_node.GetAttribute(ROLE_ATTRIBUTE)
    if role:
        raise InputError(f"'{volume_node.GetName()}' is ZeroShotILD's {role} output, not a CT: "
                         "select the CT volume itself")
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
    from ZeroShotILDLib.scan import axial_axis_order

    check_ct_volume(volume_node)
    spacing, origin, direction = volume_geometry(volume_node)
    name = volume_node.GetName()
    if axial_axis_order(direction, f"volume '{name}'") != (0, 1, 2):
        # Results go back onto this node's voxel grid, so the module cannot reorder its axes itself.
        raise InputError(f"volume '{name}' is stored as sagittal or coronal slices: reorient it to axial "
                         "(Orient Scalar Volume module, orientation Axial) and select that volume")
    return {"hu": slicer.util.arrayFromVolume(volume_node), "spacing_mm": spacing, "origin_mm": origin,
            "direction": direction, "source": name,
            "slice_positions_mm": acquisition_slice_positions(volume_node)}


def scan_from_volume_node(volume_node):
    """The engine's ``Scan`` from a CT volume node: a private copy of the voxels plus geometry.

    ``scan_from_array`` copies the voxels into a new int16 array (padding mapped to air), so edits
    to the node after Apply do not leak into the kept analysis.
    """
    from ZeroShotILDLib.scan import place_slices, scan_from_array

    inputs = scan_inputs(volume_node)
    positions = inputs.pop("slice_positions_mm")
    scan = scan_from_array(**inputs)
    place_slices(scan, positions, transform_name(volume_node))
    return scan


def transform_name(volume_node) -> str:
    """Name of the transform a volume node sits under ('' when none): the notes name what placed its slices."""
    parent = volume_node.GetParentTransformNode()
    return parent.GetName() if parent is not None else ""
