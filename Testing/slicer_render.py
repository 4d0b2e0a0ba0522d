"""The module's scene drawn by Slicer's own display pipeline, offscreen, and checked pixel by pixel (issue 23).

A slice view the way Slicer's ``qMRMLSliceWidget`` builds one, without Qt: a ``vtkMRMLSliceLogic``
(reslicing and blending the CT, the heatmap layer and its threshold), the slice displayable
managers (segmentations, markups, colour legend, ...) on a renderer, and an offscreen render
window (EGL or OSMesa, whichever the VTK wheel brings; no X server, no GPU needed). It renders
what ``mrml_results.show_result`` sets up, so a wrong layer, a hidden legend or a misplaced ROI
shows in the pixels, not only in node properties.

    .venv/bin/python Testing/slicer_render.py [--png OUT.png]   # prints one JSON line of measurements
    .venv/bin/python Testing/slicer_render.py --figure docs/slicer_result.png   # the README picture

Run it in its own process (``test_slicer_render.py`` does): an OpenGL context made before torch's
triton is imported makes that import crash the process (both bring LLVM), and a crash must not
take the test session with it. Here the engine is imported first.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO / "ZeroShotILD", REPO / "Testing", REPO):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

SLICE_MANAGERS = ("vtkMRMLVolumeGlyphSliceDisplayableManager", "vtkMRMLModelSliceDisplayableManager",
                  "vtkMRMLSegmentationsDisplayableManager2D", "vtkMRMLMarkupsDisplayableManager",
                  "vtkMRMLColorLegendDisplayableManager")
THREE_D_MANAGERS = ("vtkMRMLSegmentationsDisplayableManager3D", "vtkMRMLMarkupsDisplayableManager",
                    "vtkMRMLModelDisplayableManager")


def grab_window(window):
    """What the render ``window`` shows, as an RGB uint8 array with row 0 at the top (VTK's row 0 is the bottom)."""
    import numpy as np
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.SetInputBufferTypeToRGB()
    grab.ReadFrontBufferOff()
    grab.Update()
    image = grab.GetOutput()
    w, h, _ = image.GetDimensions()
    return np.array(vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, 3)[::-1])


def _offscreen_view(headless, factory, managers, size: int) -> tuple:
    """(renderer, window, interactor, displayable-manager group) of an offscreen ``size``-pixel view whose
    ``factory`` (slice or 3-D) has ``managers`` registered, as Slicer's view widgets set them up without Qt.
    The interactor is there because markups widgets need one."""
    import slicer
    import vtk

    renderer = vtk.vtkRenderer()
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetMultiSamples(0)
    window.AddRenderer(renderer)
    window.SetSize(size, size)
    interactor = vtk.vtkRenderWindowInteractor()
    interactor.SetRenderWindow(window)
    interactor.Initialize()
    factory.SetMRMLApplicationLogic(headless.app_logic)
    for manager in managers:
        if not factory.IsDisplayableManagerRegistered(manager):
            factory.RegisterDisplayableManager(manager)
    group = slicer.vtkMRMLDisplayableManagerGroup()
    group.SetRenderer(renderer)
    group.Initialize(factory, renderer)
    return renderer, window, interactor, group


class SliceView:
    """One offscreen slice view ("Red", axial) of ``headless.scene``, ``size`` pixels square."""

    def __init__(self, headless, name: str = "Red", size: int = 400):
        import slicer
        import vtk

        self.size = size
        self.renderer, self.window, self.interactor, self.managers = _offscreen_view(
            headless, slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance(), SLICE_MANAGERS, size)
        self.renderer.GetActiveCamera().ParallelProjectionOn()
        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLApplicationLogic(headless.app_logic)
        headless.app_logic.GetSliceLogics().AddItem(self.logic)
        self.logic.SetMRMLScene(headless.scene)
        self.node = self.logic.AddSliceNode(name)
        self.managers.SetMRMLDisplayableNode(self.node)
        # The legend manager finds its slice composite node on a scene update only.
        headless.scene.StartState(headless.scene.BatchProcessState)
        headless.scene.EndState(headless.scene.BatchProcessState)
        self.logic.ResizeSliceNode(size, size)
        # The resliced, blended layers: what ctkVTKSliceView's image actor shows in Slicer.
        self.mapper = vtk.vtkImageMapper()
        self.mapper.SetColorWindow(255)
        self.mapper.SetColorLevel(127.5)
        self.image_actor = vtk.vtkActor2D()
        self.image_actor.SetMapper(self.mapper)
        self.image_actor.GetProperty().SetDisplayLocationToBackground()
        self.renderer.AddViewProp(self.image_actor)

    def render(self):
        """The view as an RGB uint8 array, row 0 at the top."""
        self.logic.ResizeSliceNode(self.size, self.size)
        self.mapper.SetInputConnection(self.logic.GetImageDataConnection())
        self.window.Render()
        return grab_window(self.window)

    def ras_to_pixel(self, ras):
        """(row, col) of the view pixel showing RAS point ``ras`` (on the current slice)."""
        import numpy as np
        import slicer

        ras_to_xy = np.linalg.inv(slicer.util.arrayFromVTKMatrix(self.node.GetXYToRAS()))
        xy = ras_to_xy @ np.r_[np.asarray(ras, float), 1.0]
        return int(round(self.size - 1 - xy[1])), int(round(xy[0]))

    def pixel_to_ras(self, row: int, col: int):
        import numpy as np
        import slicer

        xy_to_ras = slicer.util.arrayFromVTKMatrix(self.node.GetXYToRAS())
        return (xy_to_ras @ np.array([col, self.size - 1 - row, 0.0, 1.0]))[:3]


class ThreeDView:
    """One offscreen 3-D view of ``headless.scene`` as ``qMRMLThreeDView`` builds it: a view node and
    the 3-D displayable managers (segmentations as their closed surfaces, markups, models), without
    Qt; the camera looks at the lungs from the front (anterior), patient's right on the left."""

    def __init__(self, headless, size: int = 400):
        import slicer

        self.size = size
        self.renderer, self.window, self.interactor, self.managers = _offscreen_view(
            headless, slicer.vtkMRMLThreeDViewDisplayableManagerFactory.GetInstance(), THREE_D_MANAGERS, size)
        self.renderer.SetBackground(0.0, 0.0, 0.0)
        self.node = headless.scene.AddNewNodeByClass("vtkMRMLViewNode")
        self.node.SetLayoutName("1")
        self.managers.SetMRMLDisplayableNode(self.node)

    def look_at(self, bounds_ras) -> None:
        """Anterior view (from +A towards -A, S up) fitted to the RAS box ``bounds_ras`` (xmin, xmax, ...)."""
        import numpy as np

        centre = np.array([(bounds_ras[0] + bounds_ras[1]) / 2, (bounds_ras[2] + bounds_ras[3]) / 2,
                           (bounds_ras[4] + bounds_ras[5]) / 2])
        camera = self.renderer.GetActiveCamera()
        camera.SetFocalPoint(*centre)
        camera.SetPosition(*(centre + [0.0, 1000.0, 0.0]))
        camera.SetViewUp(0.0, 0.0, 1.0)
        self.renderer.ResetCamera(list(bounds_ras))

    def render(self):
        """The view as an RGB uint8 array, row 0 at the top."""
        self.renderer.ResetCameraClippingRange()
        self.window.Render()
        return grab_window(self.window)

    def ras_to_pixels(self, ras):
        """(N, 2) (row, col) of the view pixels onto which the RAS points ``ras`` (N, 3) project."""
        import numpy as np
        import slicer

        camera = self.renderer.GetActiveCamera()
        m = slicer.util.arrayFromVTKMatrix(camera.GetCompositeProjectionTransformMatrix(1.0, -1.0, 1.0))
        p = np.c_[np.asarray(ras, float), np.ones(len(ras))] @ m.T
        ndc = p[:, :2] / p[:, 3:4]
        col = (ndc[:, 0] + 1.0) / 2.0 * self.size - 0.5
        row = self.size - 1 - ((ndc[:, 1] + 1.0) / 2.0 * self.size - 0.5)
        return np.c_[np.round(row), np.round(col)].astype(int)


def measure_3d(headless, nodes, volume, lung_mask, view=None) -> dict:
    """The Lungs in the 3-D view, from the front and from the patient's left: per view, what their surface
    adds to the image against where the lung voxels project.

    Renders with every result node hidden but the Lungs, then without them; the pixels that change
    are the drawn lungs. They must cover most of the lung mask's projection (voxel centres projected
    through the view's camera) and lie within it (give or take the coarse surface), in the lungs'
    colour (blue over the black background). Two directions, so that each of R, A, S is checked.
    """
    import numpy as np
    from scipy import ndimage

    from ZeroShotILDMRML import mrml_results

    view = view or ThreeDView(headless)
    seg = nodes.lungs
    bounds = [0.0] * 6
    seg.GetRASBounds(bounds)
    _visible(nodes, lungs=True, patterns=False, rois=False, legend=False)
    ras = mrml_results.index_to_ras(volume, np.argwhere(lung_mask))
    steps = [mrml_results.index_to_ras(volume, pair) for pair in
             ([[0, 0, 0], [1, 0, 0]], [[0, 0, 0], [0, 1, 0]], [[0, 0, 0], [0, 0, 1]])]
    out = {"has_surface": bool(seg.GetSegmentation().ContainsRepresentation("Closed surface")),
           "opacity": seg.GetDisplayNode().GetOpacity3D()}
    for name, azimuth in (("anterior", 0.0), ("left", 90.0)):
        view.look_at(bounds)
        camera = view.renderer.GetActiveCamera()
        camera.Azimuth(azimuth)  # +90: the camera goes round to the patient's left (-R)
        view.renderer.ResetCamera(bounds)
        with_lungs = view.render().astype(int)
        seg.GetDisplayNode().SetVisibility(False)
        without = view.render().astype(int)
        seg.GetDisplayNode().SetVisibility(True)
        drawn = np.abs(with_lungs - without).sum(axis=2) > 20
        rc = view.ras_to_pixels(ras)
        inside = (rc[:, 0] >= 0) & (rc[:, 0] < view.size) & (rc[:, 1] >= 0) & (rc[:, 1] < view.size)
        projected = np.zeros_like(drawn)
        projected[rc[inside, 0], rc[inside, 1]] = True
        # Voxel centres are a voxel apart: close the gaps between them (a voxel's size in pixels).
        voxel_px = int(np.ceil(max(np.ptp(view.ras_to_pixels(step), axis=0).max() for step in steps)))
        pad = voxel_px + 1
        projected = ndimage.binary_closing(np.pad(projected, pad), iterations=voxel_px)[pad:-pad, pad:-pad]
        near = ndimage.binary_dilation(projected, iterations=voxel_px + 2)  # the coarse (3 mm) surface
        out[name] = {"pixels": int(drawn.sum()), "projected_pixels": int(projected.sum()),
                     "projection_covered": float((drawn & projected).sum() / max(1, projected.sum())),
                     "drawn_within_projection": float((drawn & near).sum() / max(1, drawn.sum())),
                     "colour": (with_lungs[drawn].mean(axis=0) if drawn.any() else np.zeros(3)).tolist()}
    return out


def _visible(nodes, *, lungs=True, patterns=True, rois=True, heatmap=True, legend=True):
    from ZeroShotILDMRML import mrml_results

    nodes.lungs.GetDisplayNode().SetVisibility(lungs)
    if nodes.patterns is not None:
        nodes.patterns.GetDisplayNode().SetVisibility(patterns)
    for roi in nodes.patch_rois:
        roi.GetDisplayNode().SetVisibility(rois)
    scene = nodes.heatmap.GetScene()
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode").SetForegroundOpacity(0.5 if heatmap else 0.0)
    mrml_results._legend_node(nodes.heatmap).SetVisibility(legend)


def measure(png=None) -> dict:
    """Analyse a phantom, show the result as the module does, render and measure; see the test."""
    import ZeroShotILDLib.pipeline  # noqa: F401  torch (and triton, through open_clip) before any GL context
    import open_clip  # noqa: F401
    import torchvision.ops  # noqa: F401
    import numpy as np
    import slicer
    from scipy import ndimage

    from ZeroShotILDLib.phantom import generate_phantom
    from ZeroShotILDLib.settings import AnalysisSettings
    from ZeroShotILDMRML import mrml_results
    from ZeroShotILDMRML.headless import add_ct_volume, make_scene
    from ZeroShotILDMRML.session import AnalysisSession

    p = generate_phantom(3, shape_zyx=(48, 128, 128), spacing_mm=(2.5, 2.5, 5.0),
                         subtype="idiopathic pulmonary fibrosis")
    headless = make_scene()
    volume = add_ct_volume(headless.scene, p.hu, p.spacing_mm, p.origin_mm, p.direction, "Chest CT")
    view = SliceView(headless)
    settings = AnalysisSettings(model="tiny-random", device="cpu", patch_mm=30.0, slice_step_mm=10.0, top_k=4,
                                scoring_mode="exact", prompts=["honeycombing"])
    session = AnalysisSession(volume, settings)
    session.compute()
    nodes = session.apply(app_logic=headless.app_logic)
    mrml_results.show_result(nodes, volume, app_logic=headless.app_logic, switch_layout=False, jump=False)
    view.logic.FitSliceToAll()
    result, out = session.result, {"ranks": []}

    # The default view on the best patch, and the same without the legend: the legend is drawn.
    mrml_results.jump_to_patch(nodes.patch_rois[0])
    default = view.render()
    if png:
        from PIL import Image

        Image.fromarray(default).save(png)
    _visible(nodes, legend=False)
    out["legend_pixels"] = int((np.abs(default.astype(int) - view.render().astype(int)).sum(axis=2) > 30).sum())

    heat = slicer.util.arrayFromVolume(nodes.heatmap)
    ras_to_ijk = np.linalg.inv(slicer.util.arrayFromVTKMatrix(_ijk_to_ras(volume)))
    display = nodes.heatmap.GetDisplayNode()
    lo, hi = display.GetWindowLevelMin(), display.GetWindowLevelMax()
    table = display.GetColorNode()
    for rank, roi in enumerate(nodes.patch_rois, start=1):
        mrml_results.jump_to_patch(roi)
        centre = [0.0, 0.0, 0.0]
        roi.GetCenterWorld(centre)
        row, col = view.ras_to_pixel(centre)
        # 1. The heatmap's colour at the ROI centre: CT and heatmap blended at the view's 50 %.
        _visible(nodes, lungs=False, patterns=False, rois=False, legend=False)
        blended = view.render()[row, col].astype(float)
        _visible(nodes, lungs=False, patterns=False, rois=False, heatmap=False, legend=False)
        background = view.render()[row, col].astype(float)
        i, j, k = (ras_to_ijk @ np.r_[centre, 1.0])[:3]
        value = float(heat[int(round(k)), int(round(j)), int(round(i))])
        if value > mrml_results.OUTSIDE_THRESHOLD:
            index = int(np.clip(round((value - lo) / (hi - lo) * 255), 0, 255))
            rgba = [0.0] * 4
            table.GetColor(index, rgba)
            expected = 0.5 * background + 0.5 * 255 * np.array(rgba[:3])
        else:
            expected = background  # outside the lung: transparent
        # 2. The ROI box where top_patches says: the drawn outline runs along the box's four edges.
        _visible(nodes, lungs=False, patterns=False, rois=False, heatmap=False, legend=False)
        without = view.render().astype(int)
        for other in nodes.patch_rois:
            other.GetDisplayNode().SetVisibility(other is roi)
        drawn = np.abs(view.render().astype(int) - without).sum(axis=2) > 30
        drawn = ndimage.binary_dilation(drawn, iterations=2)  # line width and rounding
        index_centre = result.ranked[rank - 1]
        pz, pr, pc = (int(result.patches.slice_index[index_centre]), int(result.patches.row0[index_centre]),
                      int(result.patches.col0[index_centre]))
        rows, cols = result.patches.size_rows, result.patches.size_cols
        corners = [(pz, pr - 0.5, pc - 0.5), (pz, pr - 0.5, pc + cols - 0.5), (pz, pr + rows - 0.5, pc + cols - 0.5),
                   (pz, pr + rows - 0.5, pc - 0.5)]
        pixels = [view.ras_to_pixel(mrml_results.index_to_ras(volume, list(c))[0]) for c in corners]
        # Control: the same box moved by half its width is not what was drawn.
        shifted = [view.ras_to_pixel(mrml_results.index_to_ras(volume, [z, r, c + cols / 2])[0]) for z, r, c in corners]
        out["ranks"].append({"rank": rank, "value": value, "rendered": blended.tolist(), "expected": expected.tolist(),
                             "background": background.tolist(), "box_edge_hits": _edge_hits(drawn, pixels),
                             "shifted_box_edge_hits": _edge_hits(drawn, shifted)})

    # 3. The lung outline: what the Lungs segmentation adds lies on the lung's edge in that slice.
    mrml_results.jump_to_patch(nodes.patch_rois[0])
    _visible(nodes, lungs=False, patterns=False, rois=False, heatmap=False, legend=False)
    without = view.render().astype(int)
    _visible(nodes, lungs=True, patterns=False, rois=False, heatmap=False, legend=False)
    added = np.argwhere(np.abs(view.render().astype(int) - without).sum(axis=2) > 30)
    lung = result.lung_mask.astype(bool)
    edge = lung ^ ndimage.binary_erosion(lung, iterations=1)
    distance = ndimage.distance_transform_edt(~edge)
    on_edge = []
    for row, col in added:
        i, j, k = (ras_to_ijk @ np.r_[view.pixel_to_ras(row, col), 1.0])[:3]
        k, j, i = int(round(k)), int(round(j)), int(round(i))
        if 0 <= k < lung.shape[0] and 0 <= j < lung.shape[1] and 0 <= i < lung.shape[2]:
            on_edge.append(distance[k, j, i] <= 1.5)
    out["lung_outline_pixels"] = int(len(added))
    out["lung_outline_on_edge"] = float(np.mean(on_edge)) if on_edge else 0.0
    # 4. The Lungs in 3-D.
    out["lungs_3d"] = measure_3d(headless, nodes, volume, result.lung_mask)
    return out


def figure(png, *, model: str = "phantom-demo", prompt: str = "honeycombing", top_k: int = 8, size: int = 480) -> dict:
    """The README picture: a phantom analysed as the module does, its default slice view (on the best
    patch) beside the 3-D view, both drawn by Slicer's displayable managers; written to ``png``."""
    import ZeroShotILDLib.pipeline  # noqa: F401  torch (and triton) before any GL context, as in measure()
    import open_clip  # noqa: F401
    import torchvision.ops  # noqa: F401
    import numpy as np
    from PIL import Image

    from ZeroShotILDLib.phantom import generate_phantom
    from ZeroShotILDLib.settings import AnalysisSettings
    from ZeroShotILDMRML import mrml_results
    from ZeroShotILDMRML.headless import add_ct_volume, make_scene
    from ZeroShotILDMRML.session import AnalysisSession

    p = generate_phantom(3, subtype="idiopathic pulmonary fibrosis")
    headless = make_scene()
    volume = add_ct_volume(headless.scene, p.hu, p.spacing_mm, p.origin_mm, p.direction, "Phantom CT")
    view = SliceView(headless, size=size)
    session = AnalysisSession(volume, AnalysisSettings(model=model, device="cpu", prompts=[prompt], top_k=top_k,
                                                       slice_step_mm=5.0))
    session.compute()
    nodes = session.apply(app_logic=headless.app_logic)
    mrml_results.show_result(nodes, volume, app_logic=headless.app_logic, switch_layout=False, jump=False)
    view.logic.FitSliceToAll()
    mrml_results.jump_to_patch(nodes.patch_rois[0])
    slice_rgb = view.render()
    three_d = ThreeDView(headless, size=size)
    bounds = [0.0] * 6
    nodes.lungs.GetRASBounds(bounds)
    three_d.look_at(bounds)
    camera = three_d.renderer.GetActiveCamera()
    camera.Azimuth(-35.0)  # from the front and the patient's right, slightly above: the ROIs as boxes
    camera.Elevation(20.0)
    camera.OrthogonalizeViewUp()
    three_d.renderer.ResetCamera(bounds)
    three_d_rgb = three_d.render()
    gap = np.full((size, 6, 3), 40, dtype=np.uint8)
    Image.fromarray(np.concatenate([slice_rgb, gap, three_d_rgb], axis=1)).save(png)
    result = session.result
    return {"png": str(png), "model": result.model_name, "prompt": result.primary_prompt,
            "shape_zyx": list(result.shape_zyx), "top_k": len(nodes.patch_rois)}


def _edge_hits(drawn, pixels) -> float:
    """Share of points along the closed polygon ``pixels`` ((row, col) corners) where ``drawn`` is set."""
    import numpy as np

    hits = total = 0
    for a, b in zip(pixels, pixels[1:] + pixels[:1]):
        for t in np.linspace(0.1, 0.9, 17):
            r, c = int(round(a[0] + t * (b[0] - a[0]))), int(round(a[1] + t * (b[1] - a[1])))
            total += 1
            hits += bool(0 <= r < drawn.shape[0] and 0 <= c < drawn.shape[1] and drawn[r, c])
    return hits / total


def can_render() -> str:
    """"" when an offscreen OpenGL window renders here, else why not (one line)."""
    import numpy as np
    import vtk

    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    renderer = vtk.vtkRenderer()
    renderer.SetBackground(1.0, 0.0, 0.0)
    window.AddRenderer(renderer)
    window.SetSize(8, 8)
    window.Render()
    pixels = grab_window(window)
    if pixels.size == 0 or not np.all(pixels[..., 0] == 255):
        return f"offscreen rendering with {window.GetClassName()} gave no image"
    return ""


def _ijk_to_ras(volume):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    return matrix


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--png", help="also save the default view here")
    parser.add_argument("--can-render", action="store_true", help="only check that offscreen rendering works")
    parser.add_argument("--figure", metavar="OUT.png",
                        help="only write the README picture (docs/slicer_result.png): slice and 3-D view, phantom-demo")
    args = parser.parse_args(argv)
    if args.figure:
        print(json.dumps(figure(args.figure)))
        return 0
    if args.can_render:
        reason = can_render()
        print(json.dumps({"reason": reason}))
        return 0
    print(json.dumps(measure(args.png)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
