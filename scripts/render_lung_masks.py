"""Render the lung mask of each real CT in ../shared/data/real/ct as an overlay PNG in docs/.

    .venv/bin/python scripts/render_lung_masks.py [--data ../shared/data/real/ct] [--out docs]

Each figure shows three axial slices (at 25 %, 50 % and 75 % of the lung's extent) and the
coronal slice through the lungs' centre, lung window, mask outline in yellow. The real data is
never committed; the overlays are how a reviewer sees that the mask "looks right".
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from skimage.segmentation import find_boundaries
from skimage.transform import resize

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ZeroShotILDLib.errors import InputError  # noqa: E402
from ZeroShotILDLib.lung_mask import lung_volume_ml, segment_lungs  # noqa: E402
from ZeroShotILDLib.scan import read_scan  # noqa: E402
from ZeroShotILDLib.settings import LUNG_WINDOW_HU  # noqa: E402

ITEMS = ["totalseg/chest_crop_a.nii.gz", "totalseg/chest_crop_b.nii.gz", "totalseg/abdomen_lung_bases.nii.gz",
         "totalseg/abdomen_dicom_series", "lidc_slices", "osic_ipf_sparse"]
PANEL_PX = 256


def _panel(hu2, mask2, aspect_row_over_col: float) -> Image.Image:
    lo, hi = LUNG_WINDOW_HU
    grey = np.clip((hu2.astype(np.float32) - lo) / (hi - lo), 0, 1)
    rows = max(1, int(round(PANEL_PX * aspect_row_over_col * hu2.shape[0] / hu2.shape[1])))
    grey = resize(grey, (rows, PANEL_PX), order=1, anti_aliasing=True)
    edge = resize(find_boundaries(mask2, mode="inner").astype(np.float32), (rows, PANEL_PX), order=0) > 0
    rgb = np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=2)
    rgb[edge] = (255, 220, 0)
    return Image.fromarray(rgb)


def render(path: Path, out_png: Path) -> str:
    scan = read_scan(path)
    t0 = time.perf_counter()
    mask = segment_lungs(scan.hu, scan.spacing_mm, source=path.name)
    seconds = time.perf_counter() - t0
    sx, sy, sz = scan.spacing_mm
    zs = np.flatnonzero(mask.any(axis=(1, 2)))
    picks = sorted({int(zs[int(q * (len(zs) - 1))]) for q in (0.25, 0.5, 0.75)})
    panels = [_panel(scan.hu[z], mask[z], sy / sx) for z in picks]
    if scan.hu.shape[0] > 8:  # a coronal view says little for a handful of sparse slices
        y = int(np.median(np.nonzero(mask)[1]))
        panels.append(_panel(scan.hu[::-1, y, :], mask[::-1, y, :], sz / sx))
    height = max(p.height for p in panels) + 18
    sheet = Image.new("RGB", (PANEL_PX * len(panels), height), "black")
    for i, p in enumerate(panels):
        sheet.paste(p, (i * PANEL_PX, 18))
    volume = lung_volume_ml(mask, scan.spacing_mm)
    label = f"{path.name}: {scan.hu.shape[2]}x{scan.hu.shape[1]}x{scan.hu.shape[0]}, lungs {volume:.0f} mL, {seconds:.1f} s"
    ImageDraw.Draw(sheet).text((4, 3), label, fill=(255, 255, 255))
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png)
    return label


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "real" / "ct")
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        print(f"error: {args.data} not found: point --data at the real CT folder", file=sys.stderr)
        return 2
    for item in ITEMS:
        name = item.replace("/", "_").replace(".nii.gz", "")
        try:
            print(render(args.data / item, args.out / f"lung_mask_{name}.png"))
        except InputError as exc:
            print(f"{item}: {exc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
