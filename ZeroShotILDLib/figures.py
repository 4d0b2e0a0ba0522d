"""Pictures people look at instead of numbers: the heatmap overlay with the top patches outlined."""
from __future__ import annotations

from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

from .results import AnalysisResult
from .scan import Scan

# Anchor colours of a perceptually ordered "inferno"-like ramp (black-purple-orange-yellow).
_RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)


def colorize(values01: np.ndarray) -> np.ndarray:
    """[0,1] floats -> uint8 RGB through the ramp above."""
    x = np.clip(values01, 0, 1) * (len(_RAMP) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_RAMP) - 2)
    t = (x - lo)[..., None]
    return (_RAMP[lo] * (1 - t) + _RAMP[lo + 1] * t).astype(np.uint8)


def window_to_uint8(hu_slice: np.ndarray, hu_window=(-1350.0, 150.0)) -> np.ndarray:
    lo, hi = hu_window
    return (np.clip((hu_slice.astype(np.float32) - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def overlay_figure(scan: Scan, result: AnalysisResult, heat: np.ndarray, *, alpha: float = 0.45,
                   max_outlines: int = 16, slice_index: Optional[int] = None) -> Image.Image:
    """The axial slice of the best patch: CT in the lung window, heatmap over the lungs, top patches boxed.

    Heat is shown relative to its range on that slice so that the ranking stays visible even when
    the probabilities sit close to 0.5 (CheXzero's unscaled softmax does that). ``slice_index``
    shows another slice (the report shows the slices of the next best patches too).
    """
    best = int(result.ranked[0])
    if slice_index is not None:
        on_slice = [int(i) for i in result.ranked if int(result.patches.slice_index[i]) == int(slice_index)]
        best = on_slice[0] if on_slice else best
    z = int(result.patches.slice_index[best]) if slice_index is None else int(slice_index)
    gray = window_to_uint8(scan.hu[z], result.settings.hu_window)
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    h = heat[z]
    inside = (h > 0) & result.lung_mask[z]  # boxes spill past the pleura; show heat on lung only
    if inside.any():
        lo, hi = float(h[inside].min()), float(h[inside].max())
        rel = (h - lo) / (hi - lo) if hi > lo else np.ones_like(h)
        color = colorize(rel).astype(np.float32)
        rgb[inside] = (1 - alpha) * rgb[inside] + alpha * color[inside]
    image = Image.fromarray(rgb.astype(np.uint8))
    # Scans are often small (0.7 mm pixels on 512^2 is fine, 2 mm crops are tiny): upscale for legibility.
    scale = max(1, int(np.ceil(512 / max(image.size))))
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(image)
    p = result.patches
    for rank, i in enumerate(result.ranked[:max_outlines], start=1):
        if int(p.slice_index[i]) != z:
            continue
        x0, y0 = int(p.col0[i]) * scale, int(p.row0[i]) * scale
        x1, y1 = x0 + p.size_cols * scale - 1, y0 + p.size_rows * scale - 1
        draw.rectangle([x0, y0, x1, y1], outline=(0, 255, 255), width=2)
        draw.text((x0 + 3, y0 + 2), str(rank), fill=(0, 255, 255))
    which = "top patch" if best == int(result.ranked[0]) else "best patch here"
    draw.text((6, 6), f"slice {z}  {result.primary_prompt}: {which} p={result.patch_probabilities[result.primary_prompt][best]:.3f}",
              fill=(255, 255, 0))
    return image
