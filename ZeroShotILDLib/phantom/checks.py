"""Argument checks of the public phantom functions (they raise ``InputError``)."""
from __future__ import annotations

import numpy as np

from ..errors import InputError

def _check_geometry(shape_zyx, spacing_mm):
    try:
        shape = tuple(int(v) for v in shape_zyx)
        spacing = tuple(float(v) for v in spacing_mm)
    except (TypeError, ValueError):
        raise InputError("shape_zyx must be 3 integers and spacing_mm 3 numbers.") from None
    if len(shape) != 3 or len(spacing) != 3:
        raise InputError("shape_zyx must be 3 integers (z, y, x) and spacing_mm 3 numbers (x, y, z).")
    if shape[0] < 4 or shape[1] < 16 or shape[2] < 16:
        raise InputError(f"Phantom shape {shape} is too small: use at least (4, 16, 16).")
    if not all(np.isfinite(s) and 0.05 <= s <= 20.0 for s in spacing):
        raise InputError(f"Phantom spacing_mm {spacing} must be between 0.05 and 20 mm.")
    return shape, spacing


def _is_number(value) -> bool:
    """A real number (not a bool, a string or None), so the range checks below cannot raise."""
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))


def _check_seed(seed, what):
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"{what} must be a non-negative integer, got {seed!r}.")
    return int(seed)


def _check_count(n):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise InputError(f"Cohort size must be a non-negative integer, got {n!r}.")
    return int(n)
