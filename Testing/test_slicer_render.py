"""The module's result as Slicer's own slice and 3-D views draw it, offscreen, checked on the pixels (issue 23).

``slicer_render.py`` builds a slice view from slicer-core's slice logic and displayable managers
(no Qt, no X server: EGL or OSMesa), shows an analysed phantom the way the module does
(``mrml_results.show_result``) and measures the rendered pixels. It runs in a child process: an
OpenGL context and torch's triton in one process can crash it (see its docstring).
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' package here is not slicer-core", allow_module_level=True)

SCRIPT = REPO / "Testing" / "slicer_render.py"


def _run(*args) -> dict:
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                          cwd=str(REPO))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def rendered():
    reason = _run("--can-render")["reason"]
    if reason:
        pytest.skip(f"no offscreen OpenGL here: {reason}")
    return _run()


def test_heatmap_colour_at_each_top_patch_is_its_probability_blended_over_the_ct(rendered):
    assert len(rendered["ranks"]) == 4
    for r in rendered["ranks"]:
        rendered_rgb, expected, background = (np.array(r[k]) for k in ("rendered", "expected", "background"))
        assert np.abs(rendered_rgb - expected).max() <= 6, r  # colour table, window and 50 % opacity
    # At least the best patch is in the lung, so the heatmap really changes the pixel there.
    best = rendered["ranks"][0]
    assert best["value"] > 0 and np.abs(np.array(best["expected"]) - np.array(best["background"])).max() > 20


def test_roi_boxes_are_drawn_where_top_patches_says(rendered):
    for r in rendered["ranks"]:
        assert r["box_edge_hits"] >= 0.95, r
        assert r["shifted_box_edge_hits"] <= 0.6, r  # a box half a width away is not what was drawn


def test_colour_legend_and_lung_outline_are_drawn(rendered):
    assert rendered["legend_pixels"] > 500  # the legend's bar, labels and title
    assert rendered["lung_outline_pixels"] > 200
    assert rendered["lung_outline_on_edge"] >= 0.9  # the outline lies on the lung mask's edge


def test_lungs_are_visible_in_3d_where_they_are(rendered):
    lungs = rendered["lungs_3d"]
    assert lungs["has_surface"] and lungs["opacity"] < 1  # see-through, so the ROIs inside show
    for direction in ("anterior", "left"):  # together they check R, A and S
        seen = lungs[direction]
        assert seen["pixels"] > 5000, seen  # of 400x400
        # The drawn surface covers the lung mask's projection through the view's camera and stays on it.
        assert seen["projection_covered"] >= 0.9 and seen["drawn_within_projection"] >= 0.95, (direction, seen)
        red, green, blue = seen["colour"]
        assert blue > green > red > 10, (direction, seen)  # the Lungs' light blue, see-through over black
