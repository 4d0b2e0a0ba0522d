"""Regenerate docs/slicer_result.png with Slicer's own display pipeline (no Slicer application needed).

A synthetic HRCT phantom is analysed into a real vtkMRMLScene (``slicer-core``) through the same
session code the module uses and shown as the module shows it; the picture is the slice view on the
best patch beside the 3-D view, both drawn offscreen by Slicer's displayable managers (heatmap layer,
colour legend, lung and pattern outlines, ROIs; the Lungs' surface in 3-D). The renderer is
``Testing/slicer_render.py`` (its ``--figure`` mode), which the rendering tests also use.

    .venv/bin/python ZeroShotILD/Testing/Python/make_slicer_figure.py [docs/slicer_result.png]
"""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else str(REPO / "docs" / "slicer_result.png")
    # A child process: the renderer imports torch before it makes an OpenGL context (see its docstring).
    raise SystemExit(subprocess.call([sys.executable, str(REPO / "Testing" / "slicer_render.py"), "--figure", out]))
