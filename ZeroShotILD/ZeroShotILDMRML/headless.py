"""A real MRML scene without the Slicer application (``slicer-core``), for tests and batch figures.

Registers the module logics the results code uses (colours, volumes, markups, segmentations,
tables, plots, subject hierarchy) with an application logic, the way the Slicer application does
at start-up, and turns engine-side volumes (HU array + LPS geometry) into scalar volume nodes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import slicer
import vtk

from .volumes import set_ijk_to_ras

_LOGICS = (
    ("Colors", "vtkSlicerColorLogic"),
    ("Volumes", "vtkSlicerVolumesLogic"),
    ("Markups", "vtkSlicerMarkupsLogic"),
    ("Segmentations", "vtkSlicerSegmentationsModuleLogic"),
    ("Tables", "vtkSlicerTablesLogic"),
    ("Plots", "vtkSlicerPlotsLogic"),
    ("SubjectHierarchy", "vtkSlicerSubjectHierarchyModuleLogic"),
)


@dataclass
class HeadlessScene:
    """A scene, its application logic and the module logics registered with it.

    The logics are kept here on purpose: the application logic does not own them, and a colours
    logic that is garbage-collected takes the default colour tables out of the scene with it.
    """

    scene: object
    app_logic: object
    logics: dict = field(default_factory=dict)


def make_scene() -> HeadlessScene:
    """A scene with the module logics registered; also sets ``slicer.mrmlScene``."""
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    app.GetColorLogic().SetMRMLScene(scene)
    app.GetColorLogic().AddDefaultColorNodes()
    app.SetSliceLogics(vtk.vtkCollection())
    app.SetViewLogics(vtk.vtkCollection())
    headless = HeadlessScene(scene, app)
    for name, class_name in _LOGICS:
        logic = getattr(slicer, class_name)()
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app)
        app.SetModuleLogic(name, logic)
        headless.logics[name] = logic
    # slicer.util helpers (arrayFromVolume, updateVolumeFromArray, ...) look for the scene here.
    slicer.mrmlScene = scene
    return headless


def ijk_to_ras_from_lps(spacing_mm, origin_mm, direction) -> np.ndarray:
    """4x4 IJK-to-RAS matrix for SimpleITK-style geometry (spacing x,y,z; LPS origin; row-major LPS direction)."""
    flip = np.diag([-1.0, -1.0, 1.0])
    m = np.eye(4)
    m[:3, :3] = flip @ np.asarray(direction, dtype=np.float64).reshape(3, 3) * np.asarray(spacing_mm, dtype=np.float64)
    m[:3, 3] = flip @ np.asarray(origin_mm, dtype=np.float64)
    return m


def add_ct_volume(scene, hu: np.ndarray, spacing_mm, origin_mm, direction, name: str = "CT"):
    """A scalar volume node holding ``hu`` [z, y, x] with the given geometry, shown in the lung window."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(hu))
    set_ijk_to_ras(node, ijk_to_ras_from_lps(spacing_mm, origin_mm, direction))
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(-1350.0, 150.0)
    return node
