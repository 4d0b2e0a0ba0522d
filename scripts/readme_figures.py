"""Copy the offline demo's montage and overlay into docs/ for the README (montage enlarged).

    bash scripts/demo.sh && .venv/bin/python scripts/readme_figures.py [demo_out]
"""
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
demo = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "demo_out"
montage = Image.open(demo / "montage.png")
# The demo model's input is 64 px: enlarge with nearest neighbour so the patches stay crisp.
scale = max(1, 256 // montage.width)
montage.resize((montage.width * scale, montage.height * scale), Image.NEAREST).save(ROOT / "docs" / "demo_montage.png")
Image.open(demo / "overlay.png").save(ROOT / "docs" / "demo_overlay.png")
print("wrote docs/demo_montage.png and docs/demo_overlay.png")
