"""Pattern map: several finding prompts at once -> one label per patch (the strongest pattern, or none).

Step beside scoring: the kept patch embeddings are compared with the text of every pattern prompt
and of the normal-lung prompt (text encoding only: re-running it costs one text pass). Whether a
patch shows a pattern is decided by exactly the rule that decides a typed prompt's extent
(``extent.extents_for``: its contrast ``cos(patch, pattern) - cos(patch, normal lung)`` against the
model's normal-lung reference for that text, and being nearer the pattern's text than "no <pattern>"),
so the pattern "honeycombing" and the prompt "honeycombing" always report the same extent: one word,
one number. Patterns co-exist (fibrosis is reticulation *and* honeycombing), so each pattern's extent
counts every box positive for it; the map, one label per box, paints the one that stands highest
above its normal reference where a box is positive for several.

The labels are painted into a uint8 volume (``patterns.nii.gz``: 0 none, 1..P the patterns in
settings order) with a Slicer colour table (``patterns.ctbl``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from .extent import standardised
from .results import PatchSet
from .settings import DEFAULT_PATTERNS  # noqa: F401  (the default set, importable from here too)

NORMAL_PROMPT = "normal lung"
#: Colours (RGB 0-255) by pattern name; other prompts take the fallback palette in order.
COLOURS = {
    "honeycombing": (230, 25, 75),
    "reticulation": (245, 130, 48),
    "ground-glass opacity": (255, 225, 25),
    "consolidation": (145, 30, 180),
    "emphysema": (70, 240, 240),
}
_FALLBACK = ((60, 180, 75), (0, 130, 200), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
             (170, 110, 40), (128, 0, 0), (128, 128, 0), (0, 0, 128))
COLOUR_TABLE_NAME = "patterns.ctbl"
LABELMAP_NAME = "patterns.nii.gz"

@dataclass
class PatternMap:
    """One label per candidate patch: 0 = none, k = ``names[k - 1]``; shared by the CLI and Slicer."""

    names: list  # pattern prompts, label k = names[k - 1]
    normal_prompt: str
    labels: np.ndarray  # (N,) uint8
    scores: np.ndarray  # (N, P) each pattern's contrast with the normal-lung prompt, in normal-reference SDs
    colours: list  # (r, g, b) per name
    extent: dict = field(default_factory=dict)  # name -> extent record (extent.extent_summary)
    rule: str = ""

    def label_names(self) -> dict:
        return {0: "none", **{k + 1: n for k, n in enumerate(self.names)}}


def colours_for(names: Sequence[str]) -> list:
    out, spare = [], iter(_FALLBACK * (1 + len(names) // len(_FALLBACK)))
    for n in names:
        out.append(COLOURS.get(n.strip().lower()) or next(spare))
    return out


def label_patches(standardised: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """(N,) uint8 labels from (N, P) standardised scores and (N, P) positives: the positive pattern that
    stands highest above its reference, else 0."""
    standardised = np.asarray(standardised, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    if standardised.shape[0] == 0:
        return np.zeros(0, np.uint8)
    masked = np.where(positive, standardised, -np.inf)
    best = np.argmax(masked, axis=1)
    return np.where(positive.any(axis=1), best + 1, 0).astype(np.uint8)


def pattern_map_from_positives(names: Sequence[str], normal_prompt: str, scores: dict, references: dict,
                               positives: dict, rule: str = "", lung_fraction: Optional[np.ndarray] = None
                               ) -> PatternMap:
    """``PatternMap`` painted from each pattern's positive boxes as its extent decided them (one rule): a box
    positive for several takes the one standing highest above its normal reference."""
    names = list(names)
    std = np.stack([standardised(scores[n], references.get(n), lung_fraction) for n in names], axis=1)
    pos = np.stack([np.asarray(positives[n], dtype=bool) for n in names], axis=1)
    return PatternMap(names, normal_prompt, label_patches(std, pos), std, colours_for(names), rule=rule)


def paint_labels(patches: PatchSet, labels: np.ndarray, shape_zyx, *, slab_voxels: int = 1,
                 lung_mask: Optional[np.ndarray] = None) -> np.ndarray:
    """uint8 [z,y,x]: each patch's box (through its slab) holds its label; limited to the lungs if given.

    Where boxes overlap the later candidate wins, as in ``extent.zone_volume_table``, so the painted
    volume and the extent agree.
    """
    out = np.zeros(shape_zyx, dtype=np.uint8)
    nz = shape_zyx[0]
    half_lo, half_hi = (slab_voxels - 1) // 2, slab_voxels // 2
    for i in range(len(patches)):
        z = int(patches.slice_index[i])
        r, c = int(patches.row0[i]), int(patches.col0[i])
        out[max(0, z - half_lo):min(nz, z + half_hi + 1), r:r + patches.size_rows, c:c + patches.size_cols] = labels[i]
    if lung_mask is not None:
        out[~np.asarray(lung_mask, dtype=bool)] = 0
    return out


def label_volume(result) -> np.ndarray:
    """The pattern map of an ``AnalysisResult`` as a uint8 [z,y,x] volume on the scan's grid (what
    patterns.nii.gz holds; for the Slicer segmentation and DICOM SEG writers too)."""
    from .geometry import slice_step_voxels  # torch-free: label_volume runs in Slicer's process too

    if result.patterns is None:
        raise ValueError("the result has no pattern map (AnalysisSettings.patterns is empty)")
    slab = slice_step_voxels(result.spacing_mm, result.settings.slice_step_mm)
    return paint_labels(result.patches, result.patterns.labels, result.lung_mask.shape, slab_voxels=slab,
                        lung_mask=result.lung_mask)


def colour_table_text(names: Sequence[str], colours: Sequence) -> str:
    """Slicer colour table (``.ctbl``): ``index name R G B A`` per line; spaces in names become underscores."""
    lines = ["# zeroshot-ild pattern map colour table", f"# Number of colors: {len(names) + 1}", "0 none 0 0 0 0"]
    for k, (name, (r, g, b)) in enumerate(zip(names, colours), start=1):
        lines.append(f"{k} {'_'.join(name.split())} {r} {g} {b} 255")
    return "\n".join(lines) + "\n"
