"""Regenerate docs/slicer_result.png: the module's MRML result rendered headless (no Slicer needed).

A synthetic HRCT phantom is analysed into a real vtkMRMLScene (``slicer-core``) through the same
session code the module uses, and the axial slice through the best patch is rendered off screen with
the CT, the heatmap layer, the lung outline, the patch outlines and a colour legend.

    .venv/bin/python ZeroShotILD/Testing/Python/make_slicer_figure.py [docs/slicer_result.png] [--model NAME]

Uses the ``phantom-demo`` model when its weights are present, else ``tiny-random`` (the caption
names the model; random weights make the probabilities meaningless, the layout is what is shown).
"""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(REPO), str(REPO / "ZeroShotILD")]

from ZeroShotILDMRML.figure import main  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0].startswith("-"):
        args = [str(REPO / "docs" / "slicer_result.png"), *args]
    raise SystemExit(main(args))
