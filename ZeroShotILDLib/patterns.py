"""Pattern map: several finding prompts at once -> one label per patch (the winning pattern, or none).

Step beside scoring: the kept patch embeddings are compared with the text of every pattern prompt
and of a normal-lung prompt (text encoding only: re-running it costs one text pass). Each pattern
is scored by its contrast with the normal-lung prompt, ``cos(patch, pattern) - cos(patch, normal
lung)``, as a finding is scored against its negative: a raw similarity mostly follows what every
lung text shares (on a phantom-demo IPF phantom the diseased boxes' median sits 1.3 robust SDs
above the scan's median on raw "honeycombing" similarity, 3.5 on the contrast; labelling on raw
similarities found nothing on 15 ILD phantoms, the contrast labels boxes 90-96 % of which lie on
disease: bench/RESULTS.md). The contrasts of different prompts still have their own
offsets and spreads, so each is standardised against the scan's own lung (``extent.reference_z``:
median, robust SD below it). A patch takes the pattern with the highest standardised contrast when
it exceeds the extent rule's threshold; otherwise it is labelled none (0).

The labels are painted into a uint8 volume (``patterns.nii.gz``: 0 none, 1..P the patterns in
settings order) with a Slicer colour table (``patterns.ctbl``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from .extent import DEFAULT_Z, reference_z
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
RULE = ("each pattern scored by cos(patch, pattern) - cos(patch, '{normal}'), standardised against the scan's own "
        "lung (median, robust SD of the scores below it); a patch takes the pattern with the highest score when it "
        "exceeds {k:g}, else none; extent = lung volume in its boxes / scored lung volume of the zone")


@dataclass
class PatternMap:
    """One label per candidate patch: 0 = none, k = ``names[k - 1]``; shared by the CLI and Slicer."""

    names: list  # pattern prompts, label k = names[k - 1]
    normal_prompt: str
    labels: np.ndarray  # (N,) uint8
    scores: np.ndarray  # (N, P) standardised contrast of each pattern with the normal-lung prompt
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


def similarities(features: np.ndarray, text_embeddings: Sequence) -> np.ndarray:
    """(N, P) raw cosine similarity of unit image features with unit text embeddings."""
    feats = np.asarray(features, dtype=np.float32)
    texts = np.stack([np.asarray(t, dtype=np.float32) for t in text_embeddings], axis=1)
    return (feats @ texts).astype(np.float64)


def label_patches(sims: np.ndarray, z: float = DEFAULT_Z) -> tuple[np.ndarray, np.ndarray]:
    """Labels (N,) uint8 and standardised contrasts (N, P) from similarities whose last column is normal lung."""
    sims = np.asarray(sims, dtype=np.float64)
    n, cols = sims.shape
    contrast = sims[:, :-1] - sims[:, -1:]
    if n == 0:
        return np.zeros(0, np.uint8), np.zeros((0, cols - 1))
    scores = np.stack([reference_z(contrast[:, j]) for j in range(cols - 1)], axis=1)
    best = np.argmax(scores, axis=1)
    top = scores[np.arange(n), best]
    labels = np.where(top > z, best + 1, 0).astype(np.uint8)
    return labels, scores


def pattern_map(features: np.ndarray, text, names: Sequence[str], normal_prompt: str = NORMAL_PROMPT,
                z: float = DEFAULT_Z) -> PatternMap:
    """``PatternMap`` of the patches whose unit ``features`` are given; ``text`` is a ``scoring.TextEncoder``."""
    names = list(names)
    embeddings = text.embed_many([*names, normal_prompt])  # one text pass
    labels, scores = label_patches(similarities(features, [e.numpy() for e in embeddings]), z)
    return PatternMap(names, normal_prompt, labels, scores, colours_for(names),
                      rule=RULE.format(k=z, normal=normal_prompt))


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
    from .patches import slice_step_voxels

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
