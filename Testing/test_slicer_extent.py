"""Issue 14 in Slicer, on a real vtkMRMLScene (slicer-core): the pattern segmentation, the extent table
and chart, and the report saved from the module.

A phantom CT goes into a scalar volume node with an oblique, mirrored geometry under a parent
transform, is analysed with the tiny random model through the module's session, and the result
nodes are checked against the engine's own result (``patterns.label_volume``, ``result.extent``).
"""
from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest

from conftest import REPO, self_referenced, tiny_settings

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' package here is not slicer-core", allow_module_level=True)

if str(REPO / "ZeroShotILD") not in sys.path:
    sys.path.insert(0, str(REPO / "ZeroShotILD"))

import vtk  # noqa: E402

from test_report import decode_png, parse  # noqa: E402
from test_slicer_logic import module  # noqa: E402,F401  (fixture: ZeroShotILD.py with Qt stood in for)
from test_slicer_mrml import OBLIQUE_DIRECTION, ORIGIN_MM  # noqa: E402
from ZeroShotILDLib.errors import InputError  # noqa: E402
from ZeroShotILDLib.patterns import label_volume  # noqa: E402
from ZeroShotILDLib.report import embedded_images  # noqa: E402
from ZeroShotILDMRML import mrml_results, volumes  # noqa: E402
from ZeroShotILDMRML.headless import add_ct_volume, make_scene  # noqa: E402
from ZeroShotILDMRML.session import AnalysisSession  # noqa: E402

#: A low extent threshold so that the tiny random model labels patches with several patterns.
SETTINGS = dict(top_k=4, slice_step_mm=10.0, prompts=["honeycombing", "emphysema"], extent_z=1.0)
ROWS = (mrml_results.WHOLE_LUNG,) + mrml_results.EXTENT_ZONES


def _parent_transform(scene):
    """A rigid transform above the CT, as a registration (or Slicer's acquisition transform) puts there."""
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    matrix = np.eye(4)
    matrix[:3, :3] = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    matrix[:3, 3] = (5.0, -7.0, 11.0)
    node.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    return node


@pytest.fixture(scope="module")
def analysed(small_phantom):
    headless = make_scene()
    volume = add_ct_volume(headless.scene, small_phantom.hu, small_phantom.spacing_mm, ORIGIN_MM,
                           OBLIQUE_DIRECTION, "Phantom CT")
    volume.SetAndObserveTransformNodeID(_parent_transform(headless.scene).GetID())
    session = AnalysisSession(volume, tiny_settings(**SETTINGS))
    with self_referenced():
        session.compute()
    nodes = session.apply(app_logic=headless.app_logic)
    return headless, volume, session, nodes


def _segment_labels(seg, volume) -> np.ndarray:
    """The segmentation exported on the volume's grid: label k = the k-th segment (0 = none)."""
    ids = vtk.vtkStringArray()
    seg.GetSegmentation().GetSegmentIDs(ids)
    labelmap = volume.GetScene().AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    try:
        assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(seg, ids, labelmap, volume)
        np.testing.assert_allclose(volumes.ijk_to_ras(labelmap), volumes.ijk_to_ras(volume), atol=1e-6)
        return np.array(slicer.util.arrayFromVolume(labelmap))
    finally:
        mrml_results.remove_node(labelmap)


def _table_columns(table_node) -> dict:
    table = table_node.GetTable()
    out = {}
    for c in range(table.GetNumberOfColumns()):
        column = table.GetColumn(c)
        out[column.GetName()] = [column.GetValue(r) for r in range(table.GetNumberOfRows())]
    return out


# ----------------------------------------------------------------------------------------------
# Pattern segmentation
# ----------------------------------------------------------------------------------------------
def test_pattern_segmentation_has_a_segment_per_pattern_with_the_engine_voxels(analysed):
    _, volume, session, nodes = analysed
    result, seg = session.result, nodes.patterns
    pm = result.patterns
    assert seg is not None and seg.GetName() == mrml_results.PATTERNS_NAME
    assert mrml_results.find_result_nodes(volume).patterns is seg
    segmentation = seg.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == len(pm.names) == len(session.settings.patterns)
    for k, (name, colour) in enumerate(zip(pm.names, pm.colours), start=1):
        segment = segmentation.GetSegment(mrml_results.pattern_segment_id(k))
        assert segment is not None and segment.GetName() == name
        np.testing.assert_allclose(segment.GetColor(), np.array(colour) / 255.0, atol=1e-6)
    expected = label_volume(result)
    counts = np.bincount(expected.ravel(), minlength=len(pm.names) + 1)
    assert (counts[1:] > 0).sum() >= 2, f"the test needs at least two labelled patterns: {counts}"
    exported = _segment_labels(seg, volume)
    assert exported.shape == expected.shape
    np.testing.assert_array_equal(np.bincount(exported.ravel(), minlength=len(counts)), counts)
    np.testing.assert_array_equal(exported, expected)


def test_pattern_segmentation_sits_on_the_ct(analysed):
    _, volume, _, nodes = analysed
    seg = nodes.patterns
    # The same voxel grid as the (oblique, mirrored) CT, and the CT's parent transform.
    reference = seg.GetSegmentation().GetConversionParameter("Reference image geometry")
    values = [float(v) for v in reference.split(";")[:12]]
    np.testing.assert_allclose(values, volumes.ijk_to_ras(volume)[:3, :].ravel(), atol=1e-6)
    assert np.linalg.det(volumes.ijk_to_ras(volume)[:3, :3]) < 0  # really mirrored
    assert seg.GetTransformNodeID() == volume.GetTransformNodeID() is not None
    assert seg.GetTransformNodeID() == nodes.lungs.GetTransformNodeID() == nodes.heatmap.GetTransformNodeID()
    # Its labelmap representation has the CT's IJK-to-RAS (not merely the same bounds).
    labelmap = slicer.vtkOrientedImageData()
    seg.GetBinaryLabelmapRepresentation(mrml_results.pattern_segment_id(1), labelmap)
    matrix = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(matrix)
    np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(matrix)[:3, :3], volumes.ijk_to_ras(volume)[:3, :3],
                               atol=1e-6)


def test_patterns_are_outlines_over_the_heatmap(analysed):
    """Honest default view (issue 23): a filled pattern map over the heatmap hid the heatmap's colours."""
    _, _, session, nodes = analysed
    display = nodes.patterns.GetDisplayNode()
    assert display.GetVisibility() and display.GetVisibility2DOutline() and display.GetOpacity2DOutline() == 1.0
    assert not display.GetVisibility2DFill() and display.GetOpacity2DFill() == 0.0
    # Painted without torch in Slicer's process, the same labels as the engine's label_volume.
    np.testing.assert_array_equal(mrml_results.pattern_labels(session.result), label_volume(session.result))


def _acquisition_like_transform(scene, volume):
    """A grid transform that shifts each slice along S by a smooth, uneven amount, as Slicer's
    "acquisition transform" does for an interval or irregular DICOM series."""
    from vtk.util.numpy_support import vtk_to_numpy

    m = volumes.ijk_to_ras(volume)
    dims = volume.GetImageData().GetDimensions()
    corners = np.array([[i, j, k, 1.0] for i in (0, dims[0] - 1) for j in (0, dims[1] - 1) for k in (0, dims[2] - 1)])
    ras = (corners @ m.T)[:, :3]
    lo, hi = ras.min(axis=0) - 30.0, ras.max(axis=0) + 30.0
    spacing = 15.0
    shape = np.ceil((hi - lo) / spacing).astype(int) + 1
    image = vtk.vtkImageData()
    image.SetOrigin(*lo)
    image.SetSpacing(spacing, spacing, spacing)
    image.SetDimensions(*(int(n) for n in shape))
    image.AllocateScalars(vtk.VTK_DOUBLE, 3)
    displacement = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape[2], shape[1], shape[0], 3)
    s_mm = lo[2] + spacing * np.arange(shape[2])
    displacement[...] = 0.0
    displacement[..., 2] = (6.0 * np.sin((s_mm - lo[2]) / (hi[2] - lo[2]) * np.pi))[:, None, None]
    grid = slicer.vtkOrientedGridTransform()
    grid.SetDisplacementGridData(image)
    grid.SetInterpolationModeToLinear()
    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "CT acquisition transform")
    node.SetAndObserveTransformToParent(grid)
    return node


def test_pattern_and_lung_segmentations_follow_an_acquisition_transform(small_phantom):
    headless = make_scene()
    volume = add_ct_volume(headless.scene, small_phantom.hu, small_phantom.spacing_mm, ORIGIN_MM,
                           OBLIQUE_DIRECTION, "Interval CT")
    transform = _acquisition_like_transform(headless.scene, volume)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    assert volumes.acquisition_slice_positions(volume) is not None  # really uneven slices
    session = AnalysisSession(volume, tiny_settings(**SETTINGS))
    session.compute()
    nodes = session.apply(app_logic=headless.app_logic)
    for seg in (nodes.lungs, nodes.patterns):
        assert seg.GetTransformNodeID() == transform.GetID()
    # On the CT's own voxel grid, under its transform: the same voxels as the engine's arrays.
    np.testing.assert_array_equal(_segment_labels(nodes.lungs, volume) > 0, session.result.lung_mask)
    expected = label_volume(session.result)
    assert expected.any()
    np.testing.assert_array_equal(_segment_labels(nodes.patterns, volume), expected)


# ----------------------------------------------------------------------------------------------
# Extent table and chart
# ----------------------------------------------------------------------------------------------
def test_extent_table_holds_result_extent_in_percent(analysed):
    _, _, session, nodes = analysed
    result = session.result
    columns = _table_columns(nodes.extent_table)
    assert columns["Zone"] == list(ROWS)
    # A pattern that is also a prompt appears once, as the prompt (the same rule gives the same number).
    patterns_only = [n for n in result.patterns.names if n not in result.extent]
    assert len(patterns_only) < len(result.patterns.names)
    expected_names = ["Index", "Zone", *result.extent, *(f"pattern: {n}" for n in patterns_only)]
    assert list(columns) == expected_names
    records = {**result.extent, **{f"pattern: {n}": result.patterns.extent[n] for n in patterns_only}}
    for name, record in records.items():
        expected = [record["lung_fraction"]] + [record["by_zone"][z] for z in mrml_results.EXTENT_ZONES]
        np.testing.assert_allclose(columns[name], 100.0 * np.array(expected, dtype=float), rtol=1e-12, equal_nan=True)
    # Something is positive (patterns compete with each other, so which one depends on the random weights).
    assert any(v > 0 for name in records for v in columns[name]), columns
    primary = result.extent[result.primary_prompt]
    assert nodes.extent_table.GetAttribute("ZeroShotILD.ExtentRule") == primary["rule"]
    assert nodes.extent_table.GetAttribute("ZeroShotILD.Predominance") == str(primary["predominance"])


def test_extent_chart_is_a_bar_chart_of_the_primary_prompt_by_zone(analysed):
    headless, _, session, nodes = analysed
    chart, series = nodes.extent_chart, nodes.extent_series
    assert chart.GetNumberOfPlotSeriesNodes() == 1 and chart.GetNthPlotSeriesNode(0) is series
    assert series.GetPlotType() == slicer.vtkMRMLPlotSeriesNode.PlotTypeBar
    assert series.GetTableNode() is nodes.extent_table
    assert series.GetYColumnName() == session.result.primary_prompt == "honeycombing"
    assert series.GetLabelColumnName() == "Zone"
    labels = _table_columns(series.GetTableNode())[series.GetLabelColumnName()]
    assert set(mrml_results.EXTENT_ZONES) <= set(labels)
    assert "honeycombing" in chart.GetTitle() and "NOT MEANINGFUL" in chart.GetTitle()  # tiny-random
    # Its own chart, beside (not instead of) the probability chart.
    assert chart is not nodes.chart and series is not nodes.series
    selection = headless.app_logic.GetSelectionNode()
    mrml_results.show_table_and_chart(nodes.extent_table, chart, headless.app_logic)
    assert selection.GetActivePlotChartID() == chart.GetID()
    assert selection.GetActiveTableID() == nodes.extent_table.GetID()


def test_reprompt_replaces_the_extent_and_pattern_nodes(analysed):
    headless, volume, session, nodes = analysed
    scene = headless.scene
    count = scene.GetNumberOfNodes()
    segmentations = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    try:
        new = session.reprompt(["emphysema"], app_logic=headless.app_logic)
        assert scene.GetNumberOfNodes() == count
        assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == segmentations
        assert new.patterns is nodes.patterns and new.extent_table is nodes.extent_table
        assert new.extent_chart is nodes.extent_chart and new.extent_series is nodes.extent_series
        assert new.extent_series.GetYColumnName() == "emphysema" and "emphysema" in new.extent_chart.GetTitle()
        columns = _table_columns(new.extent_table)
        assert "honeycombing" not in columns
        expected = session.result.extent["emphysema"]
        assert columns["emphysema"][0] == pytest.approx(100.0 * expected["lung_fraction"])
        np.testing.assert_array_equal(_segment_labels(new.patterns, volume), label_volume(session.result))

        # A result without a pattern map (patterns switched off) leaves no stale pattern segmentation.
        no_patterns = dataclasses.replace(session.result, patterns=None)
        off = mrml_results.write_prompt_outputs(volume, no_patterns, app_logic=headless.app_logic)
        assert off.patterns is None and mrml_results.find_result_nodes(volume).patterns is None
        assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == segmentations - 1
        assert [c for c in _table_columns(off.extent_table) if c.startswith("pattern: ")] == []
    finally:
        restored = session.reprompt(["honeycombing", "emphysema"], app_logic=headless.app_logic)
        nodes.patterns = restored.patterns


def test_failed_build_adds_no_pattern_nodes(analysed, monkeypatch):
    headless, volume, session, _ = analysed
    scene = headless.scene
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    # A fresh input: a failure while writing the extent leaves none of the new nodes behind.
    other = add_ct_volume(scene, slicer.util.arrayFromVolume(volume), (0.7, 0.7, 2.0), ORIGIN_MM, OBLIQUE_DIRECTION,
                          "Other CT")
    count = scene.GetNumberOfNodes()

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(mrml_results, "_write_extent_chart", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        mrml_results.write_result(other, session.result, app_logic=headless.app_logic)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 2  # Lungs + Patterns of the first CT
    assert scene.GetNumberOfNodes() == count
    folder = mrml_results.results_folder(other, create=False)
    assert not folder or not mrml_results._folder_nodes(other, folder)
    assert sh is not None


# ----------------------------------------------------------------------------------------------
# Save report
# ----------------------------------------------------------------------------------------------
def _report_images(path) -> list:
    text = path.read_text(encoding="utf-8")
    page = parse(text)
    assert page.urls and all(tag == "img" and value.startswith("data:image/png;base64,")
                             for tag, _, value in page.urls), page.urls
    assert "<script" not in text and "url(" not in text
    return text, [np.asarray(decode_png(uri)) for uri in embedded_images(text)]


def test_save_report_rebuilds_the_scan_from_the_volume_when_the_voxels_are_not_kept(analysed, tmp_path):
    _, volume, session, _ = analysed
    kept = mrml_results.save_report(session.result, volume, tmp_path / "kept.html", scan=session.scan)
    rebuilt = mrml_results.save_report(session.result, volume, tmp_path / "rebuilt.html")  # the worker's case
    kept_text, kept_images = _report_images(kept)
    rebuilt_text, rebuilt_images = _report_images(rebuilt)
    assert len(kept_images) == len(rebuilt_images) >= 2
    for a, b in zip(kept_images, rebuilt_images):
        np.testing.assert_array_equal(a, b)  # same overlays from the rebuilt scan, same montage
    # The montage is one of the pictures (the pattern map's come after it since issue 21).
    assert any(np.array_equal(image, session.result.montage) for image in rebuilt_images)
    assert "Extent by zone" in rebuilt_text and "<svg" in rebuilt_text
    for name in session.result.patterns.names:
        assert name in rebuilt_text
    assert "Phantom CT" in rebuilt_text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.html", "rebuilt.html"]  # no leftovers


def test_save_report_refuses_bad_paths_with_one_line(analysed, tmp_path):
    _, volume, session, _ = analysed
    with pytest.raises(InputError, match="is a folder"):
        mrml_results.save_report(session.result, volume, tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        mrml_results.save_report(session.result, volume, tmp_path / "missing" / "report.html")
    with pytest.raises(InputError, match="Apply"):
        mrml_results.save_report(None, volume, tmp_path / "report.html")
    assert list(tmp_path.iterdir()) == []


def test_logic_save_report(module, small_phantom, tmp_path):  # noqa: F811
    headless = make_scene()
    volume = add_ct_volume(headless.scene, small_phantom.hu, small_phantom.spacing_mm, small_phantom.origin_mm,
                           small_phantom.direction, "Chest CT")
    logic = module.ZeroShotILDLogic()
    with pytest.raises(InputError, match="Apply"):
        logic.saveReport(str(tmp_path / "none.html"))
    logic.process(volume, **tiny_settings(**SETTINGS).__dict__)
    headless.scene.SetRootDirectory(str(tmp_path))
    assert logic.defaultReportPath() == tmp_path / "Chest_CT_report.html"
    # As after an analysis in the worker process: no voxels kept in this process.
    logic.session.scan = None
    path = logic.saveReport()
    assert path == tmp_path / "Chest_CT_report.html"
    text, images = _report_images(path)
    assert any(np.array_equal(image, logic.session.result.montage) for image in images)
    assert "honeycombing" in text and "Extent by zone" in text
    # Voxels edited after the analysis: the rebuilt scan would not be the analysed one.
    voxels = slicer.util.arrayFromVolume(volume)
    voxels[0, 0, 0] += 1
    slicer.util.arrayFromVolumeModified(volume)
    with pytest.raises(InputError, match="edited after it was analysed"):
        logic.saveReport(str(tmp_path / "edited.html"))
    assert not (tmp_path / "edited.html").exists()
    summary = logic.extentSummary()
    fraction = logic.session.result.extent["honeycombing"]["lung_fraction"]
    assert summary.startswith("Extent of honeycombing: ") and f"{100 * fraction:.1f} %" in summary


def test_nodes_from_a_worker_result_equal_the_in_process_ones(analysed, tmp_path):
    """The panel's path: the result comes back from the worker process through files; its pattern
    segmentation, extent table and report are the same as from the in-process result."""
    from ZeroShotILDMRML import worker

    headless, volume, session, nodes = analysed
    worker.write_result(session.result, tmp_path / "job")
    back = worker.read_result(tmp_path / "job")
    np.testing.assert_array_equal(label_volume(back), label_volume(session.result))
    other = add_ct_volume(headless.scene, slicer.util.arrayFromVolume(volume), session.scan.spacing_mm, ORIGIN_MM,
                          OBLIQUE_DIRECTION, "Worker CT")
    try:
        got = mrml_results.write_result(other, back, app_logic=headless.app_logic)
        np.testing.assert_array_equal(_segment_labels(got.patterns, other), label_volume(session.result))
        assert _table_columns(got.extent_table) == _table_columns(nodes.extent_table)
        report = mrml_results.save_report(back, other, tmp_path / "report.html")
        assert "Extent by zone" in _report_images(report)[0]
    finally:
        for node in mrml_results.find_result_nodes(other).nodes():
            mrml_results.remove_node(node)
        mrml_results.remove_node(other)
