"""The one results type shared by the command line, the Slicer module and training."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .settings import AnalysisSettings


@dataclass
class PatchSet:
    """Candidate patches: square in-plane boxes on axial slices, in voxel indices of the scan.

    Box ``i`` covers ``hu[slice_index[i], row0[i]:row0[i]+size_rows, col0[i]:col0[i]+size_cols]``.
    """

    slice_index: np.ndarray  # (N,) int, z
    row0: np.ndarray  # (N,) int, y of the top-left voxel
    col0: np.ndarray  # (N,) int, x of the top-left voxel
    size_rows: int  # box side along y in voxels
    size_cols: int  # box side along x in voxels
    lung_fraction: np.ndarray  # (N,) float in [0, 1]
    center_ras_mm: np.ndarray  # (N, 3) RAS centre of each box

    def __len__(self) -> int:
        return int(self.slice_index.shape[0])

    def montage_candidates(self, filter_threshold: float) -> np.ndarray:
        """(N,) bool: boxes with at least ``filter_threshold`` lung, the ones the montage and top patches
        choose from (every box is scored for the extent and heatmap; see ``patches.scored_patches``)."""
        return self.lung_fraction >= filter_threshold

    def subset(self, indices: np.ndarray) -> "PatchSet":
        return PatchSet(
            self.slice_index[indices], self.row0[indices], self.col0[indices], self.size_rows, self.size_cols,
            self.lung_fraction[indices], self.center_ras_mm[indices],
        )


@dataclass
class AnalysisResult:
    settings: AnalysisSettings
    model_name: str
    #: False when the model's scores say nothing about this scan (random weights; a phantom-trained
    #: model on a real scan): every output then says so, with ``model_warning`` as the reason.
    model_meaningful: bool
    source: str
    shape_zyx: tuple
    spacing_mm: tuple
    lung_mask: np.ndarray  # bool [z,y,x]
    lung_volume_ml: float
    patches: PatchSet  # every candidate
    patch_probabilities: dict  # prompt -> (N,) P(prompt) per candidate
    ranked: np.ndarray  # indices into ``patches`` of the top_k for the first prompt, best first
    montage_indices: np.ndarray  # indices of the n*n patches in the montage, row-major
    montage: np.ndarray  # uint8 (S, S) montage image at the model's input size
    finding_probabilities: dict  # prompt -> montage-level probability
    subtype_probabilities: dict  # subtype name -> montage-level probability
    notes: list = field(default_factory=list)
    timings_s: dict = field(default_factory=dict)
    #: How many candidates were encoded at full resolution (== len(patches) in exact mode).
    encoded_exactly: Optional[int] = None
    #: One line saying why the scores are not meaningful ("" when they are); see :func:`model_warning`.
    model_warning: str = ""
    #: prompt -> extent record (``extent.extent_summary``: lung_fraction, by_zone, predominance, rule).
    extent: dict = field(default_factory=dict)
    #: The pattern map (``patterns.PatternMap``: a label per candidate, names, colours, extent per pattern); None when off.
    patterns: Optional[object] = None
    #: Scored lung volume (mL) per zone and the zone geometry (``extent``), shared by all prompts.
    zones: dict = field(default_factory=dict)

    @property
    def primary_prompt(self) -> str:
        return self.settings.prompts[0]


def model_warning(model_name: str, *, random_weights: bool, trained_on: str, is_phantom: bool,
                  training_health: Optional[dict] = None) -> str:
    """Why ``model_name``'s scores say nothing about this scan, or "" when they can.

    Decided from evidence, never from names: ``trained_on`` is the model's provenance ("phantoms"
    for the demo model, from the model list; a DAPT checkpoint's recorded training domain),
    ``is_phantom`` whether the scan's *voxels* carry the phantom generator's signature
    (``phantom_signature.carries_signature``; a real CT renamed ``phantom_*.nii.gz`` does not), and
    ``training_health`` the verdict a DAPT run recorded in its checkpoint ({"collapsed", "at_chance"}).
    """
    if random_weights:
        return f"model '{model_name}' has random weights: its scores are meaningless"
    health = training_health or {}
    if health.get("collapsed") or health.get("at_chance"):
        why = "its image embeddings collapsed" if health.get("collapsed") else "its validation loss stayed at chance"
        return (f"model '{model_name}' comes from a training run that did not learn ({why}, as recorded in the "
                "checkpoint): its scores are meaningless; use a healthy checkpoint")
    if trained_on == "phantoms" and not is_phantom:
        return (f"model '{model_name}' was trained on synthetic phantoms only: its scores on a real scan are "
                "meaningless (choose a CT or chest X-ray model)")
    return ""
