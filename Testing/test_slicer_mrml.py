"""The Slicer module's MRML side on a real vtkMRMLScene (slicer-core), without the Slicer application.

A phantom CT is put into a scalar volume node with an oblique, mirrored geometry, analysed with the
tiny random model through the module's session, and the resulting nodes are checked against the
engine's own outputs (patches.csv, heatmap.nii.gz, AnalysisResult).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, tiny_settings

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' package here is not slicer-core", allow_module_level=True)

sys.path.insert(0, str(REPO / "ZeroShotILD"))

from ZeroShotILDLib.errors import Cancelled, InputError  # noqa: E402
from ZeroShotILDLib.settings import AnalysisSettings, LungMaskSettings  # noqa: E402
from ZeroShotILDMRML import catalog, dependencies, mrml_results, parameters, runner, volumes  # noqa: E402
from ZeroShotILDMRML.headless import add_ct_volume, ijk_to_ras_from_lps, make_scene  # noqa: E402
from ZeroShotILDMRML.session import AnalysisSession, reprompt_changes  # noqa: E402

TOP_K = 6


def _rotation_z(degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    return np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])


#: An oblique (rotated about z) and mirrored (flipped y) LPS direction, so that any mix-up of axes,
#: LPS/RAS signs or row/column order in the geometry conversion moves the patches.
OBLIQUE_DIRECTION = tuple((_rotation_z(20.0) @ np.diag([1.0, -1.0, 1.0])).ravel())
ORIGIN_MM = (12.5, -40.0, 310.0)


@pytest.fixture(scope="module")
def analysed(small_phantom, tmp_path_factory):
    """(headless scene, input volume node, session, nodes) after a full analysis with tiny-random."""
    headless = make_scene()
    volume = add_ct_volume(headless.scene, small_phantom.hu, small_phantom.spacing_mm, ORIGIN_MM,
                           OBLIQUE_DIRECTION, "Phantom CT")
    # Exact scoring: every candidate goes through the image encoder, which the re-prompt test counts on.
    session = AnalysisSession(volume, tiny_settings(top_k=TOP_K, slice_step_mm=10.0, prompts=["honeycombing"],
                                                    scoring_mode="exact"))
    session.compute()
    nodes = session.apply(app_logic=headless.app_logic)
    return headless, volume, session, nodes


@pytest.fixture(scope="module")
def cli_outputs(analysed, tmp_path_factory):
    """The command line's output folder for the same result (patches.csv, heatmap.nii.gz, ...)."""
    from ZeroShotILDLib.outputs import write_outputs

    _, _, session, _ = analysed
    return write_outputs(session.result, session.scan, tmp_path_factory.mktemp("cli") / "out")


def _ijk_to_ras(node) -> np.ndarray:
    return volumes.ijk_to_ras(node)


# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------
def test_volume_geometry_round_trips_through_the_node():
    headless = make_scene()
    hu = np.full((4, 5, 6), -1000, np.int16)
    hu[:, 2:4, 2:5] = 40
    spacing = (0.7, 0.8, 2.5)
    node = add_ct_volume(headless.scene, hu, spacing, ORIGIN_MM, OBLIQUE_DIRECTION)
    got_spacing, got_origin, got_direction = volumes.volume_geometry(node)
    np.testing.assert_allclose(got_spacing, spacing, atol=1e-9)
    np.testing.assert_allclose(got_origin, ORIGIN_MM, atol=1e-9)
    np.testing.assert_allclose(got_direction, OBLIQUE_DIRECTION, atol=1e-9)

    from ZeroShotILDLib.geometry import index_to_ras

    zyx = np.array([[0, 0, 0], [3, 4, 5], [1.5, 2.25, 0.5]])
    np.testing.assert_allclose(volumes.index_to_ras(node, zyx), index_to_ras(zyx, spacing, ORIGIN_MM, OBLIQUE_DIRECTION),
                               atol=1e-9)
    scan = volumes.scan_from_volume_node(node)
    assert scan.hu.dtype == np.int16 and scan.hu.shape == hu.shape
    np.testing.assert_array_equal(scan.hu, hu)
    assert scan.hu is not slicer.util.arrayFromVolume(node)


def test_refuses_labelmaps_and_colour_volumes():
    headless = make_scene()
    label = headless.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "mask")
    slicer.util.updateVolumeFromArray(label, np.ones((4, 20, 20), np.uint8))
    with pytest.raises(InputError, match="labelmap"):
        volumes.scan_from_volume_node(label)
    rgb = headless.scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "photo")
    slicer.util.updateVolumeFromArray(rgb, np.zeros((1, 20, 20, 3), np.uint8))
    with pytest.raises(InputError, match="components"):
        volumes.scan_from_volume_node(rgb)
    with pytest.raises(InputError, match="no input volume"):
        volumes.check_ct_volume(None)


# ----------------------------------------------------------------------------------------------
# Result nodes
# ----------------------------------------------------------------------------------------------
def test_results_are_grouped_under_the_input(analysed):
    headless, volume, _, nodes = analysed
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(headless.scene)
    folder = nodes.folder_item
    assert sh.GetItemParent(folder) == sh.GetItemByDataNode(volume)
    assert sh.GetItemName(folder) == mrml_results.FOLDER_NAME
    for node in nodes.nodes():
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == folder, node.GetName()
    found = mrml_results.find_result_nodes(volume)
    assert found.heatmap is nodes.heatmap and found.lungs is nodes.lungs
    assert [n.GetID() for n in found.patch_rois] == [n.GetID() for n in nodes.patch_rois]


def test_lungs_segmentation_matches_the_engine_mask(analysed):
    headless, volume, session, nodes = analysed
    seg = nodes.lungs
    assert seg.GetName() == "Lungs"
    assert seg.GetSegmentation().GetNumberOfSegments() == 1
    assert seg.GetSegmentation().GetNthSegment(0).GetName() == "Lungs"
    labelmap = headless.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    import vtk

    ids = vtk.vtkStringArray()
    seg.GetSegmentation().GetSegmentIDs(ids)
    slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(seg, ids, labelmap, volume)
    exported = slicer.util.arrayFromVolume(labelmap) > 0
    headless.scene.RemoveNode(labelmap)
    assert exported.shape == session.result.lung_mask.shape
    np.testing.assert_array_equal(exported, session.result.lung_mask)
    assert session.result.lung_mask.sum() > 1000
    # Reference geometry is the input's grid.
    reference = seg.GetSegmentation().GetConversionParameter("Reference image geometry")
    values = [float(v) for v in reference.split(";")[:12]]
    expected = _ijk_to_ras(volume)[:3, :].ravel()
    np.testing.assert_allclose(values, expected, atol=1e-6)


def test_lungs_have_a_see_through_surface_for_3d_on_the_oblique_mirrored_grid(analysed):
    """The 3-D view needs a closed surface (a labelmap alone draws nothing there); made coarse and
    cheap (mrml_results.lung_surface), it must still sit on the lungs in any volume orientation."""
    from scipy import ndimage
    from vtk.util.numpy_support import vtk_to_numpy

    _, volume, session, nodes = analysed
    segmentation = nodes.lungs.GetSegmentation()
    closed = slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName()
    assert segmentation.ContainsRepresentation(closed)
    assert nodes.lungs.GetDisplayNode().GetPreferredDisplayRepresentationName3D() == closed
    assert 0 < nodes.lungs.GetDisplayNode().GetOpacity3D() < 1
    surface = segmentation.GetNthSegment(0).GetRepresentation(closed)
    points = vtk_to_numpy(surface.GetPoints().GetData())
    ras_to_ijk = np.linalg.inv(_ijk_to_ras(volume))
    kji = (np.c_[points, np.ones(len(points))] @ ras_to_ijk.T)[:, 2::-1]
    mask = session.result.lung_mask.astype(bool)
    spacing = np.array(volume.GetSpacing())[::-1]  # k, j, i
    step = np.maximum(1, np.round(mrml_results.LUNG_SURFACE_MM / spacing))
    # Every surface point lies within about one coarse step of a lung voxel ...
    outside = ndimage.distance_transform_edt(~mask, sampling=1.0 / step)
    index = np.clip(np.round(kji).astype(int), 0, np.array(mask.shape) - 1)
    assert np.quantile(outside[tuple(index.T)], 0.99) <= 1.5
    # ... and the surface spans the lungs in every direction.
    lung = np.argwhere(mask)
    np.testing.assert_allclose(kji.min(axis=0), lung.min(axis=0), atol=float(step.max()) + 1)
    np.testing.assert_allclose(kji.max(axis=0), lung.max(axis=0), atol=float(step.max()) + 1)


def test_heatmap_has_the_input_geometry_and_the_cli_values(analysed, cli_outputs):
    import SimpleITK as sitk

    _, volume, session, nodes = analysed
    heat = nodes.heatmap
    assert heat.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
    np.testing.assert_allclose(_ijk_to_ras(heat), _ijk_to_ras(volume), atol=1e-9)
    values = slicer.util.arrayFromVolume(heat)
    image = sitk.ReadImage(str(cli_outputs / "heatmap.nii.gz"))
    np.testing.assert_allclose(values, sitk.GetArrayFromImage(image), atol=1e-7)
    # The CLI file's geometry, converted to RAS, is the node's geometry too.
    cli_matrix = ijk_to_ras_from_lps(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    np.testing.assert_allclose(cli_matrix, _ijk_to_ras(heat), atol=1e-6)
    # Every candidate's box holds at least its own probability on its lung voxels (overlaps keep
    # the maximum) and nothing outside the lung, as the command line's heatmap.
    probs = session.result.patch_probabilities["honeycombing"]
    p = session.result.patches
    lung = session.result.lung_mask.astype(bool)
    for i in range(len(p)):
        z, r, c = int(p.slice_index[i]), int(p.row0[i]), int(p.col0[i])
        box, inside = values[z, r:r + p.size_rows, c:c + p.size_cols], lung[z, r:r + p.size_rows, c:c + p.size_cols]
        assert box[inside].min() >= np.float32(probs[i]) - 1e-7 and not box[~inside].any()
    assert float(values.max()) == pytest.approx(float(probs.max()), abs=1e-7)


def test_heatmap_display_is_a_coloured_thresholded_overlay_with_a_legend(analysed):
    _, _, session, nodes = analysed
    display = nodes.heatmap.GetDisplayNode()
    color = display.GetColorNode()
    assert color.GetName() == mrml_results.COLOR_NODE_NAME and color.GetNumberOfColors() == 256
    probs = session.result.patch_probabilities["honeycombing"]
    lo, hi = mrml_results.display_range(probs)
    assert display.GetWindowLevelMin() == pytest.approx(lo) and display.GetWindowLevelMax() == pytest.approx(hi)
    assert lo <= probs.min() and probs.max() <= hi
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(mrml_results.OUTSIDE_THRESHOLD)
    legends = [nodes.heatmap.GetNthDisplayNode(i) for i in range(nodes.heatmap.GetNumberOfDisplayNodes())
               if nodes.heatmap.GetNthDisplayNode(i).IsA("vtkMRMLColorLegendDisplayNode")]
    assert len(legends) == 1 and legends[0].GetTitleText() == "P(honeycombing), own range"
    legend = legends[0]
    # Honest default view (issue 23): the legend is shown, and the heatmap covers only the lung
    # (0 elsewhere, below the display threshold, so transparent), like the command line's overlay.png.
    assert legend.GetVisibility() and legend.GetPrimaryDisplayNode() is display
    values = slicer.util.arrayFromVolume(nodes.heatmap)
    lung = session.result.lung_mask.astype(bool)
    assert values.shape == lung.shape and values[lung].max() > 0
    assert not values[~lung].any() and mrml_results.OUTSIDE_THRESHOLD > 0
    lungs = nodes.lungs.GetDisplayNode()
    assert lungs.GetOpacity2DFill() == 0.0 and lungs.GetOpacity2DOutline() > 0
    # The legend's labels are all different (Slicer writes NumberOfLabels values from lo to hi).
    labels = [legend.GetLabelFormat() % v for v in np.linspace(lo, hi, legend.GetNumberOfLabels())]
    assert len(set(labels)) == len(labels) == mrml_results.LEGEND_LABELS, labels

    # The fixed 0-1 range, and back; the title says which one is shown.
    try:
        mrml_results.set_heatmap_range(nodes.heatmap, mrml_results.FIXED_RANGE)
        assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0.0, 1.0)
        assert legend.GetTitleText() == "P(honeycombing), range 0-1" and legend.GetLabelFormat() == "%.2f"
        with pytest.raises(ValueError, match="heatmap range"):
            mrml_results.set_heatmap_range(nodes.heatmap, "absolute")
    finally:
        mrml_results.set_heatmap_range(nodes.heatmap, mrml_results.RELATIVE_RANGE)
    assert display.GetWindowLevelMin() == pytest.approx(lo) and legend.GetTitleText().endswith("own range")


def test_legend_labels_are_distinct_for_narrow_probability_ranges():
    # chest_crop_b with tiny-random, exact, slice step 6 mm: P(honeycombing) spans 0.49832-0.51115, where
    # "%.2f" over five labels read 0.50, 0.50, 0.50, 0.51, 0.51 (measured; phantom-demo: 0.49716-0.50161).
    lo, hi = 0.49832, 0.51115
    assert [f"{v:.2f}" for v in np.linspace(lo, hi, 5)] == ["0.50", "0.50", "0.50", "0.51", "0.51"]
    fmt = mrml_results.legend_label_format(lo, hi)
    assert fmt == "%.3f" and len({fmt % v for v in np.linspace(lo, hi, 5)}) == 5
    assert mrml_results.legend_label_format(0.0, 1.0) == "%.2f"  # never fewer than two decimals
    assert mrml_results.legend_label_format(0.5001, 0.5009) == "%.4f"
    for lo, hi in [(0.5, 0.5), (0.49999, 0.50001), (0.1, 0.9)]:
        a, b = mrml_results.display_range(np.array([lo, hi]))
        fmt = mrml_results.legend_label_format(a, b)
        assert len({fmt % v for v in np.linspace(a, b, 5)}) == 5, (lo, hi, fmt)
    assert mrml_results.display_range(np.array([0.3, 0.4]), mrml_results.FIXED_RANGE) == (0.0, 1.0)


def _csv_rows(path: Path) -> list:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_patch_markups_sit_at_the_engine_and_cli_patch_centres(analysed, cli_outputs):
    _, volume, session, nodes = analysed
    result = session.result
    probs = result.patch_probabilities["honeycombing"]
    rows = _csv_rows(cli_outputs / "patches.csv")
    assert len(nodes.patch_rois) == TOP_K
    spacing, _, _ = volumes.volume_geometry(volume)
    for rank, (roi, i) in enumerate(zip(nodes.patch_rois, result.ranked), start=1):
        centre = np.array(roi.GetCenter())
        np.testing.assert_allclose(centre, result.patches.center_ras_mm[i], atol=1e-6)
        row = rows[rank - 1]
        assert int(row["rank"]) == rank and int(row["candidate"]) == int(i)
        cli_centre = [float(row["center_r_mm"]), float(row["center_a_mm"]), float(row["center_s_mm"])]
        np.testing.assert_allclose(centre, cli_centre, atol=6e-4)
        assert roi.GetName() == f"#{rank} {probs[i]:.3f}"
        assert roi.GetLocked()
        np.testing.assert_allclose(roi.GetSize(), (result.patches.size_cols * spacing[0],
                                                   result.patches.size_rows * spacing[1], spacing[2]), atol=1e-9)
        # The outline lies in the patch's own slice: every corner maps back to index z of the box.
        from ZeroShotILDMRML.figure import roi_outline_ras

        corners, _, _ = roi_outline_ras(roi)
        ras_to_ijk = np.linalg.inv(_ijk_to_ras(volume))
        ijk = (np.c_[corners, np.ones(4)] @ ras_to_ijk.T)[:, :3]
        np.testing.assert_allclose(ijk[:, 2], result.patches.slice_index[i], atol=1e-6)
        r0, c0 = result.patches.row0[i], result.patches.col0[i]
        np.testing.assert_allclose(sorted(set(np.round(ijk[:, 0], 6))), [c0 - 0.5, c0 + result.patches.size_cols - 0.5])
        np.testing.assert_allclose(sorted(set(np.round(ijk[:, 1], 6))), [r0 - 0.5, r0 + result.patches.size_rows - 0.5])


def test_tables_and_chart_hold_the_engine_probabilities(analysed, cli_outputs):
    _, _, session, nodes = analysed
    result = session.result
    table = nodes.probabilities.GetTable()
    expected = [("finding", k, v) for k, v in result.finding_probabilities.items()] + \
               [("subtype", k, v) for k, v in result.subtype_probabilities.items()]
    assert table.GetNumberOfRows() == len(expected) == 1 + 3
    for row, (kind, label, value) in enumerate(expected):
        assert table.GetValueByName(row, "Kind").ToString() == kind
        assert table.GetValueByName(row, "Label").ToString() == label
        assert table.GetValueByName(row, "Probability").ToDouble() == pytest.approx(value, abs=1e-12)
    summary = json.loads((cli_outputs / "result.json").read_text(encoding="utf-8"))
    assert summary["probabilities"]["honeycombing"] == pytest.approx(table.GetValueByName(0, "Probability").ToDouble())
    patches = nodes.patch_table.GetTable()
    assert patches.GetNumberOfRows() == TOP_K
    rows = _csv_rows(cli_outputs / "patches.csv")
    for k in range(TOP_K):
        for column in ("rank", "candidate", "slice_index", "x0", "y0", "x1", "y1"):
            assert patches.GetValueByName(k, column).ToInt() == int(rows[k][column])
        assert patches.GetValueByName(k, "p[honeycombing]").ToDouble() == pytest.approx(float(rows[k]["p[honeycombing]"]), abs=1e-6)
    series = nodes.series
    assert series.GetPlotType() == slicer.vtkMRMLPlotSeriesNode.PlotTypeBar
    assert series.GetTableNodeID() == nodes.probabilities.GetID() and series.GetYColumnName() == "Probability"
    assert nodes.chart.GetPlotSeriesNodeID() == series.GetID()
    assert "random weights" in nodes.chart.GetTitle()  # tiny-random is flagged as meaningless


def _ras_bounds(node) -> np.ndarray:
    bounds = [0.0] * 6
    node.GetRASBounds(bounds)
    return np.array(bounds).reshape(3, 2)


def test_montage_sits_beside_the_scan_not_at_the_origin(analysed):
    _, volume, session, nodes = analysed
    scan, montage = _ras_bounds(volume), _ras_bounds(nodes.montage)
    size = session.result.montage.shape[0]
    # Beside the scan, to the patient's right (lower R), the gap in between; 1 mm pixels.
    assert montage[0, 1] == pytest.approx(scan[0, 0] - mrml_results.MONTAGE_GAP_MM, abs=1e-6)
    assert montage[0, 1] - montage[0, 0] == pytest.approx(size, abs=1.01)
    # Centred on the scan in A and on its middle axial plane, so it shows next to the CT.
    assert montage[1].mean() == pytest.approx(scan[1].mean(), abs=1.0)
    assert scan[2, 0] <= montage[2].mean() <= scan[2, 1]
    assert not np.allclose(mrml_results.montage_ijk_to_ras(volume, (size, size))[:3, 3], 0.0)
    # Still upright in an axial view: column index runs right-to-left, row index top-to-bottom.
    np.testing.assert_allclose(_ijk_to_ras(nodes.montage)[:3, :3], np.diag([-1.0, -1.0, 1.0]))


def test_montage_node_and_png(analysed, tmp_path):
    from PIL import Image

    _, _, session, nodes = analysed
    image = mrml_results.montage_image(nodes.montage)
    np.testing.assert_array_equal(image, session.result.montage)
    path = mrml_results.save_montage(nodes.montage, str(tmp_path / "m.png"))
    np.testing.assert_array_equal(np.asarray(Image.open(path)), session.result.montage)
    headless, _, _, _ = analysed
    headless.scene.SetRootDirectory(str(tmp_path / "scene"))
    assert mrml_results.default_montage_path(nodes.montage) == tmp_path / "scene" / "Phantom_CT_montage.png"


def test_show_result_sets_layers_views_and_jumps_to_the_best_patch(analysed):
    headless, volume, _, nodes = analysed
    scene = headless.scene
    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    slice_node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    slice_node.SetLayoutName("Red")
    slice_node.SetOrientationToAxial()
    layout = scene.AddNewNodeByClass("vtkMRMLLayoutNode")
    try:
        mrml_results.show_result(nodes, volume, app_logic=headless.app_logic, opacity=0.4)
        assert composite.GetBackgroundVolumeID() == volume.GetID()
        assert composite.GetForegroundVolumeID() == nodes.heatmap.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.4)
        assert layout.GetViewArrangement() == slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpPlotTableView
        selection = headless.app_logic.GetSelectionNode()
        assert selection.GetActiveTableID() == nodes.probabilities.GetID()
        assert selection.GetActivePlotChartID() == nodes.chart.GetID()
        # The axial slice moved to the best patch's S coordinate.
        offset = slicer.util.arrayFromVTKMatrix(slice_node.GetSliceToRAS())[2, 3]
        assert offset == pytest.approx(nodes.patch_rois[0].GetCenter()[2], abs=1e-6)
        mrml_results.set_heatmap_opacity(scene, nodes.heatmap, 0.8)
        assert composite.GetForegroundOpacity() == pytest.approx(0.8)
        # Showing the result again (a new Apply or re-prompt) keeps the user's opacity and layout.
        composite.SetForegroundOpacity(0.15)
        layout.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutOneUpRedSliceView)
        mrml_results.show_result(nodes, volume, app_logic=headless.app_logic, opacity=0.4, switch_layout=False)
        assert composite.GetForegroundOpacity() == pytest.approx(0.15)
        assert layout.GetViewArrangement() == slicer.vtkMRMLLayoutNode.SlicerLayoutOneUpRedSliceView
        # A view that did not show the heatmap yet gets the module's opacity.
        composite.SetForegroundVolumeID(None)
        mrml_results.show_result(nodes, volume, app_logic=headless.app_logic, opacity=0.4, switch_layout=False)
        assert composite.GetForegroundOpacity() == pytest.approx(0.4)
        # A click on a row of the panel's patch table jumps to that row's patch.
        rank = mrml_results.rank_in_patch_table(nodes.patch_table, 2)
        assert rank == 3 and mrml_results.rank_in_patch_table(nodes.patch_table, TOP_K) is None
        # The panel reads the rank from the view's cells: column names are the view's headers, so
        # view row k is table row k, whatever the table's column order.
        assert nodes.patch_table.GetUseColumnTitleAsColumnHeader()
        table = nodes.patch_table.GetTable()
        headers = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
        cells = [table.GetValue(2, c).ToString() for c in range(table.GetNumberOfColumns())]
        assert mrml_results.rank_from_table_cells(headers, cells) == 3
        assert mrml_results.rank_from_table_cells(headers[::-1], cells[::-1]) == 3
        assert mrml_results.rank_from_table_cells(["A", "B"], ["3", "4"]) is None
        assert mrml_results.rank_from_table_cells(headers, headers) is None  # the names row of an untitled table
        mrml_results.jump_to_patch(nodes.patch_rois[rank - 1])
        offset = slicer.util.arrayFromVTKMatrix(slice_node.GetSliceToRAS())[2, 3]
        assert offset == pytest.approx(nodes.patch_rois[2].GetCenter()[2], abs=1e-6)
    finally:
        for node in (composite, slice_node, layout):
            scene.RemoveNode(node)


def test_rendered_figure_shows_the_ct_heatmap_and_outlines(analysed, tmp_path):
    from PIL import Image

    from ZeroShotILDMRML.figure import render_slice_figure

    headless, volume, _, nodes = analysed
    before = headless.scene.GetNumberOfNodes()
    path = render_slice_figure(nodes, volume, tmp_path / "fig.png", app_logic=headless.app_logic, size_px=(256, 256))
    assert headless.scene.GetNumberOfNodes() == before  # temporary slice/label nodes removed
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    cyan = (rgb[..., 0] < 60) & (rgb[..., 1] > 200) & (rgb[..., 2] > 200)
    assert cyan.sum() > 50  # patch outlines
    grey = (np.abs(rgb[..., 0] - rgb[..., 1]) < 4) & (np.abs(rgb[..., 1] - rgb[..., 2]) < 4) & (rgb[..., 0] > 150)
    assert grey.sum() > 500  # CT soft tissue/bone in the lung window
    assert rgb.shape[0] > 256 and rgb.shape[1] > 256  # caption above, legend to the right

    def warm_pixels(rgb):
        view = rgb[-256:, :256]  # the slice itself, without caption and legend
        return int(((view[..., 0] > 120) & (view[..., 0] - view[..., 2] > 60)).sum())

    warm = warm_pixels(rgb)
    assert warm > 100  # heatmap colours blended over the lungs
    # Without the heatmap layer the same slice has no warm colours: they come from the heatmap.
    bare = dataclasses.replace(nodes, heatmap=None)
    path = render_slice_figure(bare, volume, tmp_path / "bare.png", app_logic=headless.app_logic, size_px=(256, 256))
    assert warm_pixels(np.asarray(Image.open(path).convert("RGB")).astype(int)) < warm / 20


def test_phantom_evidence_and_model_warning_rules(small_phantom):
    """Whether a volume is a phantom is read from its voxels (the generator's signature), never from its name."""
    from ZeroShotILDLib.results import model_warning

    assert "random weights" in model_warning("tiny-random", random_weights=True, trained_on="", is_phantom=True)
    assert "phantoms only" in model_warning("phantom-demo", random_weights=False, trained_on="phantoms",
                                            is_phantom=False)
    assert model_warning("phantom-demo", random_weights=False, trained_on="phantoms", is_phantom=True) == ""
    assert model_warning("chexzero", random_weights=False, trained_on="", is_phantom=False) == ""
    # The panel's warning before Apply follows the same rule, from the model list and the volume's voxels.
    real = _without_signature(small_phantom.hu)
    assert "phantoms only" in catalog.input_warning("phantom-demo", real)
    assert "phantoms only" in catalog.input_warning("phantom-demo")  # no voxels: counted as a real scan
    assert catalog.input_warning("phantom-demo", small_phantom.hu) == ""
    assert "random weights" in catalog.input_warning("tiny-random", small_phantom.hu)
    assert catalog.input_warning("chexzero", real) == ""
    assert "phantoms only" in catalog.describe_model("phantom-demo")


def _without_signature(hu):
    """The phantom's voxels with the generator's signature overwritten: content that is not a phantom's."""
    from ZeroShotILDLib.phantom_signature import ROW

    out = np.array(hu, copy=True)
    out[:, ROW, :] = -1000
    return out


def test_phantom_model_on_a_real_scan_is_flagged_in_panel_tables_and_notes(small_phantom):
    headless = make_scene()
    settings = tiny_settings(model="phantom-demo", top_k=3, slice_step_mm=20.0)
    seen = {}
    # Names chosen to mislead: the real-looking name holds the phantom, the phantom-looking one the other content.
    for name, hu in (("Phantom CT", _without_signature(small_phantom.hu)), ("chest_crop_b", small_phantom.hu)):
        volume = add_ct_volume(headless.scene, hu, small_phantom.spacing_mm, small_phantom.origin_mm,
                               small_phantom.direction, name)
        session = AnalysisSession(volume, settings)
        session.compute()
        nodes = session.apply(app_logic=headless.app_logic)
        seen[name] = (session.result, nodes)
    result, nodes = seen["Phantom CT"]
    assert not result.model_meaningful and "trained on synthetic phantoms only" in result.model_warning
    assert result.notes[-1] == result.model_warning
    flag = "NOT MEANINGFUL: phantom-trained model on a real scan"
    for node in (nodes.probabilities, nodes.patch_table, nodes.chart):
        title = node.GetTitle() if node.IsA("vtkMRMLPlotChartNode") else node.GetName()
        assert flag in title, title
    # Saved with the scene: the table's notes start with the warning, and the warning has its own attribute.
    assert nodes.probabilities.GetAttribute(mrml_results.NOTES_ATTRIBUTE).splitlines()[0] == result.model_warning
    assert nodes.probabilities.GetAttribute(mrml_results.WARNING_ATTRIBUTE) == result.model_warning
    result, nodes = seen["chest_crop_b"]
    assert result.model_meaningful and result.model_warning == ""
    assert "NOT MEANINGFUL" not in nodes.chart.GetTitle() + nodes.probabilities.GetName() + nodes.patch_table.GetName()
    assert nodes.probabilities.GetAttribute(mrml_results.WARNING_ATTRIBUTE) == ""


# ----------------------------------------------------------------------------------------------
# Re-prompt, re-run, cancel
# ----------------------------------------------------------------------------------------------
def test_reprompt_updates_nodes_without_encoding_patches_again(analysed):
    headless, volume, session, nodes = analysed
    scene = headless.scene
    encoder = session.analyzer.encoder
    before = encoder.images_encoded
    assert before == len(session.result.patches) + 1  # every candidate plus the montage
    roi_ids = {n.GetID() for n in nodes.patch_rois}
    n_nodes = scene.GetNumberOfNodes()

    new = session.reprompt(["reticulation"], app_logic=headless.app_logic)
    assert encoder.images_encoded == before + 1  # the new montage only, no patch
    probs = session.result.patch_probabilities["reticulation"]
    assert new.heatmap is nodes.heatmap and "reticulation" in new.heatmap.GetName()
    assert float(slicer.util.arrayFromVolume(new.heatmap).max()) == pytest.approx(float(probs.max()), abs=1e-7)
    assert new.lungs is nodes.lungs
    assert len(new.patch_rois) == TOP_K and not roi_ids & {n.GetID() for n in new.patch_rois}
    assert scene.GetNumberOfNodesByClass("vtkMRMLMarkupsROINode") == TOP_K
    assert scene.GetNumberOfNodes() == n_nodes  # replaced, not piled up
    for roi, i in zip(new.patch_rois, session.result.ranked):
        assert roi.GetName().endswith(f"{probs[i]:.3f}")
    table = new.probabilities.GetTable()
    assert table.GetValueByName(0, "Label").ToString() == "reticulation"
    assert table.GetValueByName(0, "Probability").ToDouble() == pytest.approx(session.result.finding_probabilities["reticulation"])

    # Settings that only change the ranking re-prompt; settings that change the patches do not.
    assert session.can_reprompt(volume, dataclasses.replace(session.settings, prompts=["emphysema"], top_k=3))
    assert not session.can_reprompt(volume, dataclasses.replace(session.settings, patch_mm=20.0))
    new = session.reprompt_to(dataclasses.replace(session.settings, prompts=["honeycombing"], top_k=3),
                              app_logic=headless.app_logic)
    assert len(new.patch_rois) == 3 and encoder.images_encoded == before + 2
    with pytest.raises(InputError, match="Apply"):
        session.reprompt_to(dataclasses.replace(session.settings, filter_threshold=0.9))
    # Edited voxels make the kept embeddings stale: Apply analyses again instead of re-prompting.
    voxels = slicer.util.arrayFromVolume(volume)
    saved = voxels[0, 0, 0]
    voxels[0, 0, 0] = saved + 1
    slicer.util.arrayFromVolumeModified(volume)
    try:
        assert not session.can_reprompt(volume, session.settings)
    finally:
        voxels[0, 0, 0] = saved
        slicer.util.arrayFromVolumeModified(volume)


def test_reprompt_changes_classifies_settings():
    base = AnalysisSettings()
    assert reprompt_changes(base, AnalysisSettings()) == {}
    assert reprompt_changes(base, AnalysisSettings(prompts=["emphysema"], batch_size=8)) == {"prompts": ["emphysema"]}
    assert reprompt_changes(base, AnalysisSettings(device="cpu")) is None
    # Extent and pattern map read the kept embeddings: a re-prompt, not a new analysis.
    assert reprompt_changes(base, AnalysisSettings(patterns=["honeycombing"], subpleural_mm=5.0)) == {
        "patterns": ["honeycombing"], "subpleural_mm": 5.0}
    assert reprompt_changes(base, AnalysisSettings(lung=LungMaskSettings(threshold_hu=-500.0))) is None


def test_second_run_updates_the_same_nodes(small_phantom):
    headless = make_scene()
    volume = add_ct_volume(headless.scene, small_phantom.hu, small_phantom.spacing_mm, small_phantom.origin_mm,
                           small_phantom.direction)
    from ZeroShotILDLib.embeddings import EmbeddingCache

    settings = tiny_settings(top_k=3, slice_step_mm=20.0, scoring_mode="exact")
    first = AnalysisSession(volume, settings)
    events = []
    cache = EmbeddingCache()  # what ZeroShotILDLogic keeps across runs
    first.compute(lambda stage, done, total: events.append((stage, done, total)), cache=cache)
    # The engine's real stage names drive the panel's progress bar from 0 to 1 without going back.
    staged = runner.StagedProgress()
    fractions = [staged.update(*event) for event in events]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    named = {name for name, _ in runner.STAGES}
    assert {"loading model", "encoding patches", "scoring prompts", "building montage", "done"} <= {e[0] for e in events}
    assert all(stage in named or "lung" in stage for stage, _, _ in events), sorted({e[0] for e in events})
    nodes1 = first.apply(app_logic=headless.app_logic)
    count = headless.scene.GetNumberOfNodes()
    # A second Apply on the same voxels with the same model reuses the loaded model and the embeddings.
    second = AnalysisSession(volume, dataclasses.replace(settings, prompts=["emphysema"]))
    second.compute(model=first.analyzer.model, cache=cache)
    assert second.analyzer.encoder.images_encoded == 1  # the montage only
    np.testing.assert_array_equal(second.result.lung_mask, first.result.lung_mask)
    nodes2 = second.apply(app_logic=headless.app_logic)
    assert headless.scene.GetNumberOfNodes() == count
    assert nodes2.heatmap is nodes1.heatmap and nodes2.lungs is nodes1.lungs and nodes2.chart is nodes1.chart


def test_cancel_mid_run_leaves_the_scene_unchanged(small_phantom):
    headless = make_scene()
    scene = headless.scene
    volume = add_ct_volume(scene, small_phantom.hu, small_phantom.spacing_mm, small_phantom.origin_mm,
                           small_phantom.direction)
    session = AnalysisSession(volume, tiny_settings(slice_step_mm=20.0, batch_size=4))
    count, mtime = scene.GetNumberOfNodes(), volume.GetMTime()
    stages = []

    from ZeroShotILDLib.progress import CancelToken

    cancel = CancelToken()

    def report(stage, done, total):
        stages.append((stage, done))
        if stage == "encoding patches" and done >= 4:
            cancel.cancel()  # what the Cancel button does, while the run goes on

    with pytest.raises(Cancelled):
        session.compute(report, cancel)
    encoded = [d for s, d in stages if s == "encoding patches"]
    assert max(encoded) <= 8  # stopped within one batch of the cancel
    assert session.result is None
    assert scene.GetNumberOfNodes() == count and volume.GetMTime() == mtime
    assert mrml_results.find_result_nodes(volume) is None


def test_staged_progress_is_monotonic_and_labelled():
    staged = runner.StagedProgress()
    fractions = [staged.update(*event) for event in [
        ("loading model", 0, 1), ("loading model", 1, 1), ("lung mask: threshold", 1, 4), ("encoding patches", 0, 100),
        ("encoding patches", 50, 100), ("lung mask: threshold", 4, 4), ("encoding patches", 100, 100),
        ("scoring prompts", 0, 1), ("building montage", 0, 1), ("done", 1, 1)]]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert 0.4 < fractions[4] < 0.7
    assert staged.label == "done"


# ----------------------------------------------------------------------------------------------
# Parameter node
# ----------------------------------------------------------------------------------------------
def _non_default_settings() -> AnalysisSettings:
    return AnalysisSettings(
        model="clip-vit-b-16-laion", checkpoint="/data/w/open_clip_model.safetensors", weights_dir="/data/w",
        device="cpu", batch_size=16, prompts=["honeycombing", "ground-glass opacity"], negatives=["", "normal lung"],
        subtypes=["idiopathic pulmonary fibrosis", "sarcoidosis"], patch_mm=24.5, patch_px=None, stride_fraction=0.5,
        slice_step_mm=2.5, filter_threshold=0.8, hu_window=(-1200.0, 200.0), retrieval="random", montage_size=8,
        top_k=12, seed=7, scoring_mode="fast", proposal_grid_tokens=2, rescore_fraction=0.25, rescore_min=5,
        patterns=["honeycombing", "traction bronchiectasis"], normal_prompt="healthy lung", subpleural_mm=7.5,
        extent_z=2.5,
        lung=LungMaskSettings(threshold_hu=-450.0, min_component_ml=3.0, opening_mm=1.0, closing_mm=4.0,
                              erosion_mm=0.5, airway_hu=-960.0, fill_holes=False),
    ).validate()


def test_parameter_mapping_covers_every_settings_field():
    assert parameters.settings_fields_covered() == parameters.all_settings_fields()
    names = [p.name for p in parameters.PARAMETERS]
    assert len(names) == len(set(names))
    assert parameters.values_to_settings(parameters.DEFAULTS) == AnalysisSettings().validate()


def test_parameter_node_round_trip_through_a_saved_scene():
    headless = make_scene()
    node = headless.scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "ZeroShotILD")
    node.SetAttribute("ModuleName", "ZeroShotILD")
    settings = _non_default_settings()
    parameters.write_settings(node, settings, catalog.model_names())
    # Strings as slicer.parameterNodeWrapper's serializers write them.
    assert node.GetParameter("lungFillHoles") == "False" and node.GetParameter("montageSize") == "8"
    assert node.GetParameter("patchMm") == "24.5" and node.GetParameter("patchPx") == "0"
    assert node.GetParameter("prompts") == "honeycombing;ground-glass opacity"
    assert parameters.read_settings(node) == settings
    assert node.GetParameter("patterns") == "honeycombing\ntraction bronchiectasis"
    assert node.GetParameter("subpleuralMm") == "7.5" and node.GetParameter("normalPrompt") == "healthy lung"
    # No pattern prompts: no pattern map (and the engine refuses patterns without a normal-lung prompt).
    off = parameters.values_to_settings({**parameters.DEFAULTS, "patterns": "  \n "})
    assert off.patterns == []
    with pytest.raises(InputError):
        parameters.values_to_settings({**parameters.DEFAULTS, "normalPrompt": " "})

    scene = headless.scene
    scene.SetSaveToXMLString(1)
    scene.Commit()
    xml = scene.GetSceneXMLString()
    reloaded = make_scene().scene
    reloaded.SetLoadFromXMLString(1)
    reloaded.SetSceneXMLString(xml)
    reloaded.Import()
    loaded = [reloaded.GetNthNodeByClass(i, "vtkMRMLScriptedModuleNode")
              for i in range(reloaded.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode"))]
    loaded = [n for n in loaded if n.GetName() == "ZeroShotILD"]
    assert len(loaded) == 1
    assert parameters.read_settings(loaded[0]) == settings


def test_ensemble_model_survives_the_parameter_node_and_a_saved_scene():
    settings = AnalysisSettings(model="ensemble:/runs/a b/ensemble.json", prompts=["honeycombing"]).validate()
    values = parameters.settings_to_values(settings, catalog.model_names())
    # A choice the panel's model list offers, with the file in the file field (not "dapt:ensemble:...").
    assert values["model"] == catalog.ENSEMBLE_MODEL and values["checkpointPath"] == "/runs/a b/ensemble.json"
    headless = make_scene()
    node = headless.scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "ZeroShotILD")
    parameters.write_settings(node, settings, catalog.model_names())
    assert parameters.read_settings(node).model == "ensemble:/runs/a b/ensemble.json"
    headless.scene.SetSaveToXMLString(1)
    headless.scene.Commit()
    reloaded = make_scene().scene
    reloaded.SetLoadFromXMLString(1)
    reloaded.SetSceneXMLString(headless.scene.GetSceneXMLString())
    reloaded.Import()
    loaded = [reloaded.GetNthNodeByClass(i, "vtkMRMLScriptedModuleNode")
              for i in range(reloaded.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode"))]
    (loaded,) = [n for n in loaded if n.GetName() == "ZeroShotILD"]
    assert loaded.GetParameter("model") == catalog.ENSEMBLE_MODEL
    assert parameters.read_settings(loaded) == settings
    with pytest.raises(InputError, match="ensemble.json"):
        parameters.values_to_settings({"model": catalog.ENSEMBLE_MODEL, "checkpointPath": ""})


def test_custom_checkpoint_and_defaults_mapping():
    node = make_scene().scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
    parameters.ensure_defaults(node)
    assert parameters.read_settings(node) == AnalysisSettings().validate()
    custom = AnalysisSettings(model="dapt:/ckpt/dapt.safetensors")
    values = parameters.settings_to_values(custom, catalog.model_names())
    assert values["model"] == catalog.CUSTOM_MODEL and values["checkpointPath"] == "/ckpt/dapt.safetensors"
    assert parameters.values_to_settings(values).model == "dapt:/ckpt/dapt.safetensors"
    bare = parameters.settings_to_values(AnalysisSettings(model="/ckpt/other.safetensors"), catalog.model_names())
    assert bare["model"] == catalog.CUSTOM_MODEL and bare["checkpointPath"] == "/ckpt/other.safetensors"
    with pytest.raises(InputError, match="checkpoint file"):
        parameters.values_to_settings({"model": catalog.CUSTOM_MODEL, "checkpointPath": " "})
    with pytest.raises(InputError, match="empty prompt"):
        parameters.values_to_settings({"prompts": " ; "})
    with pytest.raises(InputError, match="montage size"):
        parameters.values_to_settings({"montageSize": 5})
    node.SetParameter("topK", "many")
    with pytest.raises(InputError, match="topK"):
        parameters.read_settings(node)
    # Negatives keep their positions: an empty entry means the default "no {prompt}".
    s = parameters.values_to_settings({"prompts": "a; b", "negatives": "; not b"})
    assert s.negatives == ["", "not b"] and s.negative_for(0) == "no a" and s.negative_for(1) == "not b"


# ----------------------------------------------------------------------------------------------
# Model list, requirements, dependencies
# ----------------------------------------------------------------------------------------------
def test_slicer_model_list_is_the_engine_model_list(monkeypatch, tmp_path):
    from ZeroShotILDLib import models

    resources = json.loads((REPO / "Resources" / "models.json").read_text(encoding="utf-8"))
    engine = json.loads((REPO / "ZeroShotILDLib" / "model_list.json").read_text(encoding="utf-8"))
    assert resources == engine, "Resources/models.json differs: copy ZeroShotILDLib/model_list.json over it"
    assert catalog.model_names() == models.model_names()
    monkeypatch.delenv(catalog.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert catalog.default_weights_dir() == models.default_weights_dir()
    monkeypatch.setenv(catalog.WEIGHTS_ENV, str(tmp_path / "w"))
    assert catalog.default_weights_dir() == models.default_weights_dir() == tmp_path / "w"
    text = catalog.describe_model("chexzero", str(tmp_path / "w"))
    assert "PhysioNet" in text and str(tmp_path / "w" / "chexzero") in text
    assert "meaningless" in catalog.describe_model("tiny-random")


def test_requirements_and_constraints():
    reqs = catalog.requirements()
    names = [dependencies.canonical_name(dependencies.split_requirement(r)[0]) for r in reqs]
    assert "open-clip-torch" in names and "scipy" in names
    protected = {dependencies.canonical_name(n) for n in dependencies.PROTECTED}
    assert {"torch", "torchvision", "numpy", "scipy", "simpleitk", "vtk"} <= protected
    # Only scipy is both: the engine imports it, so it is listed for a Python without it, while the
    # constraints pin the scipy Slicer ships, so pip keeps that one.
    assert set(names) & protected == {"scipy"}
    installed = {"open-clip-torch": "2.20.0", "scipy": "1.13.1", "edt": "3.1.2", "safetensors": "0.4.5",
                 "tqdm": "4.67.1", "pillow": "10.4.0", "huggingface-hub": "0.26.2", "pyyaml": "6.0.2"}
    missing = dependencies.missing_requirements(
        reqs, version_of=lambda name: installed.get(dependencies.canonical_name(name)))
    assert missing == [r for r in reqs if r.lower().startswith(("open_clip_torch", "open-clip-torch"))]
    assert dependencies.missing_requirements(reqs) == []  # this environment has everything
    args = dependencies.pip_arguments(["open_clip_torch>=3.0"], "/tmp/with space/c.txt")
    assert args == ["open_clip_torch>=3.0", "-c", "/tmp/with space/c.txt"]


def test_constraints_pin_everything_installed_except_what_is_being_installed(tmp_path):
    slicer_python = {"torch": "2.5.1+cu124", "numpy": "1.26.4", "scipy": "1.13.1", "SimpleITK": "2.4.0",
                     "vtk": "9.4.2", "torchvision": "0.20.1+cu124", "pydicom": "2.4.4", "open_clip_torch": "2.20.0",
                     "timm": "1.0.9"}
    text = dependencies.constraints_text(installed=slicer_python, installing=["open_clip_torch>=3.0", "pillow>=10"])
    pins = dict(line.split("==") for line in text.splitlines() if not line.startswith("#"))
    assert pins == {k: v for k, v in slicer_python.items() if k != "open_clip_torch"}
    # A version pip cannot parse would make it refuse the whole file: left out.
    assert "legacy" not in dependencies.constraints_text(installed={"legacy": "1.0-2014-local", "numpy": "1.26.4"})
    # A protected package stays pinned even if a requirement names it.
    text = dependencies.constraints_text(installed=slicer_python, installing=["numpy>=2"])
    assert "numpy==1.26.4" in text
    # By default the pins are what this Python really has installed (importlib.metadata).
    real = dependencies.constraints_text()
    for name in ("numpy", "scipy", "vtk", "torch"):
        version = dependencies.installed_version(name)
        assert version and f"=={version}" in real and re.search(rf"^{name}=={re.escape(version)}$", real, re.M | re.I)
    path = dependencies.write_constraints(tmp_path, installed=slicer_python)
    assert path.read_text(encoding="utf-8").count("==") == len(slicer_python)


def test_old_torch_is_explained_before_pip_runs():
    with pytest.raises(InputError, match=r"PyTorch 1\.13\.1 is older .*torch>=2\.1.*PyTorch Util"):
        dependencies.check_torch(version_of={"torch": "1.13.1"}.get)
    dependencies.check_torch(version_of={"torch": "2.5.1+cu124"}.get)
    dependencies.check_torch(version_of={}.get)  # not installed: the PyTorch extension installs it


def test_model_list_is_read_once_not_on_every_keystroke(monkeypatch, tmp_path):
    reads = []
    real = catalog.json.loads

    def counting(text, *args, **kwargs):
        reads.append(1)
        return real(text, *args, **kwargs)

    monkeypatch.setattr(catalog.json, "loads", counting)
    catalog._parse_models.cache_clear()
    for _ in range(50):  # what 50 parameter-node changes ask for
        catalog.describe_model("chexzero")
        catalog.model_names()
        catalog.input_warning("phantom-demo", "CT")
    assert len(reads) == 1
    # An edited file is read again.
    copy = tmp_path / "models.json"
    copy.write_text((REPO / "Resources" / "models.json").read_text(encoding="utf-8"), encoding="utf-8")
    assert catalog.model_names(copy) == catalog.model_names()
    data = json.loads(copy.read_text(encoding="utf-8"))
    data["models"] = data["models"][:2]
    copy.write_text(json.dumps(data), encoding="utf-8")
    assert len(catalog.model_names(copy)) == 2
    records = catalog.load_models()
    records[0]["name"] = "edited"  # callers get copies: the cache cannot be changed from outside
    assert catalog.load_models()[0]["name"] != "edited"


def test_module_support_code_imports_without_torch_or_qt():
    """The module must load (and list models) before the first Apply has installed torch."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'open_clip', 'skimage', 'qt', 'ctk', 'PythonQt'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'ZeroShotILD')!r}]\n"
        "from ZeroShotILDMRML import catalog, parameters, dependencies, runner\n"
        "from ZeroShotILDLib.settings import COMMON_FINDINGS\n"
        "print(len(catalog.model_names()), len(parameters.PARAMETERS))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(len(catalog.model_names())), str(len(parameters.PARAMETERS))]


def test_prone_scan_with_a_full_width_table_shows_results_where_the_ct_is():
    """Issue 15 in Slicer: a prone scan (head first, patient prone: rows and columns both run against
    L and P) on a table as wide as the field of view. The Lungs segment stays inside the body and every
    top-patch markup lies on lung of the CT, through the node's own geometry."""
    from ZeroShotILDLib.phantom import generate_phantom

    phantom = generate_phantom(5, shape_zyx=(40, 128, 128), spacing_mm=(2.5, 2.5, 5.0),
                               subtype="idiopathic pulmonary fibrosis", table="full", position="prone")
    prone = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # ImageOrientationPatient (-1,0,0 / 0,-1,0)
    headless = make_scene()
    volume = add_ct_volume(headless.scene, phantom.hu, phantom.spacing_mm, ORIGIN_MM, prone, "Prone CT")
    session = AnalysisSession(volume, tiny_settings(top_k=TOP_K, slice_step_mm=10.0, scoring_mode="exact"))
    session.compute()
    nodes = session.apply(app_logic=headless.app_logic)
    result = session.result
    assert not (result.lung_mask & ~phantom.body_mask).any()  # no table or outside air in the Lungs segment
    ras_to_ijk = np.linalg.inv(_ijk_to_ras(volume))
    for roi, i in zip(nodes.patch_rois, result.ranked):
        i_, j_, k_ = (ras_to_ijk @ np.r_[roi.GetCenter(), 1.0])[:3]
        z, y, x = int(round(k_)), int(np.floor(j_)), int(np.floor(i_))
        assert z == result.patches.slice_index[i]
        box = phantom.lung_mask[z, y - 2:y + 3, x - 2:x + 3]
        assert phantom.body_mask[z, y, x] and box.any(), "a top patch sits off the patient's lungs"
