"""Pictures people look at instead of numbers: key images (heatmap over the CT, top patches boxed) and the
pattern map, cropped to the body, with the patient's R/L and A/P sides marked and a colour scale.

A reader must be able to find a key image in PACS and read it on paper, so every picture here:

- is cropped to the body (one crop for all pictures of a report, so they share a scale) and resampled
  to square millimetres, at a width that prints sharp at about 6 cm;
- marks each edge with the patient side it faces, read from the scan's direction cosines (a scan stored
  flipped or feet-first is labelled as it is shown, never assumed to be in radiological convention);
- carries its colour scale: the heatmap's probabilities, or the pattern colours (the Slicer segment
  colours of ``patterns.ctbl``; the legend itself is HTML in the report).

Where a slice is (DICOM Instance Number, z in mm) is the report's caption, from ``slice_position``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .results import AnalysisResult
from .scan import Scan, dicom_header

# Anchor colours of a perceptually ordered "inferno"-like ramp (black-purple-orange-yellow).
_RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)
#: Width (px) of a key image's picture part: ~6 cm at 250 dpi, so the printed report stays sharp.
KEY_IMAGE_WIDTH = 560
#: Width (px) of the colour-scale strip added to the right of a heatmap picture.
SCALE_WIDTH = 92
#: Body: tissue above this HU (skin, fat ~ -100, muscle) in the largest connected piece of the slice.
BODY_HU = -500.0
#: Crop margin around the body (mm), so the skin line is not on the picture's edge.
BODY_MARGIN_MM = 6.0
_OUTLINE = (0, 255, 255)


def colorize(values01: np.ndarray) -> np.ndarray:
    """[0,1] floats -> uint8 RGB through the ramp above."""
    x = np.clip(values01, 0, 1) * (len(_RAMP) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_RAMP) - 2)
    t = (x - lo)[..., None]
    return (_RAMP[lo] * (1 - t) + _RAMP[lo + 1] * t).astype(np.uint8)


def window_to_uint8(hu_slice: np.ndarray, hu_window=(-1350.0, 150.0)) -> np.ndarray:
    lo, hi = hu_window
    return (np.clip((hu_slice.astype(np.float32) - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def font(size: int) -> ImageFont.ImageFont:
    """Pillow's scalable built-in font (no system font needed), or its bitmap font without FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow built without FreeType
        return ImageFont.load_default()


# ----------------------------------------------------------------------------------------------
# Where things are: patient sides of the picture's edges, body crop, slice position
# ----------------------------------------------------------------------------------------------
def edge_labels(direction) -> dict:
    """{"left", "right", "top", "bottom"} -> the patient side ("R", "L", "A", "P", "S", "I") that edge faces.

    ``direction`` is SimpleITK's row-major 3x3 (LPS): its first column is the patient direction of
    increasing column index (the picture's rightwards), its second that of increasing row (downwards).
    """
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    names = (("R", "L"), ("A", "P"), ("I", "S"))  # LPS: -x is R, +x is L; -y A, +y P; -z I, +z S

    def toward(vector) -> str:
        axis = int(np.argmax(np.abs(vector)))
        return names[axis][1 if vector[axis] > 0 else 0]

    right, down = d[:, 0], d[:, 1]
    return {"right": toward(right), "left": toward(-right), "bottom": toward(down), "top": toward(-down)}


def body_box(hu_slice: np.ndarray) -> Optional[tuple]:
    """(row0, row1, col0, col1) of the largest connected piece above ``BODY_HU`` (the body; the table and
    the scanner's field-of-view ring are other pieces), or None when the slice holds no tissue."""
    from scipy import ndimage

    tissue = np.asarray(hu_slice) > BODY_HU
    if not tissue.any():
        return None
    labels, count = ndimage.label(tissue)
    if count > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        tissue = labels == int(np.argmax(sizes))
    rows, cols = np.flatnonzero(tissue.any(axis=1)), np.flatnonzero(tissue.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def body_crop(scan: Scan, slices: Sequence[int], lung_mask: Optional[np.ndarray] = None) -> tuple:
    """One crop (row0, row1, col0, col1) holding the body on every slice in ``slices`` (and the lungs), with a
    margin; the whole slice when no body is found. One crop for all key images keeps them on one scale."""
    ny, nx = scan.hu.shape[1:]
    boxes = [b for b in (body_box(scan.hu[int(z)]) for z in slices) if b is not None]
    if lung_mask is not None:
        for z in slices:
            m = np.asarray(lung_mask[int(z)], dtype=bool)
            if m.any():
                r, c = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
                boxes.append((int(r[0]), int(r[-1]) + 1, int(c[0]), int(c[-1]) + 1))
    if not boxes:
        return 0, ny, 0, nx
    my = int(round(BODY_MARGIN_MM / float(scan.spacing_mm[1])))
    mx = int(round(BODY_MARGIN_MM / float(scan.spacing_mm[0])))
    r0, r1 = max(0, min(b[0] for b in boxes) - my), min(ny, max(b[1] for b in boxes) + my)
    c0, c1 = max(0, min(b[2] for b in boxes) - mx), min(nx, max(b[3] for b in boxes) + mx)
    return r0, r1, c0, c1


@dataclass
class SlicePosition:
    """Where a slice is, in the words a PACS viewer uses: its DICOM Instance Number (None for other input),
    its position z (mm, patient superior axis), and its index in the analysed volume (0 = first)."""

    index: int
    count: int
    z_mm: float
    instance: Optional[int] = None

    def caption(self) -> str:
        where = f"z = {self.z_mm:.1f} mm"
        if self.instance is not None:
            return f"image {self.instance}, {where}"
        return f"slice {self.index + 1} of {self.count}, {where}"


def slice_position(scan: Scan, z: int) -> SlicePosition:
    """The position of slice ``z`` of ``scan``. For a DICOM series read on its own planes (``Scan.dicom_files``),
    the source image's Instance Number and the z of its Image Position (what PACS shows); otherwise the
    patient S coordinate of the slice's centre."""
    z = int(z)
    ny, nx = scan.hu.shape[1:]
    s_mm = float(scan.index_to_ras(np.array([[z, (ny - 1) / 2.0, (nx - 1) / 2.0]]))[0, 2])
    instance = None
    files = scan.dicom_files
    if files is not None and len(files) == scan.hu.shape[0]:
        instance, ipp_z = _dicom_instance(files[z])
        if ipp_z is not None:
            s_mm = ipp_z
    return SlicePosition(index=z, count=int(scan.hu.shape[0]), z_mm=s_mm, instance=instance)


def _dicom_instance(path) -> tuple:
    """(Instance Number, Image Position z) of a DICOM file's header; None for what it lacks or cannot be read."""
    reader = dicom_header(path)
    if reader is None:
        return None, None

    def number(key: str, index: int = 0):
        if not reader.HasMetaDataKey(key):
            return None
        try:
            return float(reader.GetMetaData(key).strip().split("\\")[index])
        except (ValueError, IndexError):
            return None

    instance = number("0020|0013")
    return (int(instance) if instance is not None else None), number("0020|0032", 2)


# ----------------------------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------------------------
def _to_mm_grid(rgb: np.ndarray, spacing_xy, width: int) -> tuple[Image.Image, float, float]:
    """``rgb`` (h, w, 3) resampled to square millimetres at ``width`` px; also the px per voxel along x and y."""
    h, w = rgb.shape[:2]
    width_mm, height_mm = w * float(spacing_xy[0]), h * float(spacing_xy[1])
    height = max(1, int(round(width * height_mm / width_mm)))
    image = Image.fromarray(rgb.astype(np.uint8)).resize((width, height), Image.LANCZOS)
    return image, width / w, height / h


def _text(draw: ImageDraw.ImageDraw, xy, text: str, size: int, fill=(255, 255, 255), anchor: str = "la"):
    """Text with a dark outline, readable on bright bone and dark air alike."""
    draw.text(xy, text, font=font(size), fill=fill, anchor=anchor, stroke_width=max(1, size // 8),
              stroke_fill=(0, 0, 0))


def _mark_sides(image: Image.Image, direction) -> None:
    labels = edge_labels(direction)
    draw = ImageDraw.Draw(image)
    w, h = image.size
    size = max(16, w // 22)
    pad = size // 3
    _text(draw, (pad, h / 2), labels["left"], size, anchor="lm")
    _text(draw, (w - pad, h / 2), labels["right"], size, anchor="rm")
    _text(draw, (w / 2, pad), labels["top"], size, anchor="mt")
    _text(draw, (w / 2, h - pad), labels["bottom"], size, anchor="mb")


def _colour_scale(height: int, lo: float, hi: float, label: str) -> Image.Image:
    """A vertical colour bar (high at the top) labelled with the values of its ends, on black."""
    strip = Image.new("RGB", (SCALE_WIDTH, height), (0, 0, 0))
    size = 20  # ~2 mm high when the picture prints 6 cm wide
    top, bottom = 8 + size + 8, height - 8
    ramp = colorize(np.linspace(1.0, 0.0, max(2, bottom - top)))[:, None, :]
    strip.paste(Image.fromarray(np.repeat(ramp, 18, axis=1)), (6, top))
    draw = ImageDraw.Draw(strip)
    digits = 2 if hi - lo >= 0.05 else 3  # enough digits that the two ends differ
    _text(draw, (28, top), f"{hi:.{digits}f}", size, anchor="lt")
    _text(draw, (28, bottom), f"{lo:.{digits}f}", size, anchor="lb")
    _text(draw, (SCALE_WIDTH / 2, 6), label, size, anchor="mt")
    return strip


def heat_range(heat: np.ndarray, lung_mask: np.ndarray, slices: Sequence[int]) -> tuple[float, float]:
    """(low, high) of the heatmap over the lung of ``slices``: one colour scale for all the key images."""
    values = [np.asarray(heat[int(z)])[np.asarray(lung_mask[int(z)], dtype=bool) & (heat[int(z)] > 0)] for z in slices]
    values = np.concatenate(values) if values else np.zeros(0)
    if values.size == 0:
        return 0.0, 1.0
    return float(values.min()), float(values.max())


def key_image(scan: Scan, result: AnalysisResult, heat: np.ndarray, slice_index: int, *,
              crop: Optional[tuple] = None, scale: Optional[tuple] = None, alpha: float = 0.45,
              max_outlines: int = 16, width: int = KEY_IMAGE_WIDTH) -> Image.Image:
    """One axial slice in the lung window with the primary prompt's heatmap over the lungs, the top patches
    on it boxed and numbered by rank, the patient sides marked, and a colour scale of the probabilities.

    ``crop`` (row0, row1, col0, col1; default ``body_crop`` of this slice) and ``scale`` (low, high
    probability; default the range on this slice) let several pictures share one crop and one scale.
    """
    z = int(slice_index)
    r0, r1, c0, c1 = crop if crop is not None else body_crop(scan, [z], result.lung_mask)
    lo, hi = scale if scale is not None else heat_range(heat, result.lung_mask, [z])
    gray = window_to_uint8(scan.hu[z, r0:r1, c0:c1], result.settings.hu_window)
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    h = np.asarray(heat[z, r0:r1, c0:c1], dtype=np.float32)
    inside = (h > 0) & np.asarray(result.lung_mask[z, r0:r1, c0:c1], dtype=bool)  # heat on lung only
    if inside.any():
        rel = (h - lo) / (hi - lo) if hi > lo else np.ones_like(h)
        colour = colorize(rel).astype(np.float32)
        rgb[inside] = (1 - alpha) * rgb[inside] + alpha * colour[inside]
    image, sx, sy = _to_mm_grid(rgb, scan.spacing_mm[:2], width)
    draw = ImageDraw.Draw(image)
    p = result.patches
    size = max(16, width // 28)  # rank numbers legible at print size (~2 mm)
    for rank, i in enumerate(result.ranked[:max_outlines], start=1):
        if int(p.slice_index[i]) != z:
            continue
        x0, y0 = (int(p.col0[i]) - c0) * sx, (int(p.row0[i]) - r0) * sy
        x1, y1 = x0 + p.size_cols * sx - 1, y0 + p.size_rows * sy - 1
        draw.rectangle([x0, y0, x1, y1], outline=_OUTLINE, width=2)
        _text(draw, (x0 + 3, y0 + 2), str(rank), size, fill=_OUTLINE)
    _mark_sides(image, scan.direction)
    out = Image.new("RGB", (image.width + SCALE_WIDTH, image.height), (0, 0, 0))
    out.paste(image, (0, 0))
    out.paste(_colour_scale(image.height, lo, hi, "p"), (image.width, 0))
    return out


def pattern_image(scan: Scan, labels: np.ndarray, colours: Sequence, slice_index: int, *, hu_window=(-1350.0, 150.0),
                  crop: Optional[tuple] = None, alpha: float = 0.55, width: int = KEY_IMAGE_WIDTH) -> Image.Image:
    """One axial slice with the pattern map's labels (1..P; 0 none) in ``colours`` (RGB per label 1..P, the
    Slicer segment colours), the patient sides marked."""
    z = int(slice_index)
    r0, r1, c0, c1 = crop if crop is not None else body_crop(scan, [z])
    gray = window_to_uint8(scan.hu[z, r0:r1, c0:c1], hu_window)
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    lab = np.asarray(labels[z, r0:r1, c0:c1])
    palette = np.array([(0, 0, 0)] + [tuple(c) for c in colours], dtype=np.float32)
    painted = (lab > 0) & (lab < len(palette))
    rgb[painted] = (1 - alpha) * rgb[painted] + alpha * palette[lab[painted]]
    # Nearest-neighbour: label edges stay in the label's own colour (a smooth resize would blend neighbours).
    image = Image.fromarray(rgb.astype(np.uint8))
    height = max(1, int(round(width * (r1 - r0) * float(scan.spacing_mm[1]) / ((c1 - c0) * float(scan.spacing_mm[0])))))
    image = image.resize((width, height), Image.NEAREST)
    _mark_sides(image, scan.direction)
    return image


def overlay_figure(scan: Scan, result: AnalysisResult, heat: np.ndarray, *, alpha: float = 0.45,
                   max_outlines: int = 16, slice_index: Optional[int] = None) -> Image.Image:
    """overlay.png: the key image of the best patch's slice (or ``slice_index``) with its position written on
    it, for a reader who opens the picture alone."""
    z = int(result.patches.slice_index[int(result.ranked[0])]) if slice_index is None else int(slice_index)
    picture = key_image(scan, result, heat, z, alpha=alpha, max_outlines=max_outlines)
    band = 30
    out = Image.new("RGB", (picture.width, picture.height + band), (0, 0, 0))
    out.paste(picture, (0, band))
    title = f"{slice_position(scan, z).caption()}   {result.primary_prompt}: heatmap, top patches boxed"
    _text(ImageDraw.Draw(out), (6, band // 2), title, 16, fill=(255, 255, 0), anchor="lm")
    return out
