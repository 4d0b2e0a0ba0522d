"""Headless rendering of a result the way a Slicer slice view shows it (docs figure, tests).

The slice image comes from Slicer's own slice pipeline (``vtkMRMLSliceLogic``): CT as background,
the heatmap as foreground with its colour table, threshold and opacity, and the lung segmentation
as a label outline. The patch ROIs, their names and a colour legend are drawn on top with VTK 2-D
actors and the whole is rendered off screen to PNG. Meant for scenes without views (``slicer-core``
or a batch script); it adds a temporary slice node and removes it again.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import slicer
import vtk

from .mrml_results import OUTLINE_COLOR, ResultNodes, _legend_node

_LAYOUT_NAME = "ZeroShotILDFigure"


def _slice_image(scene, app_logic, input_volume, heatmap, labelmap, size_px, opacity, center_ras):
    """(RGBA uint8 [H, W, 4] with row 0 at the bottom, slice node, slice logic) through ``center_ras``."""
    logic = slicer.vtkMRMLSliceLogic()
    logic.SetMRMLScene(scene)
    if app_logic is not None:
        logic.SetMRMLApplicationLogic(app_logic)
    slice_node = logic.AddSliceNode(_LAYOUT_NAME)
    composite = logic.GetSliceCompositeNode()
    composite.SetBackgroundVolumeID(input_volume.GetID())
    composite.SetForegroundVolumeID(heatmap.GetID() if heatmap is not None else None)
    composite.SetForegroundOpacity(float(opacity))
    composite.SetLabelVolumeID(labelmap.GetID() if labelmap is not None else None)
    composite.SetLabelOpacity(1.0)
    slice_node.SetUseLabelOutline(True)
    slice_node.SetOrientationToAxial()
    slice_node.SetDimensions(int(size_px[0]), int(size_px[1]), 1)
    logic.FitSliceToAll()
    # Axial view: the slice offset is the S coordinate; the field of view stays fitted to the CT.
    logic.SetSliceOffset(float(center_ras[2]))
    producer = logic.GetImageDataConnection().GetProducer()
    producer.Update()
    image = producer.GetOutputDataObject(0)
    nx, ny, _ = image.GetDimensions()
    from vtk.util.numpy_support import vtk_to_numpy

    rgba = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(ny, nx, -1).copy()
    if rgba.shape[2] == 4:
        # Outside the volume the blend is transparent; a view shows black there.
        alpha = rgba[..., 3:4].astype(np.float32) / 255.0
        rgba[..., :3] = (rgba[..., :3].astype(np.float32) * alpha).astype(np.uint8)
    return rgba, slice_node, logic


def _ras_to_xy(slice_node, ras_points: np.ndarray) -> np.ndarray:
    xy_to_ras = slicer.util.arrayFromVTKMatrix(slice_node.GetXYToRAS())
    ras_to_xy = np.linalg.inv(xy_to_ras)
    pts = np.concatenate([ras_points, np.ones((ras_points.shape[0], 1))], axis=1)
    return (pts @ ras_to_xy.T)[:, :2]


def roi_outline_ras(roi) -> tuple[np.ndarray, np.ndarray, float]:
    """(4 in-plane corners in world RAS, centre, half thickness in mm) of a patch ROI."""
    size = roi.GetSize()
    object_to_world = slicer.util.arrayFromVTKMatrix(roi.GetObjectToWorldMatrix())
    hx, hy = size[0] / 2.0, size[1] / 2.0
    corners = np.array([[-hx, -hy, 0, 1], [hx, -hy, 0, 1], [hx, hy, 0, 1], [-hx, hy, 0, 1]], dtype=np.float64)
    world = (corners @ object_to_world.T)[:, :3]
    centre = object_to_world[:3, 3]
    return world, centre, size[2] / 2.0


def patches_on_slice(nodes: ResultNodes, slice_node) -> list:
    """(rank, roi) of the patch ROIs that the slice plane passes through."""
    slice_to_ras = slicer.util.arrayFromVTKMatrix(slice_node.GetSliceToRAS())
    normal = slice_to_ras[:3, 2] / np.linalg.norm(slice_to_ras[:3, 2])
    origin = slice_to_ras[:3, 3]
    out = []
    for rank, roi in enumerate(nodes.patch_rois, start=1):
        _, centre, half = roi_outline_ras(roi)
        if abs(float(np.dot(centre - origin, normal))) <= half + 1e-6:
            out.append((rank, roi))
    return out


def render_slice_figure(nodes: ResultNodes, input_volume, path, *, app_logic=None, size_px=(640, 640),
                        opacity: float = 0.5, rank: int = 1, title: Optional[str] = None) -> Path:
    """Render the axial slice through the patch of ``rank`` (1 = most probable) to a PNG.

    Parameters
    ----------
    nodes : ResultNodes
        Output of ``mrml_results.write_result``.
    input_volume : vtkMRMLScalarVolumeNode
        The CT the result belongs to.
    path : path-like
        PNG file to write.
    size_px : (width, height)
        Size of the slice image in pixels; default (640, 640).
    opacity : float
        Heatmap opacity over the CT; default 0.5 (the module's default).
    """
    scene = input_volume.GetScene()
    roi = nodes.patch_rois[rank - 1]
    centre = [0.0, 0.0, 0.0]
    roi.GetCenterWorld(centre)
    # Everything added for the rendering (labelmap, its colour table and display node, the slice and
    # composite nodes) is temporary: whatever is new in the scene afterwards is removed again.
    existing = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        labelmap = None
        if nodes.lungs is not None:
            labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "ZeroShotILD figure lungs")
            ids = vtk.vtkStringArray()
            nodes.lungs.GetSegmentation().GetSegmentIDs(ids)
            slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(nodes.lungs, ids, labelmap, input_volume)
        rgba, slice_node, _logic = _slice_image(scene, app_logic, input_volume, nodes.heatmap, labelmap, size_px,
                                                opacity, centre)
        visible = patches_on_slice(nodes, slice_node)
        outlines = [(r, _ras_to_xy(slice_node, roi_outline_ras(n)[0])) for r, n in visible]
        z_index = _slice_index(input_volume, centre)
    finally:
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in reversed([n for n in added if n.GetID() not in existing]):
            if node.GetScene() is scene:
                scene.RemoveNode(node)
    prompt = nodes.heatmap.GetAttribute("ZeroShotILD.Prompt") if nodes.heatmap is not None else ""
    if title is None:
        title = f"ZeroShotILD: P({prompt}), axial slice {z_index}, top patches outlined"
    return _render_png(rgba, outlines, nodes, title, Path(path))


def _slice_index(volume, ras) -> int:
    ras_to_ijk = np.linalg.inv(slicer.util.arrayFromVTKMatrix(_ijk_to_ras_vtk(volume)))
    ijk = ras_to_ijk @ np.array([*ras, 1.0])
    return int(round(ijk[2]))


def _ijk_to_ras_vtk(volume):
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    return m


def _lookup_table(heatmap):
    display = heatmap.GetDisplayNode()
    color = display.GetColorNode()
    table = vtk.vtkLookupTable()
    table.DeepCopy(color.GetLookupTable())
    table.SetRange(display.GetWindowLevelMin(), display.GetWindowLevelMax())
    return table


def _render_png(rgba: np.ndarray, outlines, nodes: ResultNodes, title: str, path: Path) -> Path:
    from vtk.util.numpy_support import numpy_to_vtk

    height, width = rgba.shape[:2]
    legend_w, title_h = 150, 34
    image = vtk.vtkImageData()
    image.SetDimensions(width, height, 1)
    image.GetPointData().SetScalars(numpy_to_vtk(np.ascontiguousarray(rgba[..., :3]).reshape(-1, 3), deep=True,
                                                 array_type=vtk.VTK_UNSIGNED_CHAR))
    mapper = vtk.vtkImageMapper()
    mapper.SetInputData(image)
    mapper.SetColorWindow(255.0)
    mapper.SetColorLevel(127.5)
    image_actor = vtk.vtkActor2D()
    image_actor.SetMapper(mapper)

    renderer = vtk.vtkRenderer()
    renderer.SetBackground(0.08, 0.09, 0.12)
    renderer.AddViewProp(image_actor)

    points = vtk.vtkPoints()
    lines = vtk.vtkCellArray()
    for rank, xy in outlines:
        ids = [points.InsertNextPoint(float(x), float(y), 0.0) for x, y in xy]
        polyline = vtk.vtkPolyLine()
        polyline.GetPointIds().SetNumberOfIds(5)
        for k, pid in enumerate(ids + ids[:1]):
            polyline.GetPointIds().SetId(k, pid)
        lines.InsertNextCell(polyline)
        label = vtk.vtkTextActor()
        label.SetInput(nodes.patch_rois[rank - 1].GetName())
        label.GetTextProperty().SetColor(*OUTLINE_COLOR)
        label.GetTextProperty().SetFontSize(13)
        label.GetTextProperty().BoldOn()
        label.GetTextProperty().ShadowOn()
        label.SetDisplayPosition(int(xy[:, 0].min()) + 3, int(xy[:, 1].max()) + 2)
        renderer.AddViewProp(label)
    poly = vtk.vtkPolyData()
    poly.SetPoints(points)
    poly.SetLines(lines)
    outline_mapper = vtk.vtkPolyDataMapper2D()
    outline_mapper.SetInputData(poly)
    outline_actor = vtk.vtkActor2D()
    outline_actor.SetMapper(outline_mapper)
    outline_actor.GetProperty().SetColor(*OUTLINE_COLOR)
    outline_actor.GetProperty().SetLineWidth(2.0)
    renderer.AddViewProp(outline_actor)

    if nodes.heatmap is not None:
        bar = vtk.vtkScalarBarActor()
        bar.SetLookupTable(_lookup_table(nodes.heatmap))
        # Title, label format and label count of the heatmap's own colour legend: what Slicer shows.
        legend = _legend_node(nodes.heatmap)
        title_text = legend.GetTitleText() if legend is not None else "P"
        bar.SetTitle(title_text.replace(", ", "\n", 1))
        bar.SetLabelFormat(legend.GetLabelFormat() if legend is not None else "%.2f")
        bar.SetNumberOfLabels(legend.GetNumberOfLabels() if legend is not None else 5)
        bar.UnconstrainedFontSizeOn()
        bar.SetMaximumWidthInPixels(legend_w - 20)
        bar.GetPositionCoordinate().SetCoordinateSystemToDisplay()
        bar.GetPositionCoordinate().SetValue(width + 8, 20)
        bar.GetPosition2Coordinate().SetCoordinateSystemToDisplay()
        bar.GetPosition2Coordinate().SetValue(legend_w - 16, height - 60)
        for prop, size in ((bar.GetTitleTextProperty(), 16), (bar.GetLabelTextProperty(), 13)):
            prop.SetColor(1, 1, 1)
            prop.SetFontSize(size)
            prop.ItalicOff()
            prop.ShadowOff()
        renderer.AddViewProp(bar)

    caption = vtk.vtkTextActor()
    caption.SetInput(title)
    caption.GetTextProperty().SetColor(1.0, 1.0, 0.6)
    caption.GetTextProperty().SetFontSize(15)
    caption.SetDisplayPosition(8, height + 9)
    renderer.AddViewProp(caption)

    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(width + legend_w, height + title_h)
    window.AddRenderer(renderer)
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.ReadFrontBufferOff()
    grab.Update()
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()
    window.Finalize()
    return path


def main(argv=None) -> int:
    """Regenerate the README figure: a phantom analysed into a headless scene, rendered to PNG.

    ``PYTHONPATH=ZeroShotILD python -m ZeroShotILDMRML.figure docs/slicer_result.png``
    """
    import argparse

    from ZeroShotILDLib.models import get_spec
    from ZeroShotILDLib.errors import InputError
    from ZeroShotILDLib.phantom import generate_phantom
    from ZeroShotILDLib.settings import AnalysisSettings

    from .headless import add_ct_volume, make_scene
    from .session import AnalysisSession

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("out", help="PNG file to write")
    parser.add_argument("--model", default="phantom-demo",
                        help="model name (default phantom-demo; tiny-random when its weights are absent)")
    parser.add_argument("--prompt", default="honeycombing")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--heatmap-range", default=None, help="relative (default, the module's default) or 'fixed 0-1'")
    args = parser.parse_args(argv)

    phantom = generate_phantom(args.seed, subtype="idiopathic pulmonary fibrosis")
    headless = make_scene()
    scene, app = headless.scene, headless.app_logic
    volume = add_ct_volume(scene, phantom.hu, phantom.spacing_mm, phantom.origin_mm, phantom.direction, "Phantom CT")
    model = args.model
    settings = AnalysisSettings(model=model, device="cpu", prompts=[args.prompt], top_k=args.top_k, slice_step_mm=5.0)
    session = AnalysisSession(volume, settings)
    try:
        session.compute()
    except InputError as exc:
        if model == "tiny-random" or get_spec(model).source != "package":
            raise
        print(f"{model} unavailable ({exc}); using tiny-random")
        session = AnalysisSession(volume, AnalysisSettings(**{**settings.to_dict(), "model": "tiny-random", "lung": settings.lung}))
        session.compute()
    nodes = session.apply(app_logic=app)
    if args.heatmap_range:
        from .mrml_results import set_heatmap_range

        set_heatmap_range(nodes.heatmap, args.heatmap_range)
    result = session.result
    caption = f"ZeroShotILD in a Slicer scene: P({args.prompt}) heatmap, lungs and top-{args.top_k} patches ({result.model_name})"
    if result.model_warning:
        from .mrml_results import short_warning

        caption += f" - {short_warning(result.model_warning)}"
    out = render_slice_figure(nodes, volume, args.out, app_logic=app, title=caption)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
