"""An ``AnalysisResult`` as MRML nodes, grouped under the input volume in the subject hierarchy.

Outputs of one input volume live in one subject-hierarchy folder, a child of the volume's item:

- segmentation "Lungs" (one segment, reference geometry = the input);
- the heatmap: a scalar volume with the input's geometry holding the first prompt's patch
  probability in each patch box (0 elsewhere, thresholded away so only patches are coloured), with
  a colour table and a colour legend; the colour range is either the probabilities' own range
  ("relative", the default) or the fixed 0-1 range, and the legend's title says which;
- one locked ROI markup per top-ranked patch, the box outline on its own slice, named
  "#rank probability" (three decimals: zero-shot scores often differ only there);
- the montage as a one-slice scalar volume (the image the model classified), placed beside the scan;
- a table of finding and subtype probabilities with a bar chart, and a table of the top patches
  with the same columns as the command line's ``patches.csv``;
- segmentation "Patterns" (when the result has a pattern map): one segment per pattern prompt, in
  the pattern's colour, holding the lung voxels of the patches labelled with it (what the command
  line's ``patterns.nii.gz`` holds), so Segment Statistics measures it;
- an "extent by zone" table (rows: whole lung and the zones, columns: each prompt's and each
  pattern's extent in % of that zone's scored lung volume, as ``result.json``'s ``extent``) with a
  bar chart of the primary prompt's extent by zone.

Roles (``ZeroShotILD.Role``) and node classes, one node per role and results folder unless noted:

=================  =========================  =========================================
role               class                      written by
=================  =========================  =========================================
lungs              vtkMRMLSegmentationNode    a full analysis only (kept on re-prompt)
heatmap            vtkMRMLScalarVolumeNode    every run and re-prompt
patch              vtkMRMLMarkupsROINode      one per top patch, replaced every time
montage            vtkMRMLScalarVolumeNode    every run and re-prompt
probabilities      vtkMRMLTableNode           every run and re-prompt
patches            vtkMRMLTableNode           every run and re-prompt
chart / series     vtkMRMLPlotChartNode /     every run and re-prompt
                   vtkMRMLPlotSeriesNode
patterns           vtkMRMLSegmentationNode    every run and re-prompt; removed when the
                                              result has no pattern map
extent             vtkMRMLTableNode           every run and re-prompt
extentChart /      vtkMRMLPlotChartNode /     every run and re-prompt
extentSeries       vtkMRMLPlotSeriesNode
heatmapColors      vtkMRMLColorTableNode      once per scene (not in the folder)
=================  =========================  =========================================

Every output node carries the attribute ``ZeroShotILD.Role`` so that a new run or a new prompt
updates the nodes in place instead of piling up copies. Imports ``slicer`` and ``vtk`` but never
Qt, so it runs in Slicer and under ``slicer-core``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import slicer
import vtk

from .volumes import ijk_to_ras, index_to_ras, set_ijk_to_ras

ROLE_ATTRIBUTE = "ZeroShotILD.Role"
FOLDER_ATTRIBUTE = "ZeroShotILD.Results"
NOTES_ATTRIBUTE = "ZeroShotILD.Notes"
PROMPT_ATTRIBUTE = "ZeroShotILD.Prompt"
RANK_ATTRIBUTE = "ZeroShotILD.Rank"
#: On the heatmap: "lo hi" of the primary prompt's probabilities, and the colour range mode shown.
PROBABILITY_RANGE_ATTRIBUTE = "ZeroShotILD.ProbabilityRange"
RANGE_MODE_ATTRIBUTE = "ZeroShotILD.RangeMode"
#: On the probability table: why the scores are not meaningful ("" when they are).
WARNING_ATTRIBUTE = "ZeroShotILD.ModelWarning"
FOLDER_NAME = "ZeroShotILD results"
COLOR_NODE_NAME = "ZeroShotILD heatmap"
LUNGS_NAME = "Lungs"
PATTERNS_NAME = "Patterns"

LUNGS = "lungs"
HEATMAP = "heatmap"
PATCH = "patch"
MONTAGE = "montage"
PROBABILITIES = "probabilities"
PATCH_TABLE = "patches"
CHART = "chart"
SERIES = "series"
COLORS = "heatmapColors"
PATTERNS = "patterns"
EXTENT_TABLE = "extent"
EXTENT_CHART = "extentChart"
EXTENT_SERIES = "extentSeries"
#: Rows of the extent table: the whole lung, then the zones in the report's order (``report.ZONES``).
WHOLE_LUNG = "whole lung"
EXTENT_ZONES = ("upper", "middle", "lower", "left", "right", "subpleural", "central")
#: Column-name prefix of a pattern's extent (a pattern may share its text with a prompt).
PATTERN_COLUMN_PREFIX = "pattern: "

LUNG_COLOR = (0.55, 0.75, 1.0)
#: The Lungs in 3-D: see-through, from a surface on a grid of about this voxel size (mm).
LUNG_OPACITY_3D = 0.35
LUNG_SURFACE_MM = 3.0
OUTLINE_COLOR = (0.0, 1.0, 1.0)
#: Heatmap voxels at or below this are outside every patch and drawn transparent.
OUTSIDE_THRESHOLD = 1e-6
#: Colour range of the heatmap: the probabilities' own min-max, or the fixed 0-1.
RELATIVE_RANGE = "relative"
FIXED_RANGE = "fixed 0-1"
RANGE_MODES = (RELATIVE_RANGE, FIXED_RANGE)
#: Labels on the colour legend (Slicer's default for a colour legend is 5 too).
LEGEND_LABELS = 5
#: Gap between the scan and the montage placed beside it, in mm.
MONTAGE_GAP_MM = 20.0


@dataclass
class ResultNodes:
    """The nodes holding one input volume's results."""

    folder_item: int
    lungs: object = None
    heatmap: object = None
    patch_rois: list = field(default_factory=list)
    montage: object = None
    probabilities: object = None
    patch_table: object = None
    chart: object = None
    series: object = None
    patterns: object = None
    extent_table: object = None
    extent_chart: object = None
    extent_series: object = None

    def nodes(self) -> list:
        single = [self.lungs, self.heatmap, self.montage, self.probabilities, self.patch_table, self.chart, self.series,
                  self.patterns, self.extent_table, self.extent_chart, self.extent_series]
        return [n for n in single if n is not None] + list(self.patch_rois)


def output_volume_ids(scene) -> list:
    """IDs of this module's own scalar volumes (heatmaps, montages) in ``scene``: not CTs to analyse.

    The panel hides them from its input selector (``qMRMLSortFilterProxyModel.hiddenNodeIDs``); they
    keep showing everywhere else (slice view layers, Data module).
    """
    if scene is None:
        return []
    ids = []
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
        if node.GetAttribute(ROLE_ATTRIBUTE):
            ids.append(node.GetID())
    return ids


# ----------------------------------------------------------------------------------------------
# Subject hierarchy
# ----------------------------------------------------------------------------------------------
def _sh(scene):
    return slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)


def _item(sh, node) -> int:
    """The node's subject-hierarchy item; created when nothing else did (no SH plugins under slicer-core)."""
    item = sh.GetItemByDataNode(node)
    if not item:
        item = sh.CreateItem(sh.GetSceneItemID(), node)
    return item


def _children(sh, item) -> list:
    ids = vtk.vtkIdList()
    sh.GetItemChildren(item, ids)
    return [ids.GetId(i) for i in range(ids.GetNumberOfIds())]


def results_folder(input_volume, *, create: bool = True) -> int:
    """The folder item holding ``input_volume``'s results (0 when absent and not created)."""
    sh = _sh(input_volume.GetScene())
    parent = _item(sh, input_volume)
    for child in _children(sh, parent):
        if sh.GetItemAttribute(child, FOLDER_ATTRIBUTE) == "1":
            return child
    if not create:
        return 0
    folder = sh.CreateFolderItem(parent, FOLDER_NAME)
    sh.SetItemAttribute(folder, FOLDER_ATTRIBUTE, "1")
    return folder


def _folder_nodes(input_volume, folder: int) -> list:
    sh = _sh(input_volume.GetScene())
    out = []
    for child in _children(sh, folder):
        node = sh.GetItemDataNode(child)
        if node is not None and node.GetScene() is not None:  # an item may outlive its removed node
            out.append(node)
    return out


def find_result_nodes(input_volume) -> Optional[ResultNodes]:
    """The result nodes already in the scene for ``input_volume``, or None."""
    folder = results_folder(input_volume, create=False)
    if not folder:
        return None
    nodes = ResultNodes(folder)
    single = {LUNGS: "lungs", HEATMAP: "heatmap", MONTAGE: "montage", PROBABILITIES: "probabilities",
              PATCH_TABLE: "patch_table", CHART: "chart", SERIES: "series", PATTERNS: "patterns",
              EXTENT_TABLE: "extent_table", EXTENT_CHART: "extent_chart", EXTENT_SERIES: "extent_series"}
    for node in _folder_nodes(input_volume, folder):
        role = node.GetAttribute(ROLE_ATTRIBUTE)
        if role == PATCH:
            nodes.patch_rois.append(node)
        elif role in single:
            setattr(nodes, single[role], node)
    nodes.patch_rois.sort(key=lambda n: int(n.GetAttribute(RANK_ATTRIBUTE) or 0))
    return nodes


class _Builder:
    """Finds or creates role-tagged nodes in one results folder; remembers what it created."""

    def __init__(self, input_volume):
        self.input = input_volume
        self.scene = input_volume.GetScene()
        self.sh = _sh(self.scene)
        self.folder = results_folder(input_volume)
        self.created: list = []

    def node(self, class_name: str, role: str, name: str):
        for existing in _folder_nodes(self.input, self.folder):
            if existing.GetAttribute(ROLE_ATTRIBUTE) == role and existing.IsA(class_name):
                existing.SetName(name)
                return existing
        return self.new(class_name, role, name)

    def new(self, class_name: str, role: str, name: str):
        node = self.scene.AddNewNodeByClass(class_name, name)
        self.created.append(node)
        node.SetAttribute(ROLE_ATTRIBUTE, role)
        self.sh.SetItemParent(_item(self.sh, node), self.folder)
        return node

    def follow_input_transform(self, node) -> None:
        # Results are in the input's own frame; the same parent transform keeps them aligned with it.
        node.SetAndObserveTransformNodeID(self.input.GetTransformNodeID())

    @contextlib.contextmanager
    def rollback_on_error(self):
        """Remove the nodes this builder created if building fails, so a failed run adds nothing."""
        try:
            yield self
        except BaseException:
            for node in reversed(self.created):
                remove_node(node)
            raise


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def write_result(input_volume, result, *, app_logic=None) -> ResultNodes:
    """All outputs of a full analysis of ``input_volume`` (replacing that volume's earlier results)."""
    builder = _Builder(input_volume)
    with builder.rollback_on_error():
        lungs = _write_lungs(builder, result.lung_mask)
        nodes = _write_prompt_outputs(builder, result, app_logic)
        nodes.lungs = lungs
    return nodes


def write_prompt_outputs(input_volume, result, *, app_logic=None) -> ResultNodes:
    """The outputs that depend on the prompts (after a re-prompt): heatmap, patches, montage, tables.

    The lung segmentation depends only on the scan and stays as it is.
    """
    builder = _Builder(input_volume)
    with builder.rollback_on_error():
        nodes = _write_prompt_outputs(builder, result, app_logic)
    existing = find_result_nodes(input_volume)
    nodes.lungs = existing.lungs if existing else None
    return nodes


def _write_prompt_outputs(builder: _Builder, result, app_logic) -> ResultNodes:
    nodes = ResultNodes(builder.folder)
    nodes.heatmap = _write_heatmap(builder, result, app_logic)
    nodes.patch_rois = _write_patch_rois(builder, result)
    nodes.montage = _write_montage(builder, result)
    nodes.probabilities = _write_probability_table(builder, result)
    nodes.patch_table = _write_patch_table(builder, result)
    nodes.chart, nodes.series = _write_chart(builder, result, nodes.probabilities)
    nodes.patterns = _write_patterns(builder, result)
    nodes.extent_table = _write_extent_table(builder, result)
    nodes.extent_chart, nodes.extent_series = _write_extent_chart(builder, result, nodes.extent_table)
    return nodes


def _write_lungs(builder: _Builder, lung_mask: np.ndarray):
    """Segmentation "Lungs" whose reference geometry is the input volume."""
    ref = builder.input
    seg = builder.node("vtkMRMLSegmentationNode", LUNGS, LUNGS_NAME)
    if seg.GetDisplayNode() is None:
        seg.CreateDefaultDisplayNodes()
    # Transform first: the reference geometry is taken in the segmentation's own frame, so under
    # the input's transform it is the input's own grid (set before, it is the transformed grid).
    builder.follow_input_transform(seg)
    seg.SetReferenceImageGeometryParameterFromVolumeNode(ref)
    segmentation = seg.GetSegmentation()
    segmentation.RemoveAllSegments()
    _import_labels(builder, seg, lung_mask, LUNGS_NAME)
    if segmentation.GetNumberOfSegments() == 0:
        # An empty mask imports no segment; keep the named segment so the user sees it is empty.
        segmentation.AddEmptySegment(LUNGS_NAME, LUNGS_NAME, LUNG_COLOR)
    segment = segmentation.GetNthSegment(0)
    segment.SetName(LUNGS_NAME)
    segment.SetColor(*LUNG_COLOR)
    display = seg.GetDisplayNode()
    # Outline only in slice views, so the heatmap underneath stays readable.
    display.SetOpacity2DFill(0.0)
    display.SetOpacity2DOutline(0.8)
    # In 3-D the lungs show as a see-through surface (the ROIs inside stay visible). A segmentation
    # made from a labelmap has no surface until one is made, and Slicer's own conversion (smoothed,
    # full resolution) takes seconds of the main thread on a full CT, so a coarse one is built here.
    surface = lung_surface(lung_mask, ijk_to_ras(ref))
    if surface.GetNumberOfPoints():
        segment.AddRepresentation(slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName(),
                                  surface)
    display.SetPreferredDisplayRepresentationName3D(
        slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName())
    display.SetOpacity3D(LUNG_OPACITY_3D)
    return seg


def lung_surface(lung_mask: np.ndarray, ijk_to_ras4: np.ndarray, *, voxel_mm: float = LUNG_SURFACE_MM):
    """A smoothed closed surface (vtkPolyData, RAS mm) of a [z,y,x] mask, from a ~``voxel_mm`` grid.

    For the 3-D view only: every ``voxel_mm / spacing``-th voxel along each axis (the mask itself is
    not resampled, so this is cheap), padded by one empty voxel so the surface closes at the volume's
    edges, then SurfaceNets with its own smoothing (flying edges where VTK lacks it) and the IJK-to-RAS
    matrix. The segmentation's labelmap stays the source: editing it in Slicer replaces this surface.
    """
    spacing = np.linalg.norm(np.asarray(ijk_to_ras4, dtype=np.float64)[:3, :3], axis=0)  # i, j, k
    step_kji = [max(1, int(round(voxel_mm / s))) for s in spacing[::-1]]
    coarse = np.ascontiguousarray(lung_mask[tuple(slice(n // 2, None, n) for n in step_kji)], dtype=np.uint8)
    coarse = np.pad(coarse, 1)
    if not coarse.any():
        return vtk.vtkPolyData()
    image = vtk.vtkImageData()
    image.SetDimensions(*coarse.shape[::-1])
    image.SetSpacing(*[float(n) for n in step_kji[::-1]])  # in input voxels, i j k
    image.SetOrigin(*[float(n // 2 - n) for n in step_kji[::-1]])  # the pad voxel sits one step before
    from vtk.util.numpy_support import numpy_to_vtk

    image.GetPointData().SetScalars(numpy_to_vtk(coarse.ravel(), deep=True))
    if hasattr(vtk, "vtkSurfaceNets3D"):
        nets = vtk.vtkSurfaceNets3D()
        nets.SetLabel(0, 1)
        nets.SetOutputMeshTypeToTriangles()
        nets.SmoothingOn()
    else:
        nets = vtk.vtkDiscreteFlyingEdges3D()
        nets.SetValue(0, 1)
    nets.SetInputData(image)
    transform = vtk.vtkTransform()
    transform.SetMatrix(_vtk_matrix(ijk_to_ras4))
    to_ras = vtk.vtkTransformPolyDataFilter()
    to_ras.SetTransform(transform)
    to_ras.SetInputConnection(nets.GetOutputPort())
    last = to_ras
    if np.linalg.det(np.asarray(ijk_to_ras4, dtype=np.float64)[:3, :3]) < 0:
        last = vtk.vtkReverseSense()  # a mirroring matrix turns the triangles inside out: lit from inside
        last.SetInputConnection(to_ras.GetOutputPort())
    last.Update()
    surface = vtk.vtkPolyData()
    surface.DeepCopy(last.GetOutput())
    return surface


def _import_labels(builder: _Builder, seg, labels: np.ndarray, name: str, segment_ids=None) -> None:
    """Import a [z,y,x] label array on the input's voxel grid into ``seg``.

    Through a temporary labelmap with the input's IJK-to-RAS and the input's parent transform: the
    import resamples a labelmap that sits under another transform than the segmentation, so with the
    segmentation under the input's transform (an acquisition or registration transform) a labelmap
    outside it would land elsewhere. Under the same transform the voxel grid is taken over exactly.
    ``segment_ids``: label k goes into the k-th of these existing segments; without them the import
    makes one segment per label value present.
    """
    labelmap = builder.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
    try:
        labelmap.SetIJKToRASMatrix(_vtk_matrix(ijk_to_ras(builder.input)))
        builder.follow_input_transform(labelmap)
        slicer.util.updateVolumeFromArray(labelmap, np.ascontiguousarray(labels, dtype=np.uint8))
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        ok = (logic.ImportLabelmapToSegmentationNode(labelmap, seg) if segment_ids is None
              else logic.ImportLabelmapToSegmentationNode(labelmap, seg, segment_ids))
        if not ok:
            raise RuntimeError(f"importing the {name} labels into the segmentation failed")
    finally:
        remove_node(labelmap)


def pattern_segment_id(k: int) -> str:
    """Segment ID of pattern label ``k`` (1-based, as in patterns.nii.gz)."""
    return f"pattern_{k}"


def _write_patterns(builder: _Builder, result):
    """Segmentation "Patterns": segment k = the lung voxels labelled pattern k (``patterns.label_volume``).

    Every pattern gets its segment, empty when no patch won it, so the segment list (and Segment
    Statistics' table) always names the whole set. Removed when the result has no pattern map.
    """
    pm = getattr(result, "patterns", None)
    if pm is None:
        for node in _folder_nodes(builder.input, builder.folder):
            if node.GetAttribute(ROLE_ATTRIBUTE) == PATTERNS:
                remove_node(node)
        return None
    seg = builder.node("vtkMRMLSegmentationNode", PATTERNS, PATTERNS_NAME)
    if seg.GetDisplayNode() is None:
        seg.CreateDefaultDisplayNodes()
    builder.follow_input_transform(seg)  # before the reference geometry, as for the lungs
    seg.SetReferenceImageGeometryParameterFromVolumeNode(builder.input)
    segmentation = seg.GetSegmentation()
    segmentation.RemoveAllSegments()
    ids = vtk.vtkStringArray()
    for k, (name, colour) in enumerate(zip(pm.names, pm.colours), start=1):
        segment_id = segmentation.AddEmptySegment(pattern_segment_id(k), name, tuple(c / 255.0 for c in colour))
        ids.InsertNextValue(segment_id)
    labels = pattern_labels(result)
    if labels.any():
        _import_labels(builder, seg, labels, PATTERNS_NAME, ids)
    seg.SetAttribute(PROMPT_ATTRIBUTE, result.primary_prompt)
    display = seg.GetDisplayNode()
    # Outlines only in slice views: a fill over the heatmap mixes the two colour schemes and hid
    # the heatmap colour of the best patches (issue 23). The patterns stay readable as contours.
    display.SetVisibility2DFill(False)
    display.SetOpacity2DFill(0.0)
    display.SetVisibility2DOutline(True)
    display.SetOpacity2DOutline(1.0)
    return seg


def extent_columns(result) -> list:
    """(column name, {row: % or NaN}) of the extent table: each prompt, then each pattern."""
    out = []

    def column(record):
        by_zone = record.get("by_zone") or {}
        values = {WHOLE_LUNG: record.get("lung_fraction")}
        values.update({z: by_zone.get(z) for z in EXTENT_ZONES})
        return {k: (100.0 * float(v) if v is not None else float("nan")) for k, v in values.items()}

    for prompt, record in (getattr(result, "extent", None) or {}).items():
        out.append((prompt, column(record)))
    pm = getattr(result, "patterns", None)
    if pm is not None:
        prompts = set(getattr(result, "extent", None) or {})
        for name in pm.names:
            # A pattern that is also a prompt has one extent (one rule): its prompt column shows it.
            if name in pm.extent and name not in prompts:
                out.append((PATTERN_COLUMN_PREFIX + name, column(pm.extent[name])))
    return out


def _write_extent_table(builder: _Builder, result):
    table = builder.node("vtkMRMLTableNode", EXTENT_TABLE, f"{builder.input.GetName()} extent by zone (%)")
    rows = (WHOLE_LUNG,) + EXTENT_ZONES
    columns = [("Index", "int", range(1, len(rows) + 1)), ("Zone", "string", rows)]
    for name, values in extent_columns(result):
        columns.append((name, "double", [values[r] for r in rows]))
    _fill_table(table, columns)
    table.SetAttribute(PROMPT_ATTRIBUTE, result.primary_prompt)
    record = (getattr(result, "extent", None) or {}).get(result.primary_prompt) or {}
    # The rule and the predominance, saved with the scene beside the numbers they explain.
    table.SetAttribute("ZeroShotILD.ExtentRule", str(record.get("rule", "")))
    table.SetAttribute("ZeroShotILD.Predominance", str(record.get("predominance", "")))
    return table


def _write_extent_chart(builder: _Builder, result, table):
    prompt = result.primary_prompt
    chart, series = _bar_chart(builder, result, table, EXTENT_SERIES, f"Extent of {prompt}",
                               y_column=prompt if prompt in (getattr(result, "extent", None) or {}) else "",
                               label_column="Zone", colour=(0.23, 0.44, 0.71), chart_role=EXTENT_CHART,
                               chart_name="extent chart", title=f"Extent of {prompt} by zone")
    chart.SetXAxisTitle("zone (see table)")
    chart.SetYAxisTitle("% of the zone's lung")
    chart.SetYAxisRangeAuto(True)
    chart.SetLegendVisibility(False)
    return chart, series


def pattern_labels(result) -> np.ndarray:
    """``patterns.label_volume(result)`` (what patterns.nii.gz holds), without importing torch.

    ``label_volume`` takes its slice step from ``ZeroShotILDLib.patches``, which imports torch (~1 GB,
    seconds) into Slicer's process; the same step comes from the torch-free ``geometry`` here.
    """
    from ZeroShotILDLib.geometry import slice_step_voxels
    from ZeroShotILDLib.patterns import paint_labels

    slab = slice_step_voxels(result.spacing_mm, result.settings.slice_step_mm)
    return paint_labels(result.patches, result.patterns.labels, result.lung_mask.shape, slab_voxels=slab,
                        lung_mask=result.lung_mask)


def heatmap_array(result) -> np.ndarray:
    """The first prompt's probabilities painted into the scan grid, as the command line's heatmap.nii.gz."""
    # geometry, not patches: Slicer's process must not import torch (patches does).
    from ZeroShotILDLib.geometry import slice_step_voxels
    from ZeroShotILDLib.heatmap import paint_heatmap

    slab = slice_step_voxels(result.spacing_mm, result.settings.slice_step_mm)
    probs = result.patch_probabilities[result.primary_prompt]
    # Limited to the lung, as the command line's: pleural boxes are scored, their chest-wall part is not lung.
    lung = result.lung_mask if result.lung_mask is not None and result.lung_mask.shape == tuple(result.shape_zyx) else None
    return paint_heatmap(result.patches, probs, tuple(result.shape_zyx), slab_voxels=slab, lung_mask=lung)


def probability_range(probabilities: np.ndarray) -> tuple[float, float]:
    """The probabilities' own min and max (0, 1 when there are none)."""
    p = np.asarray(probabilities, dtype=np.float64)
    if p.size == 0:
        return 0.0, 1.0
    return float(p.min()), float(p.max())


def display_range(probabilities, mode: str = RELATIVE_RANGE) -> tuple[float, float]:
    """Colour range of the heatmap for ``mode``.

    "relative" (default): the probabilities' own range. CheXzero-style scores often sit in a narrow
    band around 0.5; a fixed 0..1 range then paints every patch the same colour. "fixed 0-1" keeps
    colours comparable between prompts and scans. ``probabilities`` may be an array or (lo, hi).
    """
    if mode == FIXED_RANGE:
        return 0.0, 1.0
    if mode != RELATIVE_RANGE:
        raise ValueError(f"unknown heatmap range {mode!r}: use one of {', '.join(RANGE_MODES)}")
    lo, hi = probability_range(probabilities)
    if hi - lo < 1e-3:
        lo, hi = max(0.0, lo - 0.0005), min(1.0, hi + 0.0005)
    return lo, hi


def legend_label_format(lo: float, hi: float, labels: int = LEGEND_LABELS) -> str:
    """A printf format whose ``labels`` evenly spaced values from lo to hi all read differently.

    At least two decimals (probabilities); more when the range is narrow, e.g. 0.497-0.512 needs four.
    """
    values = np.linspace(lo, hi, max(2, int(labels)))
    for decimals in range(2, 9):
        texts = [f"{v:.{decimals}f}" for v in values]
        if len(set(texts)) == len(texts):
            return f"%.{decimals}f"
    return "%.3g"


def legend_title(prompt: str, mode: str) -> str:
    """The legend's title: the prompt and which colour range is shown."""
    return f"P({prompt}), {'own range' if mode == RELATIVE_RANGE else 'range 0-1'}"


def _write_heatmap(builder: _Builder, result, app_logic):
    prompt = result.primary_prompt
    heat = builder.node("vtkMRMLScalarVolumeNode", HEATMAP, f"{builder.input.GetName()} P({prompt})")
    heat.SetAttribute(PROMPT_ATTRIBUTE, prompt)
    values = heatmap_array(result)
    slicer.util.updateVolumeFromArray(heat, values)
    set_ijk_to_ras(heat, ijk_to_ras(builder.input))
    builder.follow_input_transform(heat)
    if heat.GetDisplayNode() is None:
        heat.CreateDefaultDisplayNodes()
    display = heat.GetDisplayNode()
    display.SetAndObserveColorNodeID(heatmap_color_node(builder.scene).GetID())
    display.AutoThresholdOff()
    display.SetThreshold(OUTSIDE_THRESHOLD, 1.0e6)
    display.ApplyThresholdOn()
    # Nearest-neighbour display keeps the patch boxes' edges where they are.
    display.SetInterpolate(0)
    lo, hi = probability_range(result.patch_probabilities[prompt])
    heat.SetAttribute(PROBABILITY_RANGE_ATTRIBUTE, f"{lo!r} {hi!r}")
    _color_legend(heat, prompt, app_logic)
    # A re-prompt or a new run keeps the range mode the user chose for this heatmap.
    set_heatmap_range(heat, heat.GetAttribute(RANGE_MODE_ATTRIBUTE) or RELATIVE_RANGE)
    return heat


def _legend_node(volume):
    for i in range(volume.GetNumberOfDisplayNodes()):
        node = volume.GetNthDisplayNode(i)
        if node is not None and node.IsA("vtkMRMLColorLegendDisplayNode"):
            return node
    return None


def set_heatmap_range(heatmap, mode: str) -> None:
    """Show ``heatmap`` over the colour range ``mode`` (``RANGE_MODES``): window, legend labels and title."""
    if heatmap is None or heatmap.GetDisplayNode() is None:
        return
    text = heatmap.GetAttribute(PROBABILITY_RANGE_ATTRIBUTE)
    own = tuple(float(v) for v in text.split()) if text else (0.0, 1.0)
    lo, hi = display_range(own, mode)
    heatmap.SetAttribute(RANGE_MODE_ATTRIBUTE, mode)
    display = heatmap.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(lo, hi)
    legend = _legend_node(heatmap)
    if legend is not None:
        legend.SetTitleText(legend_title(heatmap.GetAttribute(PROMPT_ATTRIBUTE) or "", mode))
        legend.SetNumberOfLabels(LEGEND_LABELS)
        legend.SetLabelFormat(legend_label_format(lo, hi, LEGEND_LABELS))


def heatmap_color_node(scene):
    """A colour table shared by all heatmaps, the same ramp as the command line's overlay.png."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLColorTableNode")
        if node.GetAttribute(ROLE_ATTRIBUTE) == COLORS:
            return node
    from ZeroShotILDLib.figures import colorize

    table = slicer.vtkMRMLColorTableNode()
    table.SetName(COLOR_NODE_NAME)
    table.SetTypeToUser()
    table.SetAttribute(ROLE_ATTRIBUTE, COLORS)
    n = 256
    table.SetNumberOfColors(n)
    rgb = colorize(np.linspace(0.0, 1.0, n)).astype(np.float64) / 255.0
    for i in range(n):
        table.SetColor(i, f"{i / (n - 1):.3f}", rgb[i, 0], rgb[i, 1], rgb[i, 2], 1.0)
    scene.AddNode(table)
    return table


def _color_legend(volume, prompt: str, app_logic) -> None:
    """Make sure ``volume`` has a visible colour legend (its title and labels: :func:`set_heatmap_range`)."""
    colors = app_logic.GetModuleLogic("Colors") if app_logic is not None else None
    legend = None
    if colors is not None:
        legend = colors.GetColorLegendDisplayNode(volume) or colors.AddDefaultColorLegendDisplayNode(volume)
    else:
        # No colours logic (bare scene): build the legend the way the logic does.
        legend = _legend_node(volume)
        if legend is None:
            legend = volume.GetScene().AddNewNodeByClass("vtkMRMLColorLegendDisplayNode")
            legend.SetAndObservePrimaryDisplayNode(volume.GetDisplayNode())
            volume.AddAndObserveDisplayNodeID(legend.GetID())
    if legend is not None:
        legend.SetVisibility(True)


def _patch_frame(input_volume) -> tuple[np.ndarray, np.ndarray]:
    """Unit axes (3x3, columns = i, j, k in RAS) of the volume and its spacing, as a proper rotation."""
    m = ijk_to_ras(input_volume)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    axes = m[:3, :3] / spacing
    if np.linalg.det(axes) < 0:
        # ROIs need a rotation; a mirrored volume frame gives the same box with its k axis flipped.
        axes = axes.copy()
        axes[:, 2] *= -1
    return axes, spacing


def patch_center_ras(input_volume, patches, index: int) -> np.ndarray:
    """RAS centre of candidate ``index``'s box, from the volume node's own geometry."""
    z, r, c = int(patches.slice_index[index]), int(patches.row0[index]), int(patches.col0[index])
    centre = [z, r + (patches.size_rows - 1) / 2.0, c + (patches.size_cols - 1) / 2.0]
    return index_to_ras(input_volume, centre)[0]


def _write_patch_rois(builder: _Builder, result) -> list:
    for node in _folder_nodes(builder.input, builder.folder):
        if node.GetAttribute(ROLE_ATTRIBUTE) == PATCH:
            remove_node(node)
    prompt = result.primary_prompt
    probs = result.patch_probabilities[prompt]
    p = result.patches
    axes, spacing = _patch_frame(builder.input)
    # Thickness of one slice: the outline shows on the patch's own slice and not on its neighbours.
    size_mm = (p.size_cols * spacing[0], p.size_rows * spacing[1], spacing[2])
    rois = []
    for rank, i in enumerate(result.ranked, start=1):
        i = int(i)
        roi = builder.new("vtkMRMLMarkupsROINode", PATCH, f"#{rank} {probs[i]:.3f}")
        roi.SetAttribute(RANK_ATTRIBUTE, str(rank))
        roi.SetAttribute(PROMPT_ATTRIBUTE, prompt)
        roi.SetDescription(f"P({prompt}) = {probs[i]:.4f}; slice {int(p.slice_index[i])}; candidate {i}; "
                           f"lung fraction {p.lung_fraction[i]:.2f}")
        frame = np.eye(4)
        frame[:3, :3] = axes
        frame[:3, 3] = patch_center_ras(builder.input, p, i)
        roi.SetAndObserveObjectToNodeMatrix(_vtk_matrix(frame))
        roi.SetSize(*size_mm)
        builder.follow_input_transform(roi)
        roi.SetLocked(True)
        if roi.GetDisplayNode() is None:
            roi.CreateDefaultDisplayNodes()
        display = roi.GetDisplayNode()
        display.SetFillVisibility(False)
        display.SetHandlesInteractive(False)
        display.SetSelectedColor(*OUTLINE_COLOR)
        display.SetColor(*OUTLINE_COLOR)
        display.SetTextScale(2.0)
        rois.append(roi)
    return rois


def _write_montage(builder: _Builder, result):
    montage = builder.node("vtkMRMLScalarVolumeNode", MONTAGE, f"{builder.input.GetName()} montage")
    image = np.ascontiguousarray(result.montage, dtype=np.uint8)
    slicer.util.updateVolumeFromArray(montage, image[np.newaxis])
    # LPS-like axes (like a PNG loaded into Slicer) so the image is upright in an axial view, placed
    # beside the scan (not at the RAS origin, where it would cover the patient).
    set_ijk_to_ras(montage, montage_ijk_to_ras(builder.input, image.shape))
    if montage.GetDisplayNode() is None:
        montage.CreateDefaultDisplayNodes()
    display = montage.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0, 255)
    montage.SetAttribute(PROMPT_ATTRIBUTE, result.primary_prompt)
    return montage


def montage_ijk_to_ras(input_volume, shape_yx) -> np.ndarray:
    """IJK-to-RAS of the montage: 1 mm pixels, upright in an axial view, beside the scan.

    Its left edge lies ``MONTAGE_GAP_MM`` to the patient's right of the scan's bounding box (lower
    R), vertically centred on the scan, on the scan's middle axial plane.
    """
    m = ijk_to_ras(input_volume)
    dims = input_volume.GetImageData().GetDimensions() if input_volume.GetImageData() is not None else (1, 1, 1)
    # Outer voxel faces (not centres), as Slicer's RAS bounds.
    faces = [(-0.5, d - 0.5) for d in dims]
    corners = np.array([[i, j, k, 1.0] for i in faces[0] for j in faces[1] for k in faces[2]])
    ras = corners @ m.T
    lo, hi = ras[:, :3].min(axis=0), ras[:, :3].max(axis=0)
    rows = int(shape_yx[0])
    out = np.diag([-1.0, -1.0, 1.0, 1.0])
    # Column i runs to lower R from the origin, row j to lower A; the origin is a pixel centre.
    out[:3, 3] = (lo[0] - MONTAGE_GAP_MM - 0.5, (lo[1] + hi[1]) / 2.0 + (rows - 1) / 2.0, (lo[2] + hi[2]) / 2.0)
    return out


def _fill_table(table_node, columns: list) -> None:
    """Replace the table's contents with ``columns``: (name, "string"|"double"|"int", values)."""
    was = table_node.StartModify()
    # Column names in the view's header, so that view row k is table row k (and the panel can read a
    # row's "rank" cell by its header).
    table_node.SetUseColumnTitleAsColumnHeader(True)
    table_node.RemoveAllColumns()
    for name, kind, values in columns:
        array = {"string": vtk.vtkStringArray, "double": vtk.vtkDoubleArray, "int": vtk.vtkIntArray}[kind]()
        array.SetName(name)
        for v in values:
            array.InsertNextValue(str(v) if kind == "string" else (float(v) if kind == "double" else int(v)))
        table_node.AddColumn(array)
    table_node.EndModify(was)


def _write_probability_table(builder: _Builder, result):
    table = builder.node("vtkMRMLTableNode", PROBABILITIES, f"{builder.input.GetName()} probabilities")
    findings = list(result.finding_probabilities.items())
    subtypes = list(result.subtype_probabilities.items())
    rows = [("finding", k, v) for k, v in findings] + [("subtype", k, v) for k, v in subtypes]
    _fill_table(table, [
        ("Index", "int", range(1, len(rows) + 1)),
        ("Kind", "string", [r[0] for r in rows]),
        ("Label", "string", [r[1] for r in rows]),
        ("Probability", "double", [r[2] for r in rows]),
    ])
    table.SetAttribute(NOTES_ATTRIBUTE, "\n".join(result_notes(result)))
    table.SetAttribute(PROMPT_ATTRIBUTE, result.primary_prompt)
    warning = result_warning(result)
    table.SetAttribute(WARNING_ATTRIBUTE, warning)
    if warning:
        table.SetName(f"{builder.input.GetName()} probabilities ({short_warning(warning)})")
    return table


def result_warning(result) -> str:
    """The result's one-line model warning ("" when its scores are meaningful)."""
    warning = getattr(result, "model_warning", "")
    if not warning and not result.model_meaningful:
        warning = f"model '{result.model_name}' is not meaningful for this scan"
    return warning


def short_warning(warning: str) -> str:
    """A few words for titles: "NOT MEANINGFUL: random weights" / "...: phantom-trained model"."""
    reason = "random weights" if "random weights" in warning else (
        "phantom-trained model on a real scan" if "phantom" in warning else "model not meant for this scan")
    return f"NOT MEANINGFUL: {reason}"


def result_notes(result) -> list:
    """The result's notes with the model warning first (saved with the scene on the probability table)."""
    notes = list(result.notes)
    warning = result_warning(result)
    if warning:
        notes = [warning] + [n for n in notes if n != warning]
    return notes


def _write_patch_table(builder: _Builder, result):
    """The top patches with the columns of the command line's patches.csv (centres from the volume node)."""
    table = builder.node("vtkMRMLTableNode", PATCH_TABLE, f"{builder.input.GetName()} top patches")
    p = result.patches
    ranked = [int(i) for i in result.ranked]
    centres = np.array([patch_center_ras(builder.input, p, i) for i in ranked]).reshape(-1, 3)
    columns = [
        ("rank", "int", range(1, len(ranked) + 1)),
        ("candidate", "int", ranked),
        ("slice_index", "int", [p.slice_index[i] for i in ranked]),
        ("x0", "int", [p.col0[i] for i in ranked]),
        ("y0", "int", [p.row0[i] for i in ranked]),
        ("x1", "int", [p.col0[i] + p.size_cols for i in ranked]),
        ("y1", "int", [p.row0[i] + p.size_rows for i in ranked]),
        ("center_r_mm", "double", centres[:, 0]),
        ("center_a_mm", "double", centres[:, 1]),
        ("center_s_mm", "double", centres[:, 2]),
        ("lung_fraction", "double", [p.lung_fraction[i] for i in ranked]),
    ]
    for prompt, probs in result.patch_probabilities.items():
        columns.append((f"p[{prompt}]", "double", [probs[i] for i in ranked]))
    _fill_table(table, columns)
    warning = result_warning(result)
    if warning:
        table.SetName(f"{builder.input.GetName()} top patches ({short_warning(warning)})")
    return table


def _bar_chart(builder: _Builder, result, table, series_role: str, series_name: str, *, y_column: str,
               label_column: str, colour, chart_role: str, chart_name: str, title: str):
    """A bar series over ``table``'s ``Index`` column in its own chart, titled with the input and any warning."""
    series = builder.node("vtkMRMLPlotSeriesNode", series_role, series_name)
    series.SetAndObserveTableNodeID(table.GetID())
    series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeBar)
    series.SetXColumnName("Index")
    series.SetYColumnName(y_column)
    series.SetLabelColumnName(label_column)
    series.SetColor(*colour)
    chart = builder.node("vtkMRMLPlotChartNode", chart_role, f"{builder.input.GetName()} {chart_name}")
    if chart.GetNumberOfPlotSeriesNodes() != 1 or chart.GetNthPlotSeriesNodeID(0) != series.GetID():
        chart.RemoveAllPlotSeriesNodeIDs()
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
    title = f"{title}: {builder.input.GetName()}"
    warning = result_warning(result)
    if warning:
        title += f" ({short_warning(warning)})"
    chart.SetTitle(title)
    return chart, series


def _write_chart(builder: _Builder, result, table):
    chart, series = _bar_chart(builder, result, table, SERIES, "Probability", y_column="Probability",
                               label_column="Label", colour=(0.98, 0.55, 0.04), chart_role=CHART,
                               chart_name="probabilities chart", title="P(finding) and P(subtype)")
    chart.SetXAxisTitle("finding / subtype (see table)")
    chart.SetYAxisTitle("probability")
    chart.SetYAxisRangeAuto(False)
    chart.SetYAxisRange(0.0, 1.0)
    chart.SetLegendVisibility(False)
    return chart, series


def remove_node(node) -> None:
    """Remove ``node`` with its display and storage nodes.

    ``vtkMRMLScene.RemoveNode`` leaves a displayable node's display nodes behind (the Slicer
    application's subject hierarchy plugins clean them up, a bare scene does not), and replaced
    outputs must not pile up orphans in either.
    """
    scene = node.GetScene() if node is not None else None
    if scene is None:
        return
    owned = []
    for getter, count in (("GetNthDisplayNode", "GetNumberOfDisplayNodes"), ("GetNthStorageNode", "GetNumberOfStorageNodes")):
        if hasattr(node, count):
            owned += [getattr(node, getter)(i) for i in range(getattr(node, count)())]
    # Its subject-hierarchy item too: without the application's plugins (slicer-core) the item stays
    # in the results folder pointing at the removed node.
    sh = _sh(scene)
    item = sh.GetItemByDataNode(node) if sh is not None else 0
    if item:
        sh.RemoveItem(item, False, False)
    scene.RemoveNode(node)
    for child in owned:
        if child is not None and child.GetScene() is scene:
            scene.RemoveNode(child)


def _vtk_matrix(array4: np.ndarray):
    return slicer.util.vtkMatrixFromArray(np.asarray(array4, dtype=np.float64))


# ----------------------------------------------------------------------------------------------
# Showing and saving
# ----------------------------------------------------------------------------------------------
def show_result(nodes: ResultNodes, input_volume, *, app_logic=None, opacity: float = 0.5,
                switch_layout: bool = True, jump: bool = True) -> None:
    """CT as background, heatmap as semi-transparent foreground, table and chart in their views.

    The opacity is set only in views where the heatmap was not shown yet: a view that already shows
    it keeps the opacity the user gave it there. ``switch_layout`` changes the view layout (the
    module does it on the first result only).
    """
    scene = input_volume.GetScene()
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        heatmap_id = nodes.heatmap.GetID() if nodes.heatmap else None
        already = heatmap_id is not None and composite.GetForegroundVolumeID() == heatmap_id
        composite.SetBackgroundVolumeID(input_volume.GetID())
        composite.SetForegroundVolumeID(heatmap_id)
        if not already:
            composite.SetForegroundOpacity(float(opacity))
    legend = _legend_node(nodes.heatmap) if nodes.heatmap is not None else None
    if legend is not None:
        # Slice views decide whether to draw a volume's legend when the legend node changes, and the
        # layers were set after it was made: without this the legend stays hidden (seen rendering
        # the scene with Slicer's displayable managers).
        legend.Modified()
    if switch_layout:
        layout = scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
        if layout is not None:
            layout.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpPlotTableView)
    if nodes.probabilities is not None and nodes.chart is not None:
        show_table_and_chart(nodes.probabilities, nodes.chart, app_logic)
    if jump and nodes.patch_rois:
        jump_to_patch(nodes.patch_rois[0])


def show_table_and_chart(table, chart, app_logic) -> None:
    """Make ``table`` and ``chart`` the ones the layout's table and plot views show."""
    selection = app_logic.GetSelectionNode() if app_logic is not None else None
    if selection is None:
        return
    selection.SetActiveTableID(table.GetID() if table is not None else None)
    selection.SetActivePlotChartID(chart.GetID() if chart is not None else None)
    app_logic.PropagateTableSelection()
    app_logic.PropagatePlotChartSelection()


def rank_in_patch_table(patch_table, row: int) -> Optional[int]:
    """The rank held in ``row`` of the top-patches table node (None for a row that is not a patch)."""
    if patch_table is None or row is None:
        return None
    table = patch_table.GetTable()
    if not 0 <= int(row) < table.GetNumberOfRows():
        return None
    return int(table.GetValueByName(int(row), "rank").ToInt())


def rank_from_table_cells(headers, cells) -> Optional[int]:
    """The rank shown in one row of the panel's top-patches table, from its column headers and cell texts.

    The panel reads these from the view's (sorted) model: Slicer does not wrap the table model's
    row mapping for Python, and the row's own "rank" cell needs none.
    """
    headers = [str(h).strip() for h in headers]
    if "rank" not in headers:
        return None
    k = headers.index("rank")
    if k >= len(cells):
        return None
    try:
        return int(float(str(cells[k]).strip()))
    except ValueError:
        return None


def set_heatmap_opacity(scene, heatmap, opacity: float) -> None:
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        if heatmap is not None and composite.GetForegroundVolumeID() == heatmap.GetID():
            composite.SetForegroundOpacity(float(opacity))


def jump_to_patch(roi) -> None:
    """Centre every slice view on a patch (world coordinates, so parent transforms are honoured)."""
    centre = [0.0, 0.0, 0.0]
    roi.GetCenterWorld(centre)
    slicer.vtkMRMLSliceNode.JumpAllSlices(roi.GetScene(), *centre, slicer.vtkMRMLSliceNode.CenteredJumpSlice)


def montage_image(montage_node) -> np.ndarray:
    """The montage node's pixels as a uint8 (S, S) image, row 0 at the top."""
    return np.array(slicer.util.arrayFromVolume(montage_node)[0], dtype=np.uint8)


def default_montage_path(montage_node) -> Path:
    """``<scene folder>/<node name>.png``: next to the saved scene (or the current folder if unsaved)."""
    root = montage_node.GetScene().GetRootDirectory() or "."
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in montage_node.GetName()).strip("_")
    return Path(root).expanduser() / f"{safe or 'montage'}.png"


def save_montage(montage_node, path: Optional[str] = None) -> Path:
    """Write the montage as an 8-bit PNG (to :func:`default_montage_path` when no path is given)."""
    from PIL import Image

    out = Path(path).expanduser() if path else default_montage_path(montage_node)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(montage_image(montage_node)).save(out)
    return out


def default_report_path(input_volume) -> Path:
    """``<scene folder>/<volume name> report.html``: next to the saved scene (or the current folder)."""
    root = input_volume.GetScene().GetRootDirectory() or "."
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in input_volume.GetName()).strip("_")
    return Path(root).expanduser() / f"{safe or 'scan'}_report.html"


def save_report(result, input_volume, path, *, scan=None) -> Path:
    """Write the one-page ``report.html`` of ``result`` (the command line's report) to ``path``.

    ``scan``: the engine's ``Scan`` the result was computed on; when the voxels were analysed in the
    worker process and are not kept here, it is rebuilt from ``input_volume`` (same conversion as the
    worker's input) just for the report's overlay pictures. Written atomically: a failure leaves no
    half-written file.
    """
    from ZeroShotILDLib.atomic_files import atomic_path
    from ZeroShotILDLib.errors import InputError
    from ZeroShotILDLib.report import write_report

    from .volumes import scan_from_volume_node

    if result is None:
        raise InputError("no result to report: press Apply first")
    out = Path(path).expanduser()
    if out.is_dir():
        raise InputError(f"'{out}' is a folder: give a file name for the report, such as report.html")
    if not out.parent.is_dir():
        raise InputError(f"folder '{out.parent}' does not exist: choose an existing folder for the report")
    if scan is None:
        scan = scan_from_volume_node(input_volume)
    if tuple(scan.hu.shape) != tuple(result.shape_zyx):
        raise InputError(f"volume '{input_volume.GetName()}' changed size since it was analysed: press Apply again")
    pm = getattr(result, "patterns", None)
    pattern_extent = {n: pm.extent[n] for n in pm.names if n in pm.extent} if pm is not None else None
    with atomic_path(out) as tmp:
        write_report(result, scan, tmp, heatmap_array(result), extent=result.extent or None,
                     pattern_extent=pattern_extent or None)
    return out
