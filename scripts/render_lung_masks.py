"""Render the lung mask of each real CT in ../shared/data/real/ct as an overlay PNG in docs/.

    .venv/bin/python scripts/render_lung_masks.py [--data ../shared/data/real/ct] [--out docs]

Each figure shows three axial slices (at 25 %, 50 % and 75 % of the lung's extent) and the
coronal slice through the lungs' centre, lung window, mask outline in yellow. The real data is
never committed; the overlays are how a reviewer sees that the mask "looks right".

Two more figures show the body mask at work (issue 15), each array drawn as it is stored:
``lung_mask_osic_ipf_sparse_prone_table_rotated.png``, the IPF case with a full-width table
added against the anterior chest (as prone) and the array stored rotated by 90 degrees; and
``lung_mask_phantom_prone_full_table.png``, a fibrotic phantom lying prone on a full-width table
that touches the chest, stored rotated the other way (the table's foam core is as dense as lung;
the body outline is drawn in cyan).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage as ndi

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ZeroShotILDLib.errors import InputError  # noqa: E402
from ZeroShotILDLib.lung_mask import lung_volume_ml, segment_body, segment_lungs  # noqa: E402
from ZeroShotILDLib.phantom import add_full_width_table, generate_phantom  # noqa: E402
from ZeroShotILDLib.scan import read_scan  # noqa: E402
from ZeroShotILDLib.settings import LUNG_WINDOW_HU  # noqa: E402

ITEMS = ["totalseg/chest_crop_a.nii.gz", "totalseg/chest_crop_b.nii.gz", "totalseg/abdomen_lung_bases.nii.gz",
         "totalseg/abdomen_dicom_series", "lidc_slices", "osic_ipf_sparse"]
PANEL_PX = 256


def _outline(mask2) -> np.ndarray:
    return mask2 & ~ndi.binary_erosion(mask2)


def _panel(hu2, mask2, aspect_row_over_col: float, body2=None) -> Image.Image:
    lo, hi = LUNG_WINDOW_HU
    grey = np.clip((hu2.astype(np.float32) - lo) / (hi - lo), 0, 1)
    rows = max(1, int(round(PANEL_PX * aspect_row_over_col * hu2.shape[0] / hu2.shape[1])))
    size = (PANEL_PX, rows)
    rgb = np.asarray(Image.fromarray((grey * 255).astype(np.uint8)).resize(size, Image.BILINEAR))
    rgb = np.repeat(rgb[..., None], 3, axis=2).copy()
    for m, colour in ((body2, (0, 200, 255)), (mask2, (255, 220, 0))):
        if m is not None:
            edge = np.asarray(Image.fromarray(_outline(m).astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 0
            rgb[edge] = colour
    return Image.fromarray(rgb)


def render_volume(hu, spacing_mm, title: str, out_png: Path, *, show_body: bool = False) -> str:
    """Overlay of ``segment_lungs`` on ``hu`` [z, y, x] as stored; returns the figure's label."""
    t0 = time.perf_counter()
    mask = segment_lungs(hu, spacing_mm, source=title)
    seconds = time.perf_counter() - t0
    body = segment_body(hu, spacing_mm) if show_body else None
    sx, sy, sz = spacing_mm
    zs = np.flatnonzero(mask.any(axis=(1, 2)))
    picks = sorted({int(zs[int(q * (len(zs) - 1))]) for q in (0.25, 0.5, 0.75)})
    panels = [_panel(hu[z], mask[z], sy / sx, body[z] if body is not None else None) for z in picks]
    if hu.shape[0] > 8:  # a coronal view says little for a handful of sparse slices
        y = int(np.median(np.nonzero(mask)[1]))
        panels.append(_panel(hu[::-1, y, :], mask[::-1, y, :], sz / sx,
                             body[::-1, y, :] if body is not None else None))
    height = max(p.height for p in panels) + 18
    sheet = Image.new("RGB", (PANEL_PX * len(panels), height), "black")
    for i, p in enumerate(panels):
        sheet.paste(p, (i * PANEL_PX, 18))
    volume = lung_volume_ml(mask, spacing_mm)
    label = f"{title}: {hu.shape[2]}x{hu.shape[1]}x{hu.shape[0]}, lungs {volume:.0f} mL, {seconds:.1f} s"
    ImageDraw.Draw(sheet).text((4, 3), label, fill=(255, 255, 255))
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png)
    return label


def render(path: Path, out_png: Path) -> str:
    scan = read_scan(path)
    return render_volume(scan.hu, scan.spacing_mm, path.name, out_png)


def _rotate(hu, spacing_mm, clockwise: bool):
    """The array stored rotated by 90 degrees in-plane (transpose + flip), with its spacing."""
    a = hu.transpose(0, 2, 1)
    a = a[:, :, ::-1] if clockwise else a[:, ::-1, :]
    return np.ascontiguousarray(a), (spacing_mm[1], spacing_mm[0], spacing_mm[2])


def _crop_to_body(hu, spacing_mm, margin_mm: float = 50.0):
    """The array cut to the body's bounding box plus ``margin_mm`` (the table lies within it), for legibility."""
    body = segment_body(hu, spacing_mm)
    box = []
    for axis, d in ((1, spacing_mm[1]), (2, spacing_mm[0])):
        idx = np.flatnonzero(body.any(axis=tuple(a for a in (0, 1, 2) if a != axis)))
        m = int(round(margin_mm / d))
        box.append(slice(max(idx[0] - m, 0), idx[-1] + m + 1))
    return np.ascontiguousarray(hu[:, box[0], box[1]])


def render_prone_table(data: Path, out: Path) -> list:
    """The two body-mask figures: a real IPF CT and a phantom, prone on a full-width table, rotated."""
    labels = []
    scan = read_scan(data / "osic_ipf_sparse")
    hu, _ = add_full_width_table(scan.hu, scan.spacing_mm, segment_body(scan.hu, scan.spacing_mm),
                                 side="above", gap_mm=0.0)
    hu, spacing = _rotate(hu, scan.spacing_mm, clockwise=True)
    hu = _crop_to_body(hu, spacing)
    labels.append(render_volume(hu, spacing, "osic_ipf_sparse + full-width table (prone), rotated 90, cropped",
                                out / "lung_mask_osic_ipf_sparse_prone_table_rotated.png", show_body=True))
    ph = generate_phantom(11, shape_zyx=(96, 192, 192), spacing_mm=(1.8, 1.8, 3.0),
                          subtype="idiopathic pulmonary fibrosis", table="full", position="prone",
                          table_gap_mm=0.0, padding_value=-3024)
    hu, spacing = _rotate(ph.hu, ph.spacing_mm, clockwise=False)
    labels.append(render_volume(hu, spacing, "phantom, prone on a full-width table, rotated -90",
                                out / "lung_mask_phantom_prone_full_table.png", show_body=True))
    return labels


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
    for label in render_prone_table(args.data, args.out):
        print(label)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
