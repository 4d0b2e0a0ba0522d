"""Which voxels of a ``--lung-mask`` file are lung.

A lung mask from another tool is often a label map: TotalSegmentator writes one value per lobe,
lungmask one per lung or lobe, and many exports hold the body or the airways beside the lungs.
Taking every non-zero voxel as lung then counts the body (1,258 mL for lungs of 536 mL) without a
word. So a file with one non-zero value is a mask; a file with several is accepted only when the
user names the lung values (``--lung-labels``) or when its values are exactly TotalSegmentator's
lung lobes (documented convention below); anything else is refused in one line naming the values.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .errors import InputError

#: TotalSegmentator (v2, task "total"): lung_upper_lobe_left 10, lung_lower_lobe_left 11,
#: lung_upper_lobe_right 12, lung_middle_lobe_right 13, lung_lower_lobe_right 14.
TOTALSEGMENTATOR_LOBES = (10, 11, 12, 13, 14)
_SHOW = 12


def parse_lung_labels(text: Optional[str]) -> Optional[tuple]:
    """``"1,2"`` -> (1, 2); None stays None; one line for anything that is not whole numbers > 0."""
    if text is None:
        return None
    values = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        try:
            value = int(part)
        except ValueError:
            raise InputError(f"--lung-labels {text!r}: give the lung's label values as whole numbers, e.g. "
                             "--lung-labels 1,2") from None
        if value <= 0:
            raise InputError(f"--lung-labels {text!r}: label values are > 0 (0 is background)")
        values.append(value)
    if not values:
        raise InputError("--lung-labels is empty: give the lung's label values, e.g. --lung-labels 1,2")
    return tuple(sorted(set(values)))


def _present(values: np.ndarray) -> list:
    if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
        raise InputError("the lung mask holds NaN or infinite values: give an integer label image")
    found = np.unique(values)
    return [v.item() for v in found if v != 0]


def _show(values) -> str:
    text = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values[:_SHOW])
    return text + (f", ... ({len(values)} values)" if len(values) > _SHOW else "")


def lung_mask_from_labels(values: np.ndarray, lung_labels: Optional[Sequence[int]] = None, *,
                          name: str = "the lung mask") -> np.ndarray:
    """Boolean lung mask from a mask or label image (see the module docstring for the rules)."""
    present = _present(values)
    if not present:
        raise InputError(f"lung mask {name} is empty (no non-zero voxel)")
    if lung_labels:
        chosen = [v for v in present if v in set(lung_labels)]
        if not chosen:
            raise InputError(f"lung mask {name} holds none of --lung-labels {_show(list(lung_labels))} "
                             f"(its values: {_show(present)})")
        return np.isin(values, chosen)
    if len(present) == 1:
        return values != 0
    if set(present) <= set(TOTALSEGMENTATOR_LOBES):
        return values != 0
    raise InputError(f"lung mask {name} is a label map with {len(present)} values ({_show(present)}): say which "
                     "are lung with --lung-labels (e.g. --lung-labels 1,2), or give a mask with one non-zero value")
