"""Patch montages: n x n patches tiled into one image at the model's input size (paper 000)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def build_montage(pixels: torch.Tensor, montage_size: int, image_size: int) -> np.ndarray:
    """Tile ``pixels`` (k, 1, s, s) in [0, 1] row-major into a uint8 (image_size, image_size) montage.

    Each cell is ``image_size // montage_size`` pixels; with fewer than n*n patches the remaining
    cells stay black (a small scan), and any remainder of the division is black border.
    """
    n = int(montage_size)
    cell = image_size // n
    canvas = torch.zeros((image_size, image_size), dtype=torch.float32)
    count = min(int(pixels.shape[0]), n * n)
    if count:
        cells = F.interpolate(pixels[:count].float().cpu(), size=(cell, cell), mode="bicubic",
                              align_corners=False, antialias=cell < pixels.shape[-1]).clamp_(0, 1)[:, 0]
        for i in range(count):
            r, c = divmod(i, n)
            canvas[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = cells[i]
    return (canvas.numpy() * 255.0 + 0.5).astype(np.uint8)


def montage_to_pixels(montage: np.ndarray) -> torch.Tensor:
    """uint8 (S, S) montage -> (1, 1, S, S) float in [0, 1], the layout the encoders take."""
    return torch.from_numpy(np.asarray(montage, dtype=np.float32) / 255.0)[None, None]
